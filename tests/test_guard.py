"""The bypass cases through the runtime's checker: each one is denied and audited."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from arbor.config import Settings
from arbor.errors import CapabilityDenied
from arbor.persistence import CheckpointStore, open_store
from arbor.registry.security import CapabilityService, GrantRequest
from arbor.runtime.guard import Guard, Wallet
from arbor.security import CapabilityAuthority, delegate, generate_keypair

TARGET = "arbor://agent/ask/workers/7"


@pytest.fixture
def store(sqlite_url: str) -> Iterator[CheckpointStore]:
    opened = open_store(sqlite_url, Settings(database_url=sqlite_url))
    yield opened
    opened.close()


@pytest.fixture
def service(store: CheckpointStore, sqlite_url: str) -> Iterator[CapabilityService]:
    settings = Settings(database_url=sqlite_url, audit_flush_interval_s=60)
    keys = generate_keypair()
    store.store_signing_key(keys.public_key, keys.private_key)
    # A guard of its own, so each test starts with an empty revocation list.
    created = CapabilityService(store, settings, guard=Guard(store, settings))
    yield created
    created.guard.close()


def denials(store: CheckpointStore, principal: str) -> list[str]:
    return [
        str(entry.detail.get("reason"))
        for entry in store.list_audit(principal=principal, decision="denied", limit=100)
    ]


def grant(service: CapabilityService, principal: str, **terms: object) -> str:
    request = GrantRequest.parse({"pattern": "arbor://agent/ask/workers/*", **terms})
    info = service.grant(principal, request)
    record = service.store.get_capability(info.id)
    assert record is not None
    return record.token


def test_missing_token_is_denied_and_audited(
    service: CapabilityService, store: CheckpointStore
) -> None:
    decision = service.guard.check(None, "planner", TARGET)
    assert not decision.allowed
    assert denials(store, "planner") == ["no capability was presented for it"]


def test_token_of_another_authority_is_denied(
    service: CapabilityService, store: CheckpointStore
) -> None:
    outsider = CapabilityAuthority(generate_keypair().private_key)
    forged = outsider.issue(
        "planner", "arbor://agent/*/**", expires_at=datetime.now(UTC) + timedelta(days=1)
    )
    assert not service.guard.check(forged.to_string(), "planner", TARGET).allowed
    assert "does not verify" in denials(store, "planner")[0]


def test_altered_token_is_denied(service: CapabilityService, store: CheckpointStore) -> None:
    token = grant(service, "planner")
    altered = token[:40] + ("A" if token[40] != "A" else "B") + token[41:]
    assert not service.guard.check(altered, "planner", TARGET).allowed
    assert len(denials(store, "planner")) == 1


def test_expired_token_is_denied_with_the_clock_moved(
    service: CapabilityService, store: CheckpointStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = grant(service, "planner", expires_at=datetime.now(UTC) + timedelta(minutes=5))
    assert service.guard.check(token, "planner", TARGET).allowed
    later = datetime.now(UTC) + timedelta(minutes=6)
    monkeypatch.setattr(service.guard.verifier, "_clock", later.timestamp)
    assert not service.guard.check(token, "planner", TARGET).allowed
    assert "expired" in denials(store, "planner")[0]


def test_token_under_a_revoked_parent_is_denied(
    service: CapabilityService, store: CheckpointStore
) -> None:
    parent = service.grant(
        "planner", GrantRequest.parse({"pattern": "arbor://agent/ask/workers/**", "depth": 1})
    )
    child = service.delegate("planner", parent.id, "helper", GrantRequest(pattern=TARGET))
    child_token = store.get_capability(child.id).token  # type: ignore[union-attr]
    assert service.guard.check(child_token, "helper", TARGET).allowed
    # Another process learns of the revocation through the store, as an agent's guard does.
    settings = service.settings
    other = Guard(store, settings)
    try:
        service.revoke(parent.id)
        assert other.poll_revocations() == 2
        assert not other.check(child_token, "helper", TARGET).allowed
    finally:
        other.close()
    assert "revoked" in denials(store, "helper")[0]


def test_widening_delegation_is_denied_and_audited(
    service: CapabilityService, store: CheckpointStore
) -> None:
    parent = service.grant(
        "planner", GrantRequest.parse({"pattern": "arbor://agent/ask/workers/*", "depth": 1})
    )
    wider_operations = GrantRequest(pattern="arbor://agent/*/workers/*", operations=("ask", "send"))
    wider_path = GrantRequest(pattern="arbor://agent/ask/**")
    for request in (wider_operations, wider_path):
        with pytest.raises(CapabilityDenied):
            service.delegate("planner", parent.id, "helper", request)
    depth_request = GrantRequest.parse({"pattern": TARGET, "depth": 5})
    with pytest.raises(CapabilityDenied):
        service.delegate("planner", parent.id, "helper", depth_request)
    assert len(denials(store, "planner")) == 3


@pytest.mark.parametrize(
    "uri",
    [
        "arbor://agent/ask/workers/../admin",
        "arbor://agent/ask/workers/%2e%2e/admin",
        "arbor://agent/ask/workers//7",
        "arbor://AGENT/ask/workers/7",
        "arbor://agent/ask/workers/7\x00",
    ],
)
def test_traversal_and_encoding_tricks_are_denied(
    service: CapabilityService, store: CheckpointStore, uri: str
) -> None:
    token = grant(service, "planner")
    assert not service.guard.check(token, "planner", uri).allowed
    assert len(denials(store, "planner")) == 1


def test_use_beyond_max_uses_is_denied(service: CapabilityService, store: CheckpointStore) -> None:
    token = grant(service, "planner", max_uses=2)
    assert service.guard.check(token, "planner", TARGET).allowed
    assert service.guard.check(token, "planner", TARGET).allowed
    assert not service.guard.check(token, "planner", TARGET).allowed
    assert len(denials(store, "planner")) == 1


def test_caller_not_on_the_allowed_list_is_denied(
    service: CapabilityService, store: CheckpointStore
) -> None:
    token = grant(service, "planner", allowed_callers=["alice"])
    assert service.guard.check(token, "planner", TARGET, caller="alice").allowed
    assert not service.guard.check(token, "planner", TARGET, caller="mallory").allowed
    assert len(denials(store, "planner")) == 1


def test_token_presented_by_another_principal_is_denied(
    service: CapabilityService, store: CheckpointStore
) -> None:
    token = grant(service, "planner")
    assert not service.guard.check(token, "thief", TARGET).allowed
    assert len(denials(store, "thief")) == 1


def test_stopped_agent_wallet_has_nothing_to_present(
    service: CapabilityService, store: CheckpointStore
) -> None:
    grant(service, "worker")
    wallet = Wallet("worker", service.guard)
    assert wallet.token_for(TARGET) is not None
    service.revoke_principal("worker")
    assert wallet.token_for(TARGET) is None


def test_offline_delegation_stays_bounded(
    service: CapabilityService,
) -> None:
    token = service.guard.verifier.load(grant(service, "planner", depth=1))
    narrowed = delegate(token, "helper", TARGET)
    assert service.guard.check(narrowed.to_string(), "helper", TARGET).allowed
    assert not service.guard.check(
        narrowed.to_string(), "helper", "arbor://agent/ask/workers/8"
    ).allowed
