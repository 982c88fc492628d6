"""The capability, revocation and signing key tables, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from arbor.persistence import CheckpointStore, open_store
from arbor.persistence.capabilities import CapabilityRecord
from tests.test_store import store_settings


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest) -> Iterator[CheckpointStore]:
    fixture = "sqlite_url" if request.param == "sqlite" else "pg_url"
    url = str(request.getfixturevalue(fixture))
    opened = open_store(url, store_settings(url))
    yield opened
    opened.close()


def record(capability_id: str, principal: str, parent: str | None = None) -> CapabilityRecord:
    now = datetime.now(UTC).replace(microsecond=0)
    return CapabilityRecord(
        id=capability_id,
        principal=principal,
        parent_id=parent,
        pattern="arbor://agent/send/workers/**",
        operations=("send",),
        token=f"token-{capability_id}",
        granted_by="operator",
        created_at=now,
        expires_at=now + timedelta(days=1),
    )


def test_saved_capability_reads_back(store: CheckpointStore) -> None:
    saved = record("a1", "coordinator")
    store.save_capability(saved)
    loaded = store.get_capability("a1")
    assert loaded == saved
    assert store.get_capability("missing") is None
    assert [cap.id for cap in store.list_capabilities("coordinator")] == ["a1"]
    assert store.list_capabilities("nobody") == []


def test_revocation_cascades_to_delegated_tokens(store: CheckpointStore) -> None:
    store.save_capability(record("root", "coordinator"))
    store.save_capability(record("child", "worker", parent="root"))
    store.save_capability(record("grandchild", "helper", parent="child"))
    store.save_capability(record("other", "coordinator"))

    revoked = store.revoke_capabilities(["root"])

    assert sorted(revoked) == ["child", "grandchild", "root"]
    assert [cap.id for cap in store.list_capabilities()] == ["other"]
    assert store.get_capability("grandchild").revoked_at is not None  # type: ignore[union-attr]
    assert [token for _, token in store.revocations_since(0)] == revoked
    # A second revocation of the same tokens records nothing new.
    assert store.revoke_capabilities(["root"]) == []


def test_revoking_a_principal_revokes_all_it_holds(store: CheckpointStore) -> None:
    store.save_capability(record("p1", "planner"))
    store.save_capability(record("p2", "planner"))
    store.save_capability(record("d1", "worker", parent="p2"))
    store.save_capability(record("x1", "auditor"))

    assert sorted(store.revoke_capabilities(principal="planner")) == ["d1", "p1", "p2"]
    assert [cap.id for cap in store.list_capabilities()] == ["x1"]


def test_revocations_since_returns_only_newer_rows(store: CheckpointStore) -> None:
    store.save_capability(record("r1", "a"))
    store.save_capability(record("r2", "b"))
    store.revoke_capabilities(["r1"])
    ((first_seq, first),) = store.revocations_since(0)
    store.revoke_capabilities(["r2"])
    assert first == "r1"
    assert [token for _, token in store.revocations_since(first_seq)] == ["r2"]


def test_first_signing_key_wins_unless_replaced(store: CheckpointStore) -> None:
    assert store.signing_key() is None
    assert store.store_signing_key("public-1", "private-1") == ("public-1", "private-1")
    assert store.store_signing_key("public-2", "private-2") == ("public-1", "private-1")
    assert store.store_signing_key("public-3", None, replace=True) == ("public-3", None)
    assert store.signing_key() == ("public-3", None)


def test_record_repr_hides_the_token(store: CheckpointStore) -> None:
    assert "token-" not in repr(record("secret-id", "holder"))
