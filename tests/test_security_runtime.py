"""Capabilities enforced on a real cluster: messages, spawns, stops, secrets and the audit log."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import ray

import arbor
from arbor.config import reset_settings
from arbor.messages import Envelope, Reply
from arbor.persistence import CheckpointStore, open_store
from arbor.runtime.ref import find_actor
from arbor.security import CapabilityAuthority, generate_keypair
from tests.agents import Counter, Delegator, Parent
from tests.conftest import PLACEMENTS, arbor_cluster

SECRET_VALUE = "correct-horse-battery-staple"


@pytest.fixture(scope="module", autouse=True, params=PLACEMENTS)
def cluster(request: pytest.FixtureRequest) -> Iterator[str]:
    with arbor_cluster(request.param, {"ARBOR_AUDIT_FLUSH_INTERVAL_S": "0.5"}) as url:
        yield url
    reset_settings()


@pytest.fixture(scope="module")
def store(cluster: str) -> Iterator[CheckpointStore]:
    opened = open_store(cluster)
    yield opened
    opened.close()


def denied_rows(store: CheckpointStore, principal: str) -> list[str]:
    return [
        entry.resource
        for entry in store.list_audit(principal=principal, decision="denied", limit=1000)
    ]


def test_agent_without_capability_cannot_ask(store: CheckpointStore) -> None:
    arbor.spawn(Counter, "sec/target", start=4)
    asker = arbor.spawn(Delegator, "sec/asker")
    with pytest.raises(arbor.HandlerError) as caught:
        asker.ask("ask_other", "sec/target", "get")
    assert caught.value.error_type == "arbor.errors.CapabilityDenied"
    assert "'sec/asker' may not ask on arbor://agent/ask/sec/target" in str(caught.value)
    assert "arbor://agent/ask/sec/target" in denied_rows(store, "sec/asker")


def test_receiver_denies_forged_and_missing_tokens(store: CheckpointStore) -> None:
    arbor.spawn(Counter, "sec/guarded")
    # The raw handle of the agent's actor, or of its host for a hosted agent.
    handle = find_actor("sec/guarded")
    outsider = CapabilityAuthority(generate_keypair().private_key)
    forged = outsider.issue(
        "sec/forger", "arbor://agent/*/sec/**", expires_at=datetime.now(UTC) + timedelta(days=1)
    ).to_string()
    for headers in ({}, {"capability": forged}, {"capability": "not-a-token"}):
        envelope = Envelope("add", (1,), sender="sec/forger", headers=headers)
        reply = ray.get(handle.handle.remote(envelope.to_wire()))
        assert isinstance(reply, Reply)
        assert reply.error is not None and reply.error.kind == "denied"
        assert isinstance(reply.exception, arbor.CapabilityDenied)
        assert reply.exception.principal == "sec/forger"
    assert arbor.get("sec/guarded").ask("get") == 0
    assert len(denied_rows(store, "sec/forger")) >= 3


def test_granted_capability_allows_until_revoked() -> None:
    arbor.spawn(Counter, "sec/counted", start=1)
    asker = arbor.spawn(Delegator, "sec/granted")
    granted = arbor.grant("sec/granted", "arbor://agent/ask/sec/counted")
    assert asker.ask("ask_other", "sec/counted", "get") == 1

    assert arbor.revoke(granted.id) == [granted.id]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            asker.ask("ask_other", "sec/counted", "get")
        except arbor.HandlerError as error:
            assert error.error_type == "arbor.errors.CapabilityDenied"
            break
        time.sleep(0.05)
    else:
        pytest.fail("the revoked capability was still honoured after 10 s")
    assert arbor.capabilities("sec/granted") == []
    (revoked,) = arbor.capabilities("sec/granted", include_revoked=True)
    assert revoked.revoked_at is not None


def test_spawn_grants_only_what_the_spawner_holds() -> None:
    parent = arbor.spawn(
        Delegator,
        "sec/parent",
        capabilities=[{"pattern": "arbor://agent/*/sec/kids/**", "depth": 1}],
    )
    (held,) = parent.ask("held")
    assert parent.ask("spawn_child", "sec/kids/a", ["arbor://agent/send/sec/kids/b"]) == (
        "sec/kids/a"
    )
    (child_cap,) = arbor.capabilities("sec/kids/a")
    assert child_cap.parent_id == held["id"]
    assert child_cap.granted_by == "sec/parent"

    with pytest.raises(arbor.HandlerError, match="CapabilityDenied"):
        parent.ask("spawn_child", "sec/kids/c", ["arbor://agent/send/sec/elsewhere"])
    with pytest.raises(arbor.AgentNotFound):
        arbor.get("sec/kids/c")
    with pytest.raises(arbor.HandlerError, match="may not spawn on arbor://agent/spawn/sec/x"):
        parent.ask("spawn_child", "sec/x", [])


def test_delegation_from_an_agent_only_narrows() -> None:
    holder = arbor.spawn(
        Delegator,
        "sec/holder",
        capabilities=[{"pattern": "arbor://agent/ask/sec/pool/**", "depth": 1}],
    )
    (held,) = holder.ask("held")
    narrower = holder.ask("delegate", held["id"], "sec/friend", "arbor://agent/ask/sec/pool/1")
    (friend_cap,) = arbor.capabilities("sec/friend")
    assert friend_cap.id == narrower
    assert friend_cap.pattern == "arbor://agent/ask/sec/pool/1"
    with pytest.raises(arbor.HandlerError, match="CapabilityDenied"):
        holder.ask("delegate", held["id"], "sec/friend", "arbor://agent/*/sec/**")

    # Revoking the held capability takes the delegated one with it.
    assert sorted(holder.ask("revoke", held["id"])) == sorted([held["id"], narrower])
    assert arbor.capabilities("sec/friend") == []


def test_stopping_an_agent_revokes_its_capabilities() -> None:
    arbor.spawn(Counter, "sec/stopped", capabilities=["arbor://agent/send/sec/target"])
    assert len(arbor.capabilities("sec/stopped")) == 1
    arbor.stop("sec/stopped")
    assert arbor.capabilities("sec/stopped") == []


def test_stop_from_an_agent_needs_the_stop_right() -> None:
    arbor.spawn(Counter, "sec/victim")
    stopper = arbor.spawn(Delegator, "sec/stopper")
    with pytest.raises(arbor.HandlerError, match="may not stop on arbor://agent/stop/sec/victim"):
        stopper.ask("stop_other", "sec/victim")
    assert arbor.get("sec/victim").ask("get") == 0
    arbor.grant("sec/stopper", "arbor://agent/stop/sec/victim")
    stopper.ask("stop_other", "sec/victim")
    with pytest.raises(arbor.AgentNotFound):
        arbor.get("sec/victim").ask("get")


def test_secret_read_needs_capability(
    store: CheckpointStore,
) -> None:
    environment = {"env_vars": {"ARBOR_SECRET_DB_PASSWORD": SECRET_VALUE}}
    reader = arbor.spawn(Delegator, "sec/reader", runtime_env=environment)
    with pytest.raises(arbor.HandlerError, match="may not read on arbor://secret/read/db/password"):
        reader.ask("read_secret", "db/password")
    arbor.grant("sec/reader", "arbor://secret/read/db/password")
    assert reader.ask("read_secret", "db/password") == SECRET_VALUE

    checkpoint = store.load_checkpoint("sec/reader")
    assert checkpoint is not None and SECRET_VALUE not in repr(checkpoint)
    rows = store.list_audit(limit=10_000)
    assert all(SECRET_VALUE not in repr(row) for row in rows)
    assert all(SECRET_VALUE not in repr(info) for info in arbor.list_agents())


def test_audit_log_records_the_security_events(store: CheckpointStore) -> None:
    arbor.spawn(Parent, "sec/audited", capabilities=["arbor://agent/ask/sec/target"])
    arbor.stop("sec/audited")
    actions = {(entry.action, entry.decision) for entry in store.list_audit(limit=10_000)}
    for expected in (
        ("spawn", "allowed"),
        ("stop", "allowed"),
        ("grant", "allowed"),
        ("delegate", "allowed"),
        ("revoke", "allowed"),
        ("ask", "denied"),
    ):
        assert expected in actions
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if store.list_audit(action="allow_count", limit=1):
            break
        time.sleep(0.1)
    assert store.list_audit(action="allow_count", limit=1)
    verification = store.verify_audit()
    assert verification.ok, verification
