"""Capability tokens: issuing, delegation, verification, and a bypass suite of denials.

Every bypass case runs with each verifier engine: ``python`` evaluates the block terms,
``biscuit`` runs the Biscuit authorizer on the token's Datalog checks, ``both`` runs both.
"""

from __future__ import annotations

import base64
import itertools
import logging
from datetime import datetime, timedelta, timezone

import biscuit_auth
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from arbor.errors import CapabilityDenied, InvalidCapability
from arbor.security import (
    CapabilityAuthority,
    CapabilityToken,
    CapabilityVerifier,
    Decision,
    delegate,
    generate_keypair,
)
from arbor.security.blocks import MAX_DEPTH, block_datalog, make_block
from arbor.security.verifier import BISCUIT_MAX_TIME, ENGINES

START = datetime(2030, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
EXPIRES = START + timedelta(hours=1)
KEYS = generate_keypair()
AUTHORITY = CapabilityAuthority(KEYS.private_key)


class FakeClock:
    """A clock that tests move by hand, in Unix seconds."""

    def __init__(self, start: datetime = START) -> None:
        self.now = start.timestamp()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=ENGINES)
def verifier(request: pytest.FixtureRequest, clock: FakeClock) -> CapabilityVerifier:
    return CapabilityVerifier(KEYS.public_key, clock=clock, engine=request.param)


def issue_workers(**options: object) -> CapabilityToken:
    """Issue 'coordinator' send and ask on every agent under workers/."""
    arguments: dict[str, object] = {"expires_at": EXPIRES, "depth": 2}
    arguments.update(options)
    return AUTHORITY.issue(
        "coordinator",
        "arbor://agent/*/workers/**",
        ["send", "ask"],
        **arguments,  # type: ignore[arg-type]
    )


def assert_denied(decision: Decision, reason_part: str) -> None:
    assert decision.allowed is False
    assert not decision
    assert reason_part in decision.reason, decision.reason
    with pytest.raises(CapabilityDenied) as caught:
        decision.raise_if_denied()
    assert caught.value.principal == decision.principal
    assert caught.value.uri == decision.resource
    assert caught.value.missing == decision.right


# Issuing and checking


def test_issued_token_allows_its_pattern(verifier: CapabilityVerifier) -> None:
    token = issue_workers()
    decision = verifier.check(token, "coordinator", "arbor://agent/send/workers/eu/7")
    assert decision.allowed is True
    assert decision.token_id == token.id
    assert decision.right == "send"
    assert verifier.check(token, "coordinator", "arbor://agent/ask/workers/7").allowed is True


def test_issued_token_properties() -> None:
    token = issue_workers(max_uses=5, allowed_callers=["gateway"])
    assert token.principal == "coordinator"
    assert str(token.pattern) == "arbor://agent/*/workers/**"
    assert token.operations == frozenset({"send", "ask"})
    assert token.expires_at == EXPIRES
    assert token.depth == 2
    assert token.max_uses == 5
    assert token.allowed_callers == frozenset({"gateway"})
    assert token.parent_id is None
    assert token.revocation_ids == (token.id,)
    assert len(token.id) == 128


def test_token_string_round_trip() -> None:
    token = issue_workers(max_uses=3)
    child = delegate(token, "worker-pool", "arbor://agent/send/workers/eu/*")
    loaded = CapabilityToken.from_string(child.to_string(), KEYS.public_key)
    assert loaded.revocation_ids == child.revocation_ids
    assert loaded.blocks == child.blocks
    assert loaded.parent_id == token.id


def test_repr_hides_token_string_and_private_key() -> None:
    token = issue_workers()
    assert token.to_string() not in repr(token)
    assert token.id[:16] in repr(token)
    assert KEYS.private_key not in repr(KEYS)
    assert KEYS.private_key not in repr(AUTHORITY)
    assert KEYS.public_key in repr(AUTHORITY)


def test_decision_message_names_principal_uri_and_right(verifier: CapabilityVerifier) -> None:
    token = issue_workers()
    decision = verifier.check(token, "coordinator", "arbor://agent/stop/workers/7")
    assert decision.allowed is False
    assert "'coordinator'" in decision.message
    assert "arbor://agent/stop/workers/7" in decision.message
    assert "may not stop" in decision.message
    with pytest.raises(CapabilityDenied, match="'coordinator' may not stop on arbor://agent/"):
        verifier.require(token, "coordinator", "arbor://agent/stop/workers/7")


