"""Gateway parts that need no Ray: API keys, allow-lists, principal paths, store tables."""

from __future__ import annotations

import pytest

from arbor.config import Settings
from arbor.errors import ArborError, ConfigError, InvalidAgentName, InvalidApiKey
from arbor.gateway.auth import principal_path
from arbor.gateway.keys import create_api_key, hash_secret, parse_key, secret_matches
from arbor.gateway.registration import agent_types, commands, register_type
from arbor.persistence import open_store
from arbor.persistence.gateway import FAILED, PENDING, SUCCEEDED, ExecutionRecord
from tests.agents import Counter


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, sqlite_url: str) -> str:
    if request.param == "sqlite":
        return sqlite_url
    return str(request.getfixturevalue("pg_url"))


def test_key_round_trip(sqlite_url: str) -> None:
    store = open_store(sqlite_url)
    created = create_api_key(store, "ci")
    key_id, secret = parse_key(created.key)
    assert key_id == created.record.id
    stored = store.get_api_key(key_id)
    assert stored is not None
    assert secret_matches(secret, stored.secret_hash)
    assert not secret_matches(secret[:-1] + "x", stored.secret_hash)
    assert created.key not in repr(created)
    store.close()


def test_same_secret_hashes_differently() -> None:
    assert hash_secret("s") != hash_secret("s")


def test_malformed_hash_never_matches() -> None:
    assert not secret_matches("s", "md5$abc")
    assert not secret_matches("s", "scrypt$x$8$1$00$00")


@pytest.mark.parametrize("text", ["", "arbor_", "arbor_XYZ_abc", "Bearer arbor_1_2", "a" * 500])
def test_parse_key_rejects_malformed(text: str) -> None:
    with pytest.raises(InvalidApiKey):
        parse_key(text)


@pytest.mark.parametrize("name", ["", "x" * 201, "tab\there"])
def test_create_key_rejects_bad_name(sqlite_url: str, name: str) -> None:
    store = open_store(sqlite_url)
    with pytest.raises(ArborError):
        create_api_key(store, name)
    store.close()


def test_key_list_and_revoke(store_url: str) -> None:
    store = open_store(store_url)
    first = create_api_key(store, "one")
    second = create_api_key(store, "two")
    assert store.revoke_api_key(first.record.id)
    assert not store.revoke_api_key(first.record.id)
    assert [key.id for key in store.list_api_keys()] == [second.record.id]
    assert len(store.list_api_keys(include_revoked=True)) == 2
    store.close()


def test_execution_events_keep_order(store_url: str) -> None:
    from datetime import UTC, datetime

    store = open_store(store_url)
    now = datetime.now(UTC)
    store.create_execution(
        ExecutionRecord("e1", "ticker", "key:ab", {"n": 1}, PENDING, None, None, now, now)
    )
    assert store.append_execution_event("e1", "tick", {"value": 1.5e300}) == 1
    assert store.append_execution_event("e1", "tick", {"text": "\u0000"}) == 2
    assert store.append_execution_event("e1", SUCCEEDED, {"result": 3}) == 3
    events = store.list_execution_events("e1", after_seq=1)
    assert [event.seq for event in events] == [2, 3]
    assert events[0].data == {"text": "\u0000"}
    assert store.list_execution_events("e1")[0].data == {"value": 1.5e300}
    store.finish_execution("e1", FAILED, error="boom")
    record = store.get_execution("e1")
    assert record is not None
    assert (record.status, record.error, record.params) == (FAILED, "boom", {"n": 1})
    assert store.get_execution("missing") is None
    store.close()


def test_principal_path_of_key_and_agent() -> None:
    assert principal_path("key:0123456789abcdef") == "key/0123456789abcdef"
    assert principal_path("workers/7") == "workers/7"


@pytest.mark.parametrize("principal", ["key:XYZ", "key:", "../x", "a b", "arbor-registry"])
def test_principal_path_rejects_invalid(principal: str) -> None:
    with pytest.raises(InvalidAgentName):
        principal_path(principal)


def test_agent_types_from_setting_and_registration() -> None:
    settings = Settings(gateway_agent_types="a=mod:A, b=mod:B")
    register_type("counter-unit", Counter)
    types = agent_types(settings)
    assert types["a"] == "mod:A"
    assert types["b"] == "mod:B"
    assert types["counter-unit"] == "tests.agents:Counter"


@pytest.mark.parametrize("value", ["noequals", "a=nocolon", "bad name=m:C"])
def test_agent_types_setting_rejects_malformed(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        agent_types(Settings(gateway_agent_types=value))
    assert "ARBOR_GATEWAY_AGENT_TYPES" in str(caught.value)


def test_register_type_rejects_non_agent() -> None:
    with pytest.raises(ConfigError):
        register_type("dict", dict)  # type: ignore[arg-type]


def test_analysis_command_always_registered() -> None:
    assert commands(Settings())["analysis"] == "arbor.gateway.analysis:run_analysis"
