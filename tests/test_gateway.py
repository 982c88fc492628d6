"""The HTTP gateway over real HTTP on 127.0.0.1: a Serve app on a local Ray cluster."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import ray

import arbor
from arbor import cli
from arbor.config import reset_settings
from arbor.gateway import create_api_key, deploy
from arbor.http_client import GatewayClient, ServerSentEvent
from arbor.persistence import STOPPED, AgentRecord, CheckpointStore, open_store

# The command actors and agents of these tests import from tests.gateway_support.
ENVIRONMENT = {
    "ARBOR_GATEWAY_AGENT_TYPES": (
        "counter=tests.agents:Counter,sleeper=tests.gateway_support:Sleeper"
    ),
    "ARBOR_GATEWAY_COMMANDS": "ticker=tests.gateway_support:ticker",
    "ARBOR_GATEWAY_MAX_BODY_BYTES": "65536",
    "ARBOR_GATEWAY_REQUEST_TIMEOUT_S": "20",
    "ARBOR_GATEWAY_MAX_REPLICAS": "1",
}


@dataclass
class Gateway:
    url: str
    store: CheckpointStore
    admin: str
    reader: str
    nobody: str
    fuzz: str
    analysis_root: Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until_ready(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"gateway at {url} not ready within {timeout} s")
        time.sleep(0.3)


def new_key(store: CheckpointStore, name: str, *patterns: str) -> str:
    created = create_api_key(store, name)
    for pattern in patterns:
        arbor.grant(created.record.principal, pattern, depth=2)
    return created.key


def principal_of(key: str) -> str:
    return "key:" + key.split("_")[1]


@pytest.fixture(scope="module")
def gateway(module_pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    root = tmp_path_factory.mktemp("analysis")
    (root / "pkg").mkdir()
    (root / "pkg" / "a.py").write_text("def f(x):\n    if x:\n        return 1\n    return 2\n")
    (root / "pkg" / "b.py").write_text("import os\n\nclass C:\n    def g(self):\n        pass\n")
    (root / "broken.py").write_text("def (:\n")
    os.environ.update(ENVIRONMENT, ARBOR_GATEWAY_ANALYSIS_ROOTS=str(root))
    reset_settings()
    arbor.init(database_url=module_pg_url, num_cpus=2, object_store_memory=100 * 1024**2)
    url = deploy(port=free_port())
    wait_until_ready(url)
    store = open_store(module_pg_url)
    admin = new_key(
        store,
        "admin",
        "arbor://agent/*/gw/**",
        "arbor://capability/*/gw/**",
        "arbor://capability/*/key/*",
        "arbor://audit/read/log",
        "arbor://command/*/ticker",
        "arbor://command/*/analysis",
    )
    reader = new_key(store, "reader", "arbor://agent/inspect/gw/**", "arbor://agent/ask/gw/**")
    nobody = new_key(store, "nobody")
    fuzz = new_key(store, "fuzz", "arbor://agent/inspect/fuzz/**", "arbor://audit/read/log")
    yield Gateway(url, store, admin, reader, nobody, fuzz, root)
    from ray import serve

    serve.shutdown()
    store.close()
    arbor.shutdown()
    for name in [*ENVIRONMENT, "ARBOR_GATEWAY_ANALYSIS_ROOTS"]:
        os.environ.pop(name, None)
    reset_settings()


def call(
    gateway: Gateway,
    method: str,
    path: str,
    body: Any = None,
    key: str | None = None,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, dict[str, str]]:
    data = raw
    if data is None and body is not None:
        data = json.dumps(body).encode()
    request = urllib.request.Request(gateway.url + path, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            text = response.read()
            return response.status, json.loads(text) if text else None, dict(response.headers)
    except urllib.error.HTTPError as error:
        text = error.read()
        return error.code, json.loads(text) if text else None, dict(error.headers)


def spawn(gateway: Gateway, name: str, agent_type: str = "counter", **kwargs: Any) -> None:
    body = {"type": agent_type, "name": name, "kwargs": kwargs}
    status, result, _ = call(gateway, "POST", "/v1/agents", body, gateway.admin)
    assert status == 201, result


def client(gateway: Gateway, key: str) -> GatewayClient:
    return arbor.connect(gateway.url, api_key=key)


# --- operations ---------------------------------------------------------------------


def test_healthz_needs_no_key(gateway: Gateway) -> None:
    status, body, _ = call(gateway, "GET", "/healthz")
    assert status == 200
    assert body == {"status": "ok"}


def test_readyz_reports_each_part(gateway: Gateway) -> None:
    status, body, _ = call(gateway, "GET", "/readyz")
    assert status == 200
    assert body == {"status": "ready", "checks": {"registry": "ok", "database": "ok"}}


def test_openapi_document_lists_routes(gateway: Gateway) -> None:
    status, body, _ = call(gateway, "GET", "/v1/openapi.json")
    assert status == 200
    assert "/v1/agents/{name}/messages" in body["paths"]
    assert "/v1/executions/{execution_id}/events" in body["paths"]


def test_unknown_route_gets_error_body(gateway: Gateway) -> None:
    status, body, _ = call(gateway, "GET", "/v1/nothing", key=gateway.admin)
    assert status == 404
    assert body["error"]["code"] == "not_found"
    assert "/v1/nothing" in body["error"]["message"]


def test_wrong_method_gets_405(gateway: Gateway) -> None:
    status, body, _ = call(gateway, "PUT", "/v1/agents", {}, gateway.admin)
    assert status == 405
    assert body["error"]["code"] == "method_not_allowed"


# --- authentication and the authorisation matrix ---------------------------------------

# (method, path, body, capability URI the route checks)
MATRIX = [
    ("GET", "/v1/agents/gw/m/a", None, "arbor://agent/inspect/gw/m/a"),
    ("POST", "/v1/agents", {"type": "counter", "name": "gw/m/new"}, "arbor://agent/spawn/gw/m/new"),
    ("POST", "/v1/agents/gw/m/a/stop", {}, "arbor://agent/stop/gw/m/a"),
    ("POST", "/v1/agents/gw/m/a/restore", {"version": 1}, "arbor://agent/stop/gw/m/a"),
    ("POST", "/v1/agents/gw/m/a/messages", {"handler": "get"}, "arbor://agent/ask/gw/m/a"),
    (
        "POST",
        "/v1/agents/gw/m/a/messages",
        {"handler": "get", "wait": False},
        "arbor://agent/send/gw/m/a",
    ),
    (
        "POST",
        "/v1/capabilities",
        {"principal": "gw/m/a", "pattern": "arbor://agent/ask/gw/m/b"},
        "arbor://capability/grant/gw/m/a",
    ),
    (
        "GET",
        "/v1/capabilities?principal=gw/m/a",
        None,
        "arbor://capability/revoke/gw/m/a",
    ),
    ("GET", "/v1/audit", None, "arbor://audit/read/log"),
    ("GET", "/v1/audit/verify", None, "arbor://audit/read/log"),
    ("POST", "/v1/commands", {"command": "ticker"}, "arbor://command/run/ticker"),
]


@pytest.mark.parametrize(("method", "path", "body", "uri"), MATRIX)
def test_route_without_key_is_401(
    gateway: Gateway, method: str, path: str, body: Any, uri: str
) -> None:
    status, result, headers = call(gateway, method, path, body)
    assert status == 401
    assert result["error"]["code"] == "unauthorized"
    assert headers.get("www-authenticate") == "Bearer"


@pytest.mark.parametrize(("method", "path", "body", "uri"), MATRIX)
def test_route_with_key_lacking_capability_is_403(
    gateway: Gateway, method: str, path: str, body: Any, uri: str
) -> None:
    status, result, _ = call(gateway, method, path, body, gateway.nobody)
    assert status == 403
    assert result["error"]["code"] == "capability_denied"
    assert result["error"]["uri"] == uri
    assert uri in result["error"]["message"]


@pytest.mark.parametrize(("method", "path", "body", "uri"), MATRIX)
def test_route_with_capability_is_allowed(
    gateway: Gateway, method: str, path: str, body: Any, uri: str
) -> None:
    names = {info.name for info in arbor.list_agents()}
    if "gw/m/a" not in names:
        spawn(gateway, "gw/m/a", start=1)
    if "gw/m/new" in names:
        arbor.stop("gw/m/new", purge=True)
    status, result, _ = call(gateway, method, path, body, gateway.admin)
    assert 200 <= status < 300, result
    if path.endswith("/stop"):
        # Later cases of the matrix need the agent again.
        arbor.stop("gw/m/a", purge=True)


def test_denial_is_audited_with_uri(gateway: Gateway) -> None:
    call(gateway, "GET", "/v1/agents/gw/audited", key=gateway.nobody)
    entries = gateway.store.list_audit(principal=principal_of(gateway.nobody), decision="denied")
    assert "arbor://agent/inspect/gw/audited" in [entry.resource for entry in entries]


def test_malformed_key_is_401(gateway: Gateway) -> None:
    status, body, _ = call(gateway, "GET", "/v1/agent-types", key="not-a-key")
    assert status == 401
    assert "malformed" in body["error"]["message"]


def test_wrong_secret_is_401(gateway: Gateway) -> None:
    key_id = gateway.admin.split("_")[1]
    forged = f"arbor_{key_id}_{'A' * 43}"
    status, body, _ = call(gateway, "GET", "/v1/agent-types", key=forged)
    assert status == 401
    assert "secret is wrong" in body["error"]["message"]


def test_revoked_key_stops_working(gateway: Gateway) -> None:
    key = new_key(gateway.store, "short-lived")
    assert call(gateway, "GET", "/v1/agent-types", key=key)[0] == 200
    assert gateway.store.revoke_api_key(key.split("_")[1])
    time.sleep(1.2)
    status, body, _ = call(gateway, "GET", "/v1/agent-types", key=key)
    assert status == 401
    assert "revoked" in body["error"]["message"]


def test_store_keeps_only_salted_hash(gateway: Gateway) -> None:
    record = gateway.store.get_api_key(gateway.admin.split("_")[1])
    assert record is not None
    secret = gateway.admin.split("_", 2)[2]
    assert secret not in record.secret_hash
    assert record.secret_hash.startswith("scrypt$")


# --- agents ---------------------------------------------------------------------------


def test_spawn_returns_record(gateway: Gateway) -> None:
    status, body, _ = call(
        gateway,
        "POST",
        "/v1/agents",
        {"type": "counter", "name": "gw/s1", "kwargs": {"start": 3}},
        gateway.admin,
    )
    assert status == 201
    assert body["name"] == "gw/s1"
    assert body["type"] == "tests.agents:Counter"
    assert body["status"] == "running"
    assert arbor.get("gw/s1").ask("get") == 3


def test_spawn_hosted_agent(gateway: Gateway) -> None:
    body = {
        "type": "counter",
        "name": "gw/hosted",
        "kwargs": {"start": 4},
        "placement": {"placement": "hosted", "passivate_idle_s": 60},
    }
    status, result, _ = call(gateway, "POST", "/v1/agents", body, gateway.admin)
    assert status == 201
    assert result["placement"] == "hosted"
    assert arbor.get("gw/hosted").ask("get") == 4


def test_spawn_hosted_with_ray_option_is_400(gateway: Gateway) -> None:
    body = {
        "type": "counter",
        "name": "gw/hosted-cpu",
        "placement": {"placement": "hosted", "num_cpus": 1},
    }
    status, result, _ = call(gateway, "POST", "/v1/agents", body, gateway.admin)
    assert status == 400
    assert "num_cpus" in result["error"]["message"]


def test_spawn_existing_name_is_409(gateway: Gateway) -> None:
    spawn(gateway, "gw/taken")
    status, body, _ = call(
        gateway, "POST", "/v1/agents", {"type": "counter", "name": "gw/taken"}, gateway.admin
    )
    assert status == 409
    assert body["error"]["code"] == "name_taken"
    assert body["error"]["agent"] == "gw/taken"


def test_spawn_unregistered_type_is_400(gateway: Gateway) -> None:
    body = {"type": "os.system", "name": "gw/evil"}
    status, result, _ = call(gateway, "POST", "/v1/agents", body, gateway.admin)
    assert status == 400
    assert result["error"]["code"] == "unknown_type"
    assert result["error"]["field"] == "type"
    assert "counter" in result["error"]["message"]


def test_spawn_with_import_path_is_rejected(gateway: Gateway) -> None:
    body = {"type": "tests.agents:Counter", "name": "gw/path"}
    status, result, _ = call(gateway, "POST", "/v1/agents", body, gateway.admin)
    assert status == 422
    assert result["error"]["field"] == "type"


def test_spawn_with_bad_init_arguments_is_400(gateway: Gateway) -> None:
    body = {"type": "counter", "name": "gw/badargs", "kwargs": {"nope": 1}}
    status, result, _ = call(gateway, "POST", "/v1/agents", body, gateway.admin)
    assert status == 400
    assert result["error"]["code"] == "invalid_arguments"
    assert "nope" in result["error"]["message"]


def test_spawn_birth_capabilities_come_from_key(gateway: Gateway) -> None:
    body = {
        "type": "counter",
        "name": "gw/born",
        "capabilities": [{"pattern": "arbor://agent/ask/gw/s1"}],
    }
    assert call(gateway, "POST", "/v1/agents", body, gateway.admin)[0] == 201
    born = arbor.capabilities("gw/born")
    assert [info.pattern for info in born] == ["arbor://agent/ask/gw/s1"]
    assert born[0].granted_by == principal_of(gateway.admin)
    assert born[0].parent_id is not None


def test_spawn_birth_capability_beyond_key_is_403(gateway: Gateway) -> None:
    body = {
        "type": "counter",
        "name": "gw/greedy",
        "capabilities": [{"pattern": "arbor://agent/ask/other/x"}],
    }
    status, result, _ = call(gateway, "POST", "/v1/agents", body, gateway.admin)
    assert status == 403
    assert result["error"]["code"] == "capability_denied"
    assert not any(info.name == "gw/greedy" for info in arbor.list_agents())


def test_inspect_unknown_agent_is_404(gateway: Gateway) -> None:
    status, body, _ = call(gateway, "GET", "/v1/agents/gw/ghost", key=gateway.admin)
    assert status == 404
    assert body["error"]["code"] == "agent_not_found"
    assert body["error"]["agent"] == "gw/ghost"


def test_inspect_invalid_name_is_400(gateway: Gateway) -> None:
    status, body, _ = call(gateway, "GET", "/v1/agents/gw/bad%20name", key=gateway.admin)
    assert status == 400
    assert body["error"]["code"] == "invalid_name"
    assert body["error"]["field"] == "name"


def test_list_leaves_out_agents_key_may_not_inspect(gateway: Gateway) -> None:
    spawn(gateway, "gw/list/a")
    arbor.spawn(__import__("tests.agents").agents.Counter, "hidden/list/b")
    names = [info.name for info in client(gateway, gateway.reader).list_agents()]
    assert "gw/list/a" in names
    assert "hidden/list/b" not in names
    assert client(gateway, gateway.nobody).list_agents() == []


def test_list_pages_follow_cursor(gateway: Gateway) -> None:
    for index in range(3):
        spawn(gateway, f"gw/page/{index}")
    first = call(gateway, "GET", "/v1/agents?prefix=gw/page/&limit=2", key=gateway.admin)[1]
    assert [item["name"] for item in first["agents"]] == ["gw/page/0", "gw/page/1"]
    assert first["next_cursor"] == "gw/page/1"
    second = call(
        gateway, "GET", "/v1/agents?prefix=gw/page/&limit=2&cursor=gw/page/1", key=gateway.admin
    )[1]
    assert [item["name"] for item in second["agents"]] == ["gw/page/2"]
    assert second["next_cursor"] is None


def test_list_keeps_to_the_namespace(gateway: Gateway) -> None:
    names = ["team-g:ns/a", "team-g:ns/b", "team-gx:ns/c", "gwns/d"]
    for name in names:
        gateway.store.create_agent(AgentRecord(name, "tests.agents.Counter", STOPPED, name))
    key = new_key(
        gateway.store,
        "namespaces",
        "arbor://agent/inspect/team-g:**",
        "arbor://agent/inspect/team-gx:**",
        "arbor://agent/inspect/gwns/**",
    )
    lister = client(gateway, key)
    try:
        assert [info.name for info in lister.list_agents(namespace="team-g")] == names[:2]
        assert [info.name for info in lister.list_agents(namespace="default")] == ["gwns/d"]
        assert sorted(info.name for info in lister.list_agents()) == sorted(names)
        assert sorted(info.name for info in lister.list_agents(namespace="*")) == sorted(names)
        assert [info.name for info in lister.list_agents(prefix="team-g:")] == names[:2]

        first = call(gateway, "GET", "/v1/agents?namespace=team-g&limit=1", key=key)[1]
        assert [item["name"] for item in first["agents"]] == ["team-g:ns/a"]
        assert first["next_cursor"] == "team-g:ns/a"
        path = "/v1/agents?namespace=team-g&limit=1&cursor=team-g:ns/a"
        second = call(gateway, "GET", path, key=key)[1]
        assert [item["name"] for item in second["agents"]] == ["team-g:ns/b"]
        assert second["next_cursor"] is None
    finally:
        for name in names:
            gateway.store.delete_agent(name)


def test_cli_agents_through_gateway_keep_to_namespace(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    names = ["team-h:cli/a", "team-hx:cli/b", "gwcli/c"]
    for name in names:
        gateway.store.create_agent(AgentRecord(name, "tests.agents.Counter", STOPPED, name))
    key = new_key(
        gateway.store,
        "cli-namespaces",
        "arbor://agent/inspect/team-h:**",
        "arbor://agent/inspect/team-hx:**",
        "arbor://agent/inspect/gwcli/**",
    )
    monkeypatch.setenv("ARBOR_API_KEY", key)
    try:
        for namespace, listed in (("team-h", [0]), (None, [2]), ("*", [0, 1, 2])):
            option = [] if namespace is None else ["--namespace", namespace]
            assert cli.main(["agents", "--url", gateway.url, *option]) == 0
            output = capsys.readouterr().out
            for index, name in enumerate(names):
                assert (name in output) == (index in listed), (namespace, name, output)
    finally:
        for name in names:
            gateway.store.delete_agent(name)


def test_list_rejects_bad_namespace(gateway: Gateway) -> None:
    status, body, _ = call(gateway, "GET", "/v1/agents?namespace=Team_G", key=gateway.admin)
    assert status == 400
    assert body["error"]["code"] == "invalid_namespace"
    assert body["error"]["field"] == "namespace"


def test_list_rejects_bad_limit(gateway: Gateway) -> None:
    status, body, _ = call(gateway, "GET", "/v1/agents?limit=0", key=gateway.admin)
    assert status == 422
    assert body["error"]["field"] == "limit"


def test_stop_and_purge_free_the_name(gateway: Gateway) -> None:
    spawn(gateway, "gw/stopme")
    status, body, _ = call(gateway, "POST", "/v1/agents/gw/stopme/stop", {}, gateway.admin)
    assert status == 200
    assert body["status"] == "stopped"
    status, body, _ = call(
        gateway, "POST", "/v1/agents/gw/stopme/stop", {"purge": True}, gateway.admin
    )
    assert status == 200
    assert call(gateway, "GET", "/v1/agents/gw/stopme", key=gateway.admin)[0] == 404


def test_stop_unknown_agent_is_404(gateway: Gateway) -> None:
    status, body, _ = call(gateway, "POST", "/v1/agents/gw/nobody/stop", {}, gateway.admin)
    assert status == 404
    assert body["error"]["agent"] == "gw/nobody"


def test_restore_rolls_back_state(gateway: Gateway) -> None:
    spawn(gateway, "gw/restore", start=10)
    ref = client(gateway, gateway.admin).get("gw/restore")
    version = client(gateway, gateway.admin).info("gw/restore").checkpoint_version
    ref.ask("add", 5)
    status, body, _ = call(
        gateway, "POST", "/v1/agents/gw/restore/restore", {"version": version}, gateway.admin
    )
    assert status == 200, body
    assert ref.ask("get") == 10


def test_restore_missing_version_is_404(gateway: Gateway) -> None:
    spawn(gateway, "gw/restore2")
    status, body, _ = call(
        gateway, "POST", "/v1/agents/gw/restore2/restore", {"version": 999}, gateway.admin
    )
    assert status == 404
    assert body["error"]["code"] == "checkpoint_not_found"


# --- messages -------------------------------------------------------------------------


def test_ask_returns_reply(gateway: Gateway) -> None:
    spawn(gateway, "gw/ask", start=1)
    body = {"handler": "add", "args": [2]}
    status, result, _ = call(gateway, "POST", "/v1/agents/gw/ask/messages", body, gateway.admin)
    assert status == 200
    assert result["reply"] == 3


def test_send_is_202_with_message_id(gateway: Gateway) -> None:
    spawn(gateway, "gw/send", start=1)
    body = {"handler": "add", "args": [4], "wait": False, "message_id": "m-1"}
    status, result, _ = call(gateway, "POST", "/v1/agents/gw/send/messages", body, gateway.admin)
    assert status == 202
    assert result["message_id"] == "m-1"
    deadline = time.monotonic() + 10
    while arbor.get("gw/send").ask("get") != 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert arbor.get("gw/send").ask("get") == 5


def test_ask_repeated_message_id_applies_once(gateway: Gateway) -> None:
    spawn(gateway, "gw/idem", start=0)
    body = {"handler": "add", "args": [1], "message_id": "same"}
    first = call(gateway, "POST", "/v1/agents/gw/idem/messages", body, gateway.admin)[1]
    second = call(gateway, "POST", "/v1/agents/gw/idem/messages", body, gateway.admin)[1]
    assert first["reply"] == 1
    assert second["reply"] == 1


def test_send_needs_send_capability(gateway: Gateway) -> None:
    spawn(gateway, "gw/sender")
    reader = client(gateway, gateway.reader).get("gw/sender")
    assert reader.ask("get") == 0
    with pytest.raises(arbor.CapabilityDenied) as caught:
        reader.send("get")
    assert caught.value.uri == "arbor://agent/send/gw/sender"


def test_unknown_handler_is_400(gateway: Gateway) -> None:
    spawn(gateway, "gw/handlers")
    body = {"handler": "missing"}
    status, result, _ = call(
        gateway, "POST", "/v1/agents/gw/handlers/messages", body, gateway.admin
    )
    assert status == 400
    assert result["error"]["code"] == "unknown_handler"


def test_wrong_arguments_are_400(gateway: Gateway) -> None:
    spawn(gateway, "gw/args")
    body = {"handler": "add", "args": [1, 2, 3]}
    status, result, _ = call(gateway, "POST", "/v1/agents/gw/args/messages", body, gateway.admin)
    assert status == 400
    assert result["error"]["code"] == "invalid_arguments"


def test_reserved_kwargs_are_400(gateway: Gateway) -> None:
    body = {"handler": "add", "kwargs": {"timeout": 1}}
    status, result, _ = call(gateway, "POST", "/v1/agents/gw/args/messages", body, gateway.admin)
    assert status == 400
    assert result["error"]["field"] == "kwargs"


def test_handler_error_is_422_with_type(gateway: Gateway) -> None:
    spawn(gateway, "gw/fails")
    body = {"handler": "fail", "args": ["boom"]}
    status, result, _ = call(gateway, "POST", "/v1/agents/gw/fails/messages", body, gateway.admin)
    assert status == 422
    assert result["error"]["code"] == "handler_error"
    assert result["error"]["error_type"] == "builtins.ValueError"
    assert "boom" in result["error"]["message"]


def test_ask_timeout_is_504_naming_agent(gateway: Gateway) -> None:
    spawn(gateway, "gw/slow", agent_type="sleeper")
    body = {"handler": "nap", "args": [3], "timeout": 0.5}
    status, result, _ = call(gateway, "POST", "/v1/agents/gw/slow/messages", body, gateway.admin)
    assert status == 504
    assert result["error"]["code"] == "timeout"
    assert result["error"]["agent"] == "gw/slow"
    assert "gw/slow" in result["error"]["message"]


def test_reply_that_is_not_json_is_422(gateway: Gateway) -> None:
    spawn(gateway, "gw/raw", agent_type="sleeper")
    body = {"handler": "raw"}
    status, result, _ = call(gateway, "POST", "/v1/agents/gw/raw/messages", body, gateway.admin)
    assert status == 422
    assert result["error"]["code"] == "reply_not_json"


def test_message_to_unknown_agent_is_404(gateway: Gateway) -> None:
    body = {"handler": "get"}
    status, result, _ = call(gateway, "POST", "/v1/agents/gw/void/messages", body, gateway.admin)
    assert status == 404
    assert result["error"]["agent"] == "gw/void"


# --- input handling -------------------------------------------------------------------


def test_malformed_json_is_400(gateway: Gateway) -> None:
    status, body, _ = call(gateway, "POST", "/v1/agents", raw=b"{not json", key=gateway.admin)
    assert status == 400
    assert body["error"]["code"] == "invalid_json"
    assert body["error"]["field"] == "body"


def test_wrong_type_names_field(gateway: Gateway) -> None:
    body = {"type": "counter", "name": "gw/x", "args": "not a list"}
    status, result, _ = call(gateway, "POST", "/v1/agents", body, gateway.admin)
    assert status == 422
    assert result["error"]["code"] == "invalid_request"
    assert result["error"]["field"] == "args"


def test_unknown_field_is_rejected(gateway: Gateway) -> None:
    body = {"handler": "get", "bogus": 1}
    status, result, _ = call(gateway, "POST", "/v1/agents/gw/ask/messages", body, gateway.admin)
    assert status == 422
    assert result["error"]["field"] == "bogus"


def test_invalid_name_in_body_names_field(gateway: Gateway) -> None:
    body = {"type": "counter", "name": "bad name"}
    status, result, _ = call(gateway, "POST", "/v1/agents", body, gateway.admin)
    assert status == 422
    assert result["error"]["field"] == "name"


def test_reserved_name_prefix_is_400(gateway: Gateway) -> None:
    body = {"type": "counter", "name": "arbor-registry"}
    status, result, _ = call(gateway, "POST", "/v1/agents", body, gateway.admin)
    assert status == 400
    assert result["error"]["code"] == "invalid_name"


def test_oversized_body_is_413(gateway: Gateway) -> None:
    body = {"handler": "append", "args": ["x" * 70_000]}
    status, result, _ = call(gateway, "POST", "/v1/agents/gw/ask/messages", body, gateway.admin)
    assert status == 413
    assert result["error"]["code"] == "body_too_large"
    assert "65536" in result["error"]["message"]


def test_chunked_oversized_body_is_413(gateway: Gateway) -> None:
    host, port = gateway.url.removeprefix("http://").split(":")
    payload = json.dumps({"handler": "append", "args": ["y" * 70_000]}).encode()
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        head = (
            "POST /v1/agents/gw/ask/messages HTTP/1.1\r\n"
            f"Host: {host}\r\nAuthorization: Bearer {gateway.admin}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
            "Connection: close\r\n\r\n"
        )
        connection.sendall(head.encode())
        for start in range(0, len(payload), 8192):
            chunk = payload[start : start + 8192]
            connection.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        connection.sendall(b"0\r\n\r\n")
        response = b""
        while chunk := connection.recv(65536):
            response += chunk
    assert response.startswith(b"HTTP/1.1 413")
    assert b"body_too_large" in response


# --- capabilities ---------------------------------------------------------------------


def test_grant_records_key_as_grantor(gateway: Gateway) -> None:
    body = {"principal": "gw/grantee", "pattern": "arbor://agent/ask/gw/s1"}
    status, result, _ = call(gateway, "POST", "/v1/capabilities", body, gateway.admin)
    assert status == 201
    assert result["principal"] == "gw/grantee"
    assert result["granted_by"] == principal_of(gateway.admin)
    rows = gateway.store.list_audit(action="grant", principal=principal_of(gateway.admin))
    assert result["id"] in [row.detail.get("id") for row in rows]


def test_grant_to_key_principal_uses_key_path(gateway: Gateway) -> None:
    target = principal_of(gateway.nobody)
    body = {"principal": target, "pattern": "arbor://agent/inspect/gw/none"}
    status, result, _ = call(gateway, "POST", "/v1/capabilities", body, gateway.admin)
    assert status == 201
    assert result["principal"] == target


def test_grant_invalid_pattern_is_400(gateway: Gateway) -> None:
    body = {"principal": "gw/grantee", "pattern": "arbor://agent/ask/../x"}
    status, result, _ = call(gateway, "POST", "/v1/capabilities", body, gateway.admin)
    assert status == 400
    assert result["error"]["code"] == "invalid_resource"


def test_grant_invalid_principal_is_400(gateway: Gateway) -> None:
    body = {"principal": "key:zz", "pattern": "arbor://agent/ask/gw/x"}
    status, result, _ = call(gateway, "POST", "/v1/capabilities", body, gateway.admin)
    assert status == 400
    assert result["error"]["code"] == "invalid_principal"


def test_delegate_narrows_and_revoke_cascades(gateway: Gateway) -> None:
    admin = client(gateway, gateway.admin)
    parent = next(info for info in admin.capabilities() if info.pattern == "arbor://agent/*/gw/**")
    child = admin.delegate(parent.id, "gw/delegatee", "arbor://agent/ask/gw/s1")
    assert child.parent_id == parent.id
    assert child.granted_by == principal_of(gateway.admin)
    delegated = admin.capabilities("gw/delegatee")
    assert [info.id for info in delegated] == [child.id]
    revoked = admin.revoke(child.id)
    assert revoked == [child.id]
    assert admin.capabilities("gw/delegatee") == []


def test_delegate_widening_is_403(gateway: Gateway) -> None:
    admin = client(gateway, gateway.admin)
    parent = next(info for info in admin.capabilities() if info.pattern == "arbor://agent/*/gw/**")
    with pytest.raises(arbor.CapabilityDenied):
        admin.delegate(parent.id, "gw/delegatee", "arbor://agent/ask/other/x")


def test_delegate_unknown_parent_is_403(gateway: Gateway) -> None:
    body = {"to_principal": "gw/delegatee"}
    status, result, _ = call(gateway, "POST", "/v1/capabilities/nope/delegate", body, gateway.admin)
    assert status == 403
    assert "holds no capability" in result["error"]["message"]


def test_revoke_unknown_capability_is_404(gateway: Gateway) -> None:
    status, result, _ = call(gateway, "DELETE", "/v1/capabilities/nope", key=gateway.admin)
    assert status == 404
    assert result["error"]["code"] == "capability_not_found"


def test_revoke_needs_capability_on_holder(gateway: Gateway) -> None:
    info = arbor.grant("hidden/holder", "arbor://agent/ask/hidden/x")
    status, result, _ = call(gateway, "DELETE", f"/v1/capabilities/{info.id}", key=gateway.admin)
    assert status == 403
    assert result["error"]["uri"] == "arbor://capability/revoke/hidden/holder"


def test_list_capabilities_shows_own(gateway: Gateway) -> None:
    own = client(gateway, gateway.reader).capabilities()
    assert sorted(info.pattern for info in own) == [
        "arbor://agent/ask/gw/**",
        "arbor://agent/inspect/gw/**",
    ]


# --- audit ----------------------------------------------------------------------------


def test_audit_lists_filtered_entries(gateway: Gateway) -> None:
    status, body, _ = call(gateway, "GET", "/v1/audit?action=grant&limit=5", key=gateway.admin)
    assert status == 200
    assert 0 < len(body) <= 5
    assert {entry["action"] for entry in body} == {"grant"}


def test_audit_naive_time_is_400(gateway: Gateway) -> None:
    status, body, _ = call(gateway, "GET", "/v1/audit?since=2026-01-01T00:00:00", key=gateway.admin)
    assert status == 400
    assert body["error"]["code"] == "invalid_audit_query"


def test_audit_verify_reports_intact_chain(gateway: Gateway) -> None:
    status, body, _ = call(gateway, "GET", "/v1/audit/verify", key=gateway.admin)
    assert status == 200
    assert body["ok"] is True
    assert body["checked"] > 0


# --- commands and events --------------------------------------------------------------


def start(gateway: Gateway, command: str, **params: Any) -> str:
    status, body, _ = call(
        gateway, "POST", "/v1/commands", {"command": command, "params": params}, gateway.admin
    )
    assert status == 202, body
    assert body["status"] == "pending"
    return str(body["id"])


def test_command_returns_202_before_it_ends(gateway: Gateway) -> None:
    began = time.monotonic()
    execution_id = start(gateway, "ticker", ticks=5, interval_s=0.5)
    assert time.monotonic() - began < 2.0
    events = list(client(gateway, gateway.admin).watch(execution_id))
    assert [event.event for event in events] == ["tick"] * 5 + ["succeeded"]
    status, body, _ = call(gateway, "GET", f"/v1/executions/{execution_id}", key=gateway.admin)
    assert status == 200
    assert body["status"] == "succeeded"
    assert body["result"] == {"ticks": 5}


def test_failing_command_reports_failed(gateway: Gateway) -> None:
    execution_id = start(gateway, "ticker", ticks=3, interval_s=0, fail_at=2)
    events = list(client(gateway, gateway.admin).watch(execution_id))
    assert [event.event for event in events] == ["tick", "failed"]
    assert "failed at tick 2" in events[-1].data["error"]
    body = client(gateway, gateway.admin).execution(execution_id)
    assert body["status"] == "failed"


def test_unknown_command_is_404(gateway: Gateway) -> None:
    body = {"command": "rm-rf"}
    status, result, _ = call(gateway, "POST", "/v1/commands", body, gateway.admin)
    assert status == 404
    assert result["error"]["code"] == "unknown_command"


def test_command_params_are_validated(gateway: Gateway) -> None:
    body = {"command": "ticker", "params": {"ticks": 0}}
    status, result, _ = call(gateway, "POST", "/v1/commands", body, gateway.admin)
    assert status == 422
    assert result["error"]["field"] == "params.ticks"


def test_analysis_command_counts_tree(gateway: Gateway) -> None:
    execution_id = start(gateway, "analysis", source=str(gateway.analysis_root), batch_size=1)
    events = list(client(gateway, gateway.admin).watch(execution_id))
    kinds = [event.event for event in events]
    assert kinds == ["started", "progress", "progress", "progress", "succeeded"]
    assert events[0].data == {"files": 3, "batches": 3}
    result = events[-1].data["result"]
    assert result["files"] == 3
    assert result["functions"] == 2
    assert result["classes"] == 1
    assert [entry[0] for entry in result["failed"]] == ["broken.py"]


def test_analysis_outside_roots_is_422(gateway: Gateway, tmp_path: Path) -> None:
    body = {"command": "analysis", "params": {"source": str(tmp_path)}}
    status, result, _ = call(gateway, "POST", "/v1/commands", body, gateway.admin)
    assert status == 422
    assert result["error"]["field"] == "params.source"
    assert "ARBOR_GATEWAY_ANALYSIS_ROOTS" in result["error"]["message"]


def test_execution_of_other_key_needs_inspect(gateway: Gateway) -> None:
    execution_id = start(gateway, "ticker", ticks=1, interval_s=0)
    status, body, _ = call(gateway, "GET", f"/v1/executions/{execution_id}", key=gateway.nobody)
    assert status == 403
    assert body["error"]["uri"] == "arbor://command/inspect/ticker"


def test_unknown_execution_is_404(gateway: Gateway) -> None:
    status, body, _ = call(gateway, "GET", "/v1/executions/nope/events", key=gateway.admin)
    assert status == 404
    assert body["error"]["code"] == "execution_not_found"


def collect(gateway: Gateway, execution_id: str, into: list[ServerSentEvent]) -> None:
    into.extend(client(gateway, gateway.admin).watch(execution_id))


def test_two_watchers_see_same_events(gateway: Gateway) -> None:
    execution_id = start(gateway, "ticker", ticks=6, interval_s=0.2)
    first: list[ServerSentEvent] = []
    second: list[ServerSentEvent] = []
    threads = [
        threading.Thread(target=collect, args=(gateway, execution_id, events))
        for events in (first, second)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert [event.id for event in first] == list(range(1, 8))
    assert first == second


def raw_events(gateway: Gateway, execution_id: str, last_id: int | None, count: int) -> list[str]:
    """Read up to ``count`` events from one connection, then drop the connection."""
    request = urllib.request.Request(f"{gateway.url}/v1/executions/{execution_id}/events")
    request.add_header("Authorization", f"Bearer {gateway.admin}")
    if last_id is not None:
        request.add_header("Last-Event-ID", str(last_id))
    ids = []
    with urllib.request.urlopen(request, timeout=60) as response:
        for raw in response:
            line = raw.decode().strip()
            if line.startswith("id: "):
                ids.append(line[4:])
                if len(ids) == count:
                    break
    return ids


def test_disconnect_and_resume_with_last_event_id(gateway: Gateway) -> None:
    execution_id = start(gateway, "ticker", ticks=6, interval_s=0.2)
    before = raw_events(gateway, execution_id, None, 2)
    assert before == ["1", "2"]
    after = raw_events(gateway, execution_id, 2, 100)
    assert after == ["3", "4", "5", "6", "7"]


def test_malformed_last_event_id_is_422(gateway: Gateway) -> None:
    execution_id = start(gateway, "ticker", ticks=1, interval_s=0)
    status, body, _ = call(
        gateway,
        "GET",
        f"/v1/executions/{execution_id}/events",
        key=gateway.admin,
        headers={"Last-Event-ID": "abc"},
    )
    assert status == 422
    assert body["error"]["field"] == "Last-Event-ID"


def test_stream_survives_killed_replica(gateway: Gateway) -> None:
    execution_id = start(gateway, "ticker", ticks=25, interval_s=0.2)
    events: list[ServerSentEvent] = []
    watcher = threading.Thread(target=collect, args=(gateway, execution_id, events))
    watcher.start()
    deadline = time.monotonic() + 30
    while len(events) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(events) >= 3
    replicas = [
        entry["name"]
        for entry in ray.util.list_named_actors(all_namespaces=True)
        if "SERVE_REPLICA" in entry["name"] and "Gateway" in entry["name"]
    ]
    assert len(replicas) == 1
    ray.kill(ray.get_actor(replicas[0], namespace="serve"), no_restart=True)
    watcher.join(timeout=120)
    assert not watcher.is_alive()
    assert [event.id for event in events] == list(range(1, 27))
    assert events[-1].event == "succeeded"
    wait_until_ready(gateway.url)


# --- HTTP client and CLI --------------------------------------------------------------


def test_client_maps_errors_to_classes(gateway: Gateway) -> None:
    admin = client(gateway, gateway.admin)
    with pytest.raises(arbor.AgentNotFound) as missing:
        admin.info("gw/absent")
    assert missing.value.name == "gw/absent"
    spawn(gateway, "gw/dup")
    with pytest.raises(arbor.NameTaken):
        admin.spawn("counter", "gw/dup")
    with pytest.raises(arbor.CapabilityDenied) as denied:
        client(gateway, gateway.nobody).get("gw/dup").ask("get")
    assert denied.value.uri == "arbor://agent/ask/gw/dup"
    with pytest.raises(arbor.InvalidAgentName):
        admin.info("bad name")
    with pytest.raises(arbor.errors.InvalidApiKey):
        client(gateway, "arbor_0000000000000000_" + "B" * 43).list_agents()


def test_client_spawn_ask_send_stop(gateway: Gateway) -> None:
    admin = client(gateway, gateway.admin)
    ref = admin.spawn("counter", "gw/client", start=2, num_cpus=0)
    assert ref.ask("add", 3) == 5
    assert isinstance(ref.send("add", 1), str)
    assert admin.info("gw/client").status == "running"
    admin.stop("gw/client", purge=True)
    with pytest.raises(arbor.AgentNotFound):
        admin.info("gw/client")


def test_client_to_closed_port_is_cluster_unavailable() -> None:
    with pytest.raises(arbor.ClusterUnavailable):
        arbor.connect(f"http://127.0.0.1:{free_port()}", api_key="x").healthz()


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "arbor.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_keys_create_list_revoke(gateway: Gateway, module_pg_url: str) -> None:
    env = {"ARBOR_DATABASE_URL": module_pg_url}
    created = run_cli("keys", "create", "cli-key", env=env)
    assert created.returncode == 0, created.stderr
    key = next(line.split()[1] for line in created.stdout.splitlines() if line.startswith("key:"))
    key_id = key.split("_")[1]
    listed = run_cli("keys", "list", "--json", env=env)
    assert key_id in [row["id"] for row in json.loads(listed.stdout)]
    assert key not in listed.stdout
    assert call(gateway, "GET", "/v1/agent-types", key=key)[0] == 200
    revoked = run_cli("keys", "revoke", key_id, env=env)
    assert revoked.returncode == 0, revoked.stderr
    again = run_cli("keys", "revoke", key_id, env=env)
    assert again.returncode == 1
    assert "no valid API key" in again.stderr


def test_cli_agents_ask_watch_over_http(gateway: Gateway) -> None:
    spawn(gateway, "gw/cli", start=40)
    env = {"ARBOR_API_KEY": gateway.admin, "ARBOR_URL": gateway.url}
    reply = run_cli("ask", "gw/cli", "add", "2", env=env)
    assert reply.returncode == 0, reply.stderr
    assert reply.stdout.strip() == "42"
    agents = run_cli("agents", "--url", gateway.url, env=env)
    assert agents.returncode == 0, agents.stderr
    assert "gw/cli" in agents.stdout
    execution_id = start(gateway, "ticker", ticks=2, interval_s=0)
    watched = run_cli("watch", execution_id, env=env)
    assert watched.returncode == 0, watched.stderr
    assert [line.split()[1] for line in watched.stdout.splitlines()] == [
        "tick",
        "tick",
        "succeeded",
    ]


def test_cli_ask_without_capability_prints_one_error(gateway: Gateway) -> None:
    env = {"ARBOR_API_KEY": gateway.nobody, "ARBOR_URL": gateway.url}
    denied = run_cli("ask", "gw/cli", "get", env=env)
    assert denied.returncode == 1
    assert "arbor://agent/ask/gw/cli" in denied.stderr


def test_cli_up_joins_and_reports_gateway(gateway: Gateway, module_pg_url: str) -> None:
    env = {
        **ENVIRONMENT,
        "ARBOR_RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "ARBOR_DATABASE_URL": module_pg_url,
    }
    up = run_cli("up", "--port", str(free_port()), env=env)
    assert up.returncode == 0, up.stderr
    assert "joined the running Ray cluster" in up.stdout
    assert f"gateway:      {gateway.url} " in up.stdout
    wait_until_ready(gateway.url)


# --- schemathesis -----------------------------------------------------------------------


def test_generated_requests_get_no_5xx_or_schema_violation(gateway: Gateway) -> None:
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, seed, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(gateway.url + "/v1/openapi.json")
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    headers = {"Authorization": f"Bearer {gateway.fuzz}"}
    cases = 0
    for result in schema.get_all_operations():
        operation = result.ok()

        @seed(20261204)
        @settings(
            max_examples=45,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def check(case: Any) -> None:
            nonlocal cases
            cases += 1
            case.call_and_validate(base_url=gateway.url, headers=headers, checks=checks)

        check()
    assert cases >= 500


def test_malformed_body_without_key_is_401(gateway: Gateway) -> None:
    status, result, headers = call(gateway, "POST", "/v1/agents", {"bogus": 1})
    assert status == 401
    assert result["error"]["code"] == "unauthorized"
    assert headers.get("www-authenticate") == "Bearer"


def test_requests_are_counted_in_the_metrics_export(gateway: Gateway) -> None:
    from arbor.observability import summary

    for _ in range(3):
        call(gateway, "GET", "/v1/agent-types")
    urls = [
        f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        for node in ray.nodes()
        if node["Alive"]
    ]
    deadline = time.monotonic() + 60
    counted = 0.0
    while time.monotonic() < deadline:
        counted = summary.read_exports(urls).totals.get("ray_arbor_gateway_requests_total", 0.0)
        if counted >= 3:
            break
        time.sleep(1)
    assert counted >= 3


# --- namespaces -----------------------------------------------------------------------


def test_namespaced_agents_take_full_names_and_need_capabilities_naming_them(
    gateway: Gateway,
) -> None:
    tenant = new_key(gateway.store, "tenant", "arbor://agent/*/team-a:gw/**")
    body = {"type": "counter", "name": "team-a:gw/n1", "kwargs": {"start": 5}}
    status, spawned, _ = call(gateway, "POST", "/v1/agents", body, tenant)
    assert status == 201, spawned
    assert spawned["name"] == "team-a:gw/n1"

    message = {"handler": "add", "args": [1]}
    path = "/v1/agents/team-a:gw/n1/messages"
    status, result, _ = call(gateway, "POST", path, message, tenant)
    assert (status, result["reply"]) == (200, 6)

    # The admin key's patterns are written without a namespace, so they cover 'default'.
    status, result, _ = call(gateway, "POST", path, message, gateway.admin)
    assert status == 403
    assert result["error"]["uri"] == "arbor://agent/ask/team-a:gw/n1"

    status, result, _ = call(gateway, "GET", "/v1/agents/Team_A:gw/n1", None, tenant)
    assert status == 400
    assert "names an invalid namespace" in result["error"]["message"]
    arbor.stop("team-a:gw/n1", purge=True)