def test_capability_denied_pickles_with_reason() -> None:
    import pickle

    error = CapabilityDenied("bob", "arbor://agent/send/x", "send", "the token expired")
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error)
    assert copy.reason == "the token expired"


# Bypass suite: every case is denied.


def test_forged_token_string_denied(verifier: CapabilityVerifier) -> None:
    forged = base64.urlsafe_b64encode(b"\x08" * 200).decode()
    decision = verifier.check(forged, "coordinator", "arbor://agent/send/workers/7")
    assert_denied(decision, "the token is invalid")


def test_token_resigned_with_other_key_denied(verifier: CapabilityVerifier) -> None:
    other = CapabilityAuthority(generate_keypair().private_key)
    token = other.issue(
        "coordinator", "arbor://agent/*/workers/**", ["send"], expires_at=EXPIRES, depth=2
    )
    decision = verifier.check(token, "coordinator", "arbor://agent/send/workers/7")
    assert_denied(decision, "does not verify with public key")
    assert decision.token_id is None


def test_tampered_token_bytes_denied(verifier: CapabilityVerifier) -> None:
    token = AUTHORITY.issue(
        "alice", "arbor://agent/send/workers/*", expires_at=EXPIRES, allowed_callers=["gw"]
    )
    raw = base64.urlsafe_b64decode(token.to_string() + "==")
    # The holder's name is in the signed block twice, as a symbol and inside the terms.
    # Renaming both keeps the block consistent, so only the signature can fail.
    assert raw.count(b"alice") == 2
    tampered = base64.urlsafe_b64encode(raw.replace(b"alice", b"carol")).decode().rstrip("=")
    decision = verifier.check(tampered, "carol", "arbor://agent/send/workers/7", caller="gw")
    assert_denied(decision, "does not verify")


@pytest.mark.parametrize("position", [10, 100, -10])
def test_token_with_flipped_character_denied(verifier: CapabilityVerifier, position: int) -> None:
    text = issue_workers().to_string()
    flipped = "A" if text[position] != "A" else "B"
    tampered = text[:position] + flipped + text[position + 1 :]
    decision = verifier.check(tampered, "coordinator", "arbor://agent/send/workers/7")
    assert_denied(decision, "the token is invalid")


def test_non_string_token_denied(verifier: CapabilityVerifier) -> None:
    decision = verifier.check(["not", "a", "token"], "coordinator", "arbor://agent/send/w")  # type: ignore[arg-type]
    assert_denied(decision, "must be a string")


def test_non_string_principal_or_caller_denied(verifier: CapabilityVerifier) -> None:
    token = issue_workers()
    uri = "arbor://agent/send/workers/7"
    assert_denied(verifier.check(token, None, uri), "principal must be a string")  # type: ignore[arg-type]
    assert_denied(verifier.check(token, "coordinator", uri, caller=7), "caller must be a string")  # type: ignore[arg-type]


def test_hand_appended_foreign_block_denied(verifier: CapabilityVerifier) -> None:
    token = issue_workers()
    appended = token._biscuit.append(biscuit_auth.BlockBuilder('right("everything");'))
    decision = verifier.check(appended.to_base64(), "coordinator", "arbor://agent/send/workers/7")
    assert_denied(decision, "has no Arbor terms")


def test_hand_appended_widening_block_denied(verifier: CapabilityVerifier) -> None:
    # An attacker skips delegate() and appends a well-formed Arbor block that claims more.
    token = AUTHORITY.issue("alice", "arbor://agent/send/workers/*", expires_at=EXPIRES, depth=1)
    wider = make_block(1, "mallory", "arbor://agent/*/**", None, EXPIRES, 0, None, None)
    source, parameters = block_datalog(wider)
    appended = token._biscuit.append(biscuit_auth.BlockBuilder(source, parameters))
    decision = verifier.check(appended.to_base64(), "mallory", "arbor://agent/stop/admin")
    assert_denied(decision, "widens its parent")


def test_biscuit_checks_alone_deny_hand_widened_block() -> None:
    # Even without Arbor's chain validation, block 0's signed checks bound every request.
    token = AUTHORITY.issue("alice", "arbor://agent/send/workers/*", expires_at=EXPIRES, depth=1)
    wider = make_block(1, "mallory", "arbor://agent/*/**", None, EXPIRES, 0, None, None)
    source, parameters = block_datalog(wider)
    appended = token._biscuit.append(biscuit_auth.BlockBuilder(source, parameters))
    builder = biscuit_auth.AuthorizerBuilder(
        "time({now}); resource({uri}); principal({who}); delegation_depth(1); allow if true;",
        {"now": START, "uri": "arbor://agent/stop/admin", "who": "mallory"},
    )
    limits = builder.limits()
    limits.max_time = BISCUIT_MAX_TIME
    builder.set_limits(limits)
    authorizer = builder.build(appended)
    with pytest.raises(biscuit_auth.AuthorizationError, match="block n°0"):
        authorizer.authorize()


def test_token_presented_by_other_principal_denied(verifier: CapabilityVerifier) -> None:
    token = issue_workers()
    decision = verifier.check(token, "intruder", "arbor://agent/send/workers/7")
    assert_denied(decision, "held by 'coordinator', not 'intruder'")


def test_parent_token_presented_by_delegate_denied(verifier: CapabilityVerifier) -> None:
    token = issue_workers()
    delegate(token, "worker-pool")
    decision = verifier.check(token, "worker-pool", "arbor://agent/send/workers/7")
    assert_denied(decision, "held by 'coordinator'")


def test_expired_token_denied_when_clock_moves(
    verifier: CapabilityVerifier, clock: FakeClock
) -> None:
    token = issue_workers()
    uri = "arbor://agent/send/workers/7"
    clock.advance((EXPIRES - START).total_seconds() - 0.5)
    assert verifier.check(token, "coordinator", uri).allowed is True

    clock.advance(0.5)
    assert_denied(verifier.check(token, "coordinator", uri), "expired at 2030-01-01T13:00:00")

    clock.advance(86_400)
    assert_denied(verifier.check(token, "coordinator", uri), "expired")


def test_delegated_expiry_denied_before_parent_expiry(
    verifier: CapabilityVerifier, clock: FakeClock
) -> None:
    token = issue_workers()
    child = delegate(token, "worker-pool", expires_at=START + timedelta(minutes=5))
    clock.advance(300)
    assert_denied(verifier.check(child, "worker-pool", "arbor://agent/send/workers/7"), "expired")
    assert verifier.check(token, "coordinator", "arbor://agent/send/workers/7").allowed is True


def test_revoked_token_denied(verifier: CapabilityVerifier) -> None:
    token = issue_workers()
    verifier.revoke(token.id)
    decision = verifier.check(token, "coordinator", "arbor://agent/send/workers/7")
    assert_denied(decision, f"the token {token.id[:16]} was revoked")


def test_revoked_parent_denies_every_descendant(verifier: CapabilityVerifier) -> None:
    root = issue_workers()
    child = delegate(root, "pool", "arbor://agent/send/workers/eu/**")
    grandchild = delegate(child, "worker-1", "arbor://agent/send/workers/eu/1")
    sibling = delegate(root, "pool-us", "arbor://agent/send/workers/us/**")
    uri = "arbor://agent/send/workers/eu/1"
    assert verifier.check(grandchild, "worker-1", uri).allowed is True

    verifier.revoke(child.id)
    assert_denied(verifier.check(child, "pool", uri), "was revoked")
    decision = verifier.check(grandchild, "worker-1", uri)
    assert_denied(decision, f"delegated from token {child.id[:16]} (held by 'pool')")
    assert verifier.check(root, "coordinator", uri).allowed is True
    assert verifier.check(sibling, "pool-us", "arbor://agent/send/workers/us/1").allowed is True

    verifier.set_revoked([root.id])
    assert_denied(verifier.check(sibling, "pool-us", "arbor://agent/send/workers/us/1"), "revoked")
    assert verifier.check(child, "pool", uri).allowed is False
    verifier.set_revoked([])
    assert verifier.check(child, "pool", uri).allowed is True


def test_revocation_list_given_at_construction(clock: FakeClock) -> None:
    token = issue_workers()
    verifier = CapabilityVerifier(KEYS.public_key, revoked={token.id}, clock=clock)
    assert verifier.revoked == frozenset({token.id})
    assert_denied(verifier.check(token, "coordinator", "arbor://agent/send/workers/7"), "revoked")


@pytest.mark.parametrize(
    "uri, rule",
    [
        ("arbor://agent/send/workers/../admin", "traversal"),
        ("arbor://agent/send/workers/./7", "traversal"),
        ("arbor://agent/send/workers/%2e%2e/admin", "percent-encoding"),
        ("arbor://agent/send/workers%2Fadmin", "percent-encoding"),
        ("arbor://agent/send/workers//7", "empty path segment"),
        ("arbor://agent/send/workers/7/", "empty path segment"),
        ("arbor://agent/send/workers/7\x00", "not allowed"),
        ("arbor://agent/send/workers/7\n", "not allowed"),
        ("ARBOR://agent/send/workers/7", "lowercase"),
        ("arbor://AGENT/send/workers/7", "lowercase"),
        ("arbor://agent/Send/workers/7", "lowercase"),
        ("arbor://agent/send/workers/*", "patterns only"),
        ("arbor://agent/send/workers/\uff0e\uff0e", "not allowed"),
    ],
)
def test_uri_tricks_denied(verifier: CapabilityVerifier, uri: str, rule: str) -> None:
    token = AUTHORITY.issue("alice", "arbor://agent/send/**", expires_at=EXPIRES)
    decision = verifier.check(token, "alice", uri)
    assert_denied(decision, rule)
    assert decision.right == "access"
    assert decision.resource == ascii(uri)


def test_path_case_is_not_folded(verifier: CapabilityVerifier) -> None:
    token = AUTHORITY.issue("alice", "arbor://agent/send/workers/*", expires_at=EXPIRES)
    assert verifier.check(token, "alice", "arbor://agent/send/workers/7").allowed is True
    assert_denied(verifier.check(token, "alice", "arbor://agent/send/Workers/7"), "grants")


@pytest.mark.parametrize(
    "uri",
    [
        "arbor://agent/stop/workers/7",
        "arbor://agent/send/admin",
        "arbor://agent/send/workers",
        "arbor://secret/read/workers/7",
        "arbor://capability/grant/workers/7",
    ],
)
def test_resource_outside_grant_denied(verifier: CapabilityVerifier, uri: str) -> None:
    token = issue_workers()
    decision = verifier.check(token, "coordinator", uri)
    assert_denied(decision, "the token grants ['ask', 'send'] on arbor://agent/*/workers/**")


def test_max_uses_exceeded_denied(verifier: CapabilityVerifier) -> None:
    token = issue_workers(max_uses=2)
    uri = "arbor://agent/send/workers/7"
    assert verifier.check(token, "coordinator", uri).allowed is True
    assert verifier.check(token, "coordinator", uri).allowed is True
    assert_denied(verifier.check(token, "coordinator", uri), "the 2 uses")
    assert_denied(verifier.check(token, "coordinator", uri), "are spent")


def test_denied_checks_do_not_spend_uses(verifier: CapabilityVerifier) -> None:
    token = issue_workers(max_uses=1)
    assert verifier.check(token, "coordinator", "arbor://agent/stop/workers/7").allowed is False
    assert verifier.check(token, "intruder", "arbor://agent/send/workers/7").allowed is False
    assert verifier.check(token, "coordinator", "arbor://agent/send/workers/7").allowed is True
    assert verifier.check(token, "coordinator", "arbor://agent/send/workers/7").allowed is False


def test_delegated_uses_count_against_parent(verifier: CapabilityVerifier) -> None:
    root = issue_workers(max_uses=3)
    first = delegate(root, "pool-a")
    second = delegate(root, "pool-b", max_uses=2)
    uri = "arbor://agent/send/workers/7"
    assert verifier.check(first, "pool-a", uri).allowed is True
    assert verifier.check(second, "pool-b", uri).allowed is True
    assert verifier.check(root, "coordinator", uri).allowed is True
    # Three uses of the root block are spent, across the root and both delegates.
    assert_denied(verifier.check(second, "pool-b", uri), "the 3 uses that token block 0")
    assert_denied(verifier.check(first, "pool-a", uri), "are spent")


def test_use_hook_records_counts(clock: FakeClock) -> None:
    recorded: list[tuple[str, int]] = []
    counts = {}
    verifier = CapabilityVerifier(
        KEYS.public_key,
        clock=clock,
        use_counts=counts,
        on_use=lambda key, count: recorded.append((key, count)),
    )
    token = issue_workers(max_uses=5)
    child = delegate(token, "pool", max_uses=4)
    verifier.check(child, "pool", "arbor://agent/send/workers/7")
    verifier.check(child, "pool", "arbor://agent/send/workers/7")
    assert recorded == [(token.id, 1), (child.id, 1), (token.id, 2), (child.id, 2)]
    assert counts == {token.id: 2, child.id: 2}


def test_use_counts_loaded_from_store_apply(clock: FakeClock) -> None:
    token = issue_workers(max_uses=5)
    verifier = CapabilityVerifier(KEYS.public_key, clock=clock, use_counts={token.id: 5})
    assert_denied(verifier.check(token, "coordinator", "arbor://agent/send/workers/7"), "spent")


def test_failing_use_hook_raises_and_counts_nothing(clock: FakeClock) -> None:
    def fail(key: str, count: int) -> None:
        raise OSError("store down")

    counts: dict[str, int] = {}
    verifier = CapabilityVerifier(KEYS.public_key, clock=clock, use_counts=counts, on_use=fail)
    token = issue_workers(max_uses=1)
    with pytest.raises(OSError, match="store down"):
        verifier.check(token, "coordinator", "arbor://agent/send/workers/7")
    assert counts == {}


def test_caller_not_on_allowed_list_denied(verifier: CapabilityVerifier) -> None:
    token = issue_workers(allowed_callers=["gateway", "scheduler"])
    uri = "arbor://agent/send/workers/7"
    assert verifier.check(token, "coordinator", uri, caller="gateway").allowed is True
    assert_denied(
        verifier.check(token, "coordinator", uri, caller="intruder"),
        "caller 'intruder' is not among the allowed callers ['gateway', 'scheduler']",
    )
    assert_denied(verifier.check(token, "coordinator", uri), "the check named none")


def test_delegated_caller_list_narrows(verifier: CapabilityVerifier) -> None:
    token = issue_workers(allowed_callers=["gateway", "scheduler"])
    child = delegate(token, "pool", allowed_callers=["scheduler"])
    uri = "arbor://agent/send/workers/7"
    assert verifier.check(child, "pool", uri, caller="scheduler").allowed is True
    assert_denied(verifier.check(child, "pool", uri, caller="gateway"), "allowed callers")


# Delegation: narrowing works, widening is refused.


def test_delegation_narrows(verifier: CapabilityVerifier) -> None:
    root = issue_workers()
    child = delegate(
        root,
        "pool",
        "arbor://agent/send/workers/eu/*",
        expires_at=START + timedelta(minutes=10),
        max_uses=10,
    )
    assert child.principal == "pool"
    assert child.operations == frozenset({"send"})
    assert child.depth == 1
    assert child.parent_id == root.id
    assert child.revocation_ids[:1] == root.revocation_ids
    assert verifier.check(child, "pool", "arbor://agent/send/workers/eu/7").allowed is True
    assert_denied(verifier.check(child, "pool", "arbor://agent/send/workers/us/7"), "grants")
    assert_denied(verifier.check(child, "pool", "arbor://agent/ask/workers/eu/7"), "grants")


@pytest.mark.parametrize(
    "arguments, widened",
    [
        ({"resource_pattern": "arbor://agent/send/**"}, "pattern 'arbor://agent/send/**' is wider"),
        ({"resource_pattern": "arbor://agent/send/*/7"}, "is wider than the parent's"),
        ({"resource_pattern": "arbor://secret/read/workers/7"}, "is wider than the parent's"),
        ({"operations": ["send", "stop"]}, "operations ['stop'] are not granted"),
        (
            {"resource_pattern": "arbor://agent/ask/workers/7", "operations": ["send"]},
            "not matched",
        ),
        (
            {"resource_pattern": "arbor://agent/stop/workers/7"},
            "operations ['stop'] are not granted by the parent",
        ),
        (
            {"resource_pattern": "arbor://agent/*/workers/7", "operations": ["ask", "spawn"]},
            "operations ['spawn'] are not granted",
        ),
        ({"depth": 2}, "depth 2 is not lower than the parent's remaining depth 2"),
        ({"depth": 3}, "depth 3 is not lower"),
        ({"expires_at": EXPIRES + timedelta(seconds=1)}, "is later than the parent's"),
        ({"max_uses": 6}, "max_uses 6 is more than the parent's 5"),
        ({"allowed_callers": ["gateway", "intruder"]}, "allowed callers ['intruder']"),
    ],
)
def test_delegation_widening_refused(arguments: dict[str, object], widened: str) -> None:
    token = issue_workers(max_uses=5, allowed_callers=["gateway"])
    with pytest.raises((CapabilityDenied, InvalidCapability)) as caught:
        delegate(token, "pool", **arguments)  # type: ignore[arg-type]
    assert widened in str(caught.value)
    if isinstance(caught.value, CapabilityDenied):
        assert caught.value.principal == "coordinator"
        assert caught.value.missing == "delegate"
        assert "'coordinator' may not delegate on arbor://" in str(caught.value)


def test_delegation_depth_exhausted() -> None:
    token = AUTHORITY.issue("alice", "arbor://agent/send/**", expires_at=EXPIRES)
    with pytest.raises(CapabilityDenied, match="has no delegation depth left"):
        delegate(token, "bob")

    chain = AUTHORITY.issue("alice", "arbor://agent/send/**", expires_at=EXPIRES, depth=2)
    chain = delegate(chain, "bob")
    chain = delegate(chain, "carol")
    assert chain.depth == 0
    with pytest.raises(CapabilityDenied, match="'carol' may not delegate"):
        delegate(chain, "dave")


def test_hand_appended_block_beyond_depth_denied(verifier: CapabilityVerifier) -> None:
    token = AUTHORITY.issue("alice", "arbor://agent/send/**", expires_at=EXPIRES, depth=0)
    extra = make_block(1, "bob", "arbor://agent/send/**", None, EXPIRES, 0, None, None)
    source, parameters = block_datalog(extra)
    appended = token._biscuit.append(biscuit_auth.BlockBuilder(source, parameters))
    decision = verifier.check(appended.to_base64(), "bob", "arbor://agent/send/x")
    assert_denied(decision, "allows no further delegation")


def test_delegate_keeps_parent_limits(verifier: CapabilityVerifier, clock: FakeClock) -> None:
    token = issue_workers(allowed_callers=["gateway"])
    child = delegate(token, "pool")
    assert child.allowed_callers == frozenset({"gateway"})
    assert child.expires_at == token.expires_at
    assert child.operations == token.operations
    assert_denied(verifier.check(child, "pool", "arbor://agent/send/workers/7"), "named none")


# Argument validation


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"principal": "bad name"}, "principal 'bad name' is invalid"),
        ({"principal": 'x"y'}, "is invalid"),
        ({"principal": ""}, "principal '' is invalid"),
        ({"principal": 7}, "principal must be a string, got int"),
        ({"operations": "send"}, "got the string 'send'"),
        ({"operations": []}, "operations is empty"),
        ({"operations": ["read"]}, "operations ['read'] are not matched"),
        ({"expires_at": datetime(2030, 1, 1)}, "timezone-aware datetime"),
        ({"expires_at": 1_900_000_000}, "timezone-aware datetime"),
        ({"depth": -1}, "depth must be an integer from 0 to"),
        ({"depth": MAX_DEPTH + 1}, f"from 0 to {MAX_DEPTH}"),
        ({"depth": True}, "depth must be an integer"),
        ({"max_uses": 0}, "max_uses must be a positive integer"),
        ({"max_uses": 1.5}, "max_uses must be a positive integer"),
        ({"allowed_callers": []}, "allowed_callers is empty"),
        ({"allowed_callers": "gateway"}, "got the string 'gateway'"),
        ({"allowed_callers": ["ok", "not ok"]}, "allowed caller 'not ok' is invalid"),
    ],
)
def test_issue_rejects_bad_arguments(arguments: dict[str, object], message: str) -> None:
    call: dict[str, object] = {
        "principal": "alice",
        "resource_pattern": "arbor://agent/*/workers/**",
        "operations": None,
        "expires_at": EXPIRES,
    }
    call.update(arguments)
    with pytest.raises(InvalidCapability) as caught:
        AUTHORITY.issue(**call)  # type: ignore[arg-type]
    assert message in str(caught.value)


def test_bad_private_key_not_echoed() -> None:
    secret_looking = "ed25519-private/" + "zz" * 32
    with pytest.raises(InvalidCapability) as caught:
        CapabilityAuthority(secret_looking)
    assert secret_looking not in str(caught.value)
    assert "generate_keypair()" in str(caught.value)


def test_authority_accepts_raw_key_bytes() -> None:
    raw = bytes(range(32))
    authority = CapabilityAuthority(raw)
    assert authority.public_key == CapabilityAuthority(raw).public_key
    token = authority.issue("alice", "arbor://secret/read/db/password", expires_at=EXPIRES)
    verifier = CapabilityVerifier(authority.public_key, clock=FakeClock())
    assert verifier.check(token, "alice", "arbor://secret/read/db/password").allowed is True
    with pytest.raises(InvalidCapability, match="or 32 raw bytes"):
        CapabilityAuthority(raw[:16])


def test_bad_public_key_rejected() -> None:
    with pytest.raises(InvalidCapability, match="public key 'ed25519/00' is invalid"):
        CapabilityVerifier("ed25519/00")


def test_unknown_engine_rejected() -> None:
    with pytest.raises(ValueError, match="engine 'datalog' is invalid"):
        CapabilityVerifier(KEYS.public_key, engine="datalog")  # type: ignore[arg-type]


def test_from_string_with_wrong_key_raises() -> None:
    token = issue_workers()
    with pytest.raises(InvalidCapability, match="signed by another authority"):
        CapabilityToken.from_string(token.to_string(), generate_keypair().public_key)


def test_from_string_rejects_oversized_text() -> None:
    with pytest.raises(InvalidCapability, match="longer than"):
        CapabilityToken.from_string("A" * 70_000, KEYS.public_key)


# Property tests

LITERALS = ["a", "b"]
OPERATION_SETS = [["send"], ["ask"], ["send", "ask"], ["stop"]]


@st.composite
def pattern_texts(draw: st.DrawFn) -> str:
    length = draw(st.integers(1, 3))
    path = [draw(st.sampled_from([*LITERALS, "*"])) for _ in range(length)]
    if draw(st.booleans()):
        path[-1] = "**"
    operation = draw(st.sampled_from(["*", "send", "ask"]))
    return f"arbor://agent/{operation}/{'/'.join(path)}"


UNIVERSE = [
    f"arbor://agent/{operation}/{'/'.join(path)}"
    for length in range(1, 5)
    for path in itertools.product(["a", "b", "z"], repeat=length)
    for operation in ("send", "ask", "stop")
]


@given(
    parent_pattern=pattern_texts(),
    parent_operations=st.sampled_from([None, *OPERATION_SETS]),
    child_pattern=pattern_texts(),
    child_operations=st.sampled_from([None, *OPERATION_SETS]),
)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
def test_delegated_token_never_allows_more_than_parent(
    parent_pattern: str,
    parent_operations: list[str] | None,
    child_pattern: str,
    child_operations: list[str] | None,
) -> None:
    try:
        parent = AUTHORITY.issue(
            "alice", parent_pattern, parent_operations, expires_at=EXPIRES, depth=1
        )
        child = delegate(parent, "bob", child_pattern, child_operations)
    except (CapabilityDenied, InvalidCapability):
        return
    verifier = CapabilityVerifier(KEYS.public_key, clock=FakeClock())
    for uri in UNIVERSE:
        if verifier.check(child, "bob", uri).allowed:
            assert verifier.check(parent, "alice", uri).allowed, uri


@given(
    pattern=pattern_texts(),
    operations=st.sampled_from([None, *OPERATION_SETS]),
    uri=st.sampled_from(UNIVERSE),
    principal=st.sampled_from(["alice", "bob"]),
    caller=st.sampled_from([None, "gw", "other"]),
    callers=st.sampled_from([None, ["gw"]]),
    delegated=st.booleans(),
    offset=st.sampled_from([0, 1799, 1800, 3599, 3600, 4000]),
)
@settings(max_examples=300, deadline=None)
def test_python_and_biscuit_engines_agree(
    pattern: str,
    operations: list[str] | None,
    uri: str,
    principal: str,
    caller: str | None,
    callers: list[str] | None,
    delegated: bool,
    offset: int,
) -> None:
    try:
        token = AUTHORITY.issue(
            "alice", pattern, operations, expires_at=EXPIRES, depth=1, allowed_callers=callers
        )
    except InvalidCapability:
        return
    if delegated:
        token = delegate(token, "bob", expires_at=START + timedelta(seconds=1800))
    clock = FakeClock()
    clock.advance(offset)
    python = CapabilityVerifier(KEYS.public_key, clock=clock, engine="python")
    biscuit = CapabilityVerifier(KEYS.public_key, clock=clock, engine="biscuit")
    expected = python.check(token, principal, uri, caller=caller)
    actual = biscuit.check(token, principal, uri, caller=caller)
    # Reasons may differ when several constraints fail, because each engine reports the
    # first failure in its own order.
    assert actual.allowed == expected.allowed, (expected.reason, actual.reason)


def test_engines_disagreeing_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    # The clock gives the Python evaluation a time before expiry and the Biscuit authorizer
    # a time after it, so only Biscuit denies. "both" mode denies and logs the disagreement.
    token = issue_workers()
    times = iter([START.timestamp(), EXPIRES.timestamp() + 10])
    verifier = CapabilityVerifier(KEYS.public_key, clock=lambda: next(times), engine="both")
    with caplog.at_level(logging.ERROR, logger="arbor.security.verifier"):
        decision = verifier.check(token, "coordinator", "arbor://agent/send/workers/7")
    assert_denied(decision, "expired")
    assert "engines disagree" in caplog.text


# Allowed decisions kept for token strings


def test_kept_decision_dropped_after_revocation(verifier: CapabilityVerifier) -> None:
    text = issue_workers().to_string()
    uri = "arbor://agent/send/workers/7"
    assert verifier.check(text, "coordinator", uri).allowed is True
    assert verifier.check(text, "coordinator", uri).allowed is True

    verifier.revoke(issue_workers().id)  # another token: the kept decision is still valid
    assert verifier.check(text, "coordinator", uri).allowed is True
    verifier.revoke(verifier.load(text).id)
    assert_denied(verifier.check(text, "coordinator", uri), "was revoked")
    verifier.set_revoked([])
    assert verifier.check(text, "coordinator", uri).allowed is True


def test_kept_decision_dropped_at_expiry(verifier: CapabilityVerifier, clock: FakeClock) -> None:
    text = issue_workers().to_string()
    uri = "arbor://agent/send/workers/7"
    assert verifier.check(text, "coordinator", uri).allowed is True
    clock.advance((EXPIRES - START).total_seconds())
    assert_denied(verifier.check(text, "coordinator", uri), "expired")


def test_kept_decision_is_per_principal_resource_and_caller(verifier: CapabilityVerifier) -> None:
    text = issue_workers(allowed_callers=["client"]).to_string()
    uri = "arbor://agent/send/workers/7"
    assert verifier.check(text, "coordinator", uri, "client").allowed is True
    assert_denied(verifier.check(text, "intruder", uri, "client"), "held by")
    assert verifier.check(text, "coordinator", uri, "other").allowed is False
    assert verifier.check(text, "coordinator", "arbor://agent/stop/workers/7").allowed is False


def test_limited_token_counts_every_check_of_its_string(clock: FakeClock) -> None:
    text = issue_workers(max_uses=2).to_string()
    verifier = CapabilityVerifier(KEYS.public_key, clock=clock)
    uri = "arbor://agent/send/workers/7"
    assert verifier.check(text, "coordinator", uri).allowed is True
    assert verifier.check(text, "coordinator", uri).allowed is True
    assert verifier.check(text, "coordinator", uri).allowed is False


def test_unhashable_principal_with_token_string_denied(verifier: CapabilityVerifier) -> None:
    text = issue_workers().to_string()
    decision = verifier.check(text, ["coordinator"], "arbor://agent/send/workers/7")  # type: ignore[arg-type]
    assert_denied(decision, "the principal must be a string")
    decision = verifier.check(text, "coordinator", "arbor://agent/send/workers/7", ["gw"])  # type: ignore[arg-type]
    assert_denied(decision, "the caller must be a string or None")
