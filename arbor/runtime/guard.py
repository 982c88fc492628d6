"""Capability checks inside agent processes: the guard of a process and an agent's wallet.

The guard verifies tokens with the cluster's public key alone, so a check costs no
database or registry round trip. A thread reads new revocations from the store every
``ARBOR_REVOCATION_POLL_S``. Denials are written to the audit log one by one; allowed
checks are counted and written in batches.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime

from arbor.config import Settings
from arbor.errors import ArborError, CapabilityDenied, InvalidCapability, InvalidResource
from arbor.observability import metrics
from arbor.persistence import DENIED, AuditCounter, AuditEntry, CheckpointStore
from arbor.runtime import telemetry
from arbor.security import CapabilityToken, CapabilityVerifier, Decision, parse_resource

logger = logging.getLogger(__name__)

# Seconds a process waits for the registry to store the signing key at first start.
SIGNING_KEY_WAIT_S = 30.0


class Guard:
    """Checks capability tokens for every agent in one process."""

    def __init__(self, store: CheckpointStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.verifier = CapabilityVerifier(_public_key(store))
        self._seq = 0
        self.poll_revocations()
        self._counter = AuditCounter(store, interval_s=settings.audit_flush_interval_s).start()
        self._stopping = threading.Event()
        threading.Thread(target=self._poll_forever, name="arbor-revocations", daemon=True).start()

    def check(
        self, token: str | None, principal: str, uri: str, caller: str | None = None
    ) -> Decision:
        """Decide a request; a denial is audited and logged, an allowed check is counted."""
        if token is None:
            decision = Decision(
                False, principal, uri, _right(uri), "no capability was presented for it"
            )
        else:
            decision = self.verifier.check(token, principal, uri, caller)
        if decision.allowed:
            self._counter.record(principal, decision.right, uri)
        else:
            self.record_denial(decision)
        return decision

    def require(
        self, token: str | None, principal: str, uri: str, caller: str | None = None
    ) -> None:
        """Check like `check` and raise `CapabilityDenied` unless the request is allowed."""
        decision = self.check(token, principal, uri, caller)
        if not decision.allowed:
            raise CapabilityDenied(
                decision.principal, decision.resource, decision.right, decision.reason
            )

    def record_denial(self, decision: Decision) -> None:
        """Write one denial to the audit log; a database outage is logged, not raised."""
        telemetry.record(
            metrics.record_capability_denied,
            _kind(decision.resource),
            decision.right,
            _denial_reason(decision.reason),
        )
        logger.warning(
            "capability denied: %s may not %s on %s: %s",
            decision.principal,
            decision.right,
            decision.resource,
            decision.reason,
        )
        entry = AuditEntry(
            principal=decision.principal,
            action=decision.right,
            resource=decision.resource,
            decision=DENIED,
            detail={"reason": decision.reason, "token": decision.token_id},
            trace_id=telemetry.current_trace_id(),
        )
        try:
            with telemetry.span(
                "arbor.capability.denied",
                {"arbor.principal": decision.principal, "arbor.resource": decision.resource},
            ):
                self.store.append_audit(entry)
            telemetry.record(metrics.record_audit_row, decision.right, "deny")
        except ArborError as error:
            logger.error(
                "audit row for the denial of %s on %s was not written: %s",
                decision.principal,
                decision.resource,
                error,
            )

    def poll_revocations(self) -> int:
        """Read revocations newer than the last one seen; returns how many were new."""
        rows = self.store.revocations_since(self._seq)
        if rows:
            self.verifier.revoke(*(token_id for _, token_id in rows))
            self._seq = rows[-1][0]
        return len(rows)

    def close(self) -> None:
        """Stop polling and write the pending counts of allowed checks."""
        self._stopping.set()
        self._counter.close()

    def _poll_forever(self) -> None:
        while not self._stopping.wait(self.settings.revocation_poll_s):
            try:
                self.poll_revocations()
            except Exception as error:
                logger.warning(
                    "reading revocations failed (%s); retrying in %.1f s",
                    error,
                    self.settings.revocation_poll_s,
                )


class Wallet:
    """The capability tokens one principal holds, to present with its requests."""

    def __init__(self, principal: str, guard: Guard) -> None:
        self.principal = principal
        self.guard = guard
        self._tokens: list[CapabilityToken] = []
        # The token last found for each resource, so a repeated request skips the search.
        # Each with its expiry in Unix seconds, cheaper to compare than a datetime.
        self._by_uri: dict[str, tuple[CapabilityToken, float]] = {}
        # Read at the first request rather than here, so that starting an agent that
        # sends nothing (a spawn, a reactivation) costs no query.
        self._loaded = False

    def reload(self) -> None:
        """Read the principal's live capabilities from the store again."""
        tokens = []
        for record in self.guard.store.list_capabilities(self.principal):
            try:
                tokens.append(self.guard.verifier.load(record.token))
            except InvalidCapability as error:
                logger.error(
                    "capability %s of %s does not verify and is ignored: %s",
                    record.id[:16],
                    self.principal,
                    error,
                )
        self._tokens = tokens
        self._by_uri = {}
        self._loaded = True

    def token_for(self, uri: str) -> str | None:
        """Return the text of a live token that grants ``uri``, or None if none does."""
        cached = self._by_uri.get(uri)
        if cached is not None:
            token, expires = cached
            revoked = self.guard.verifier.revoked
            if time.time() < expires and revoked.isdisjoint(token.revocation_ids):
                return token.to_string()
        found = self._find(uri) if self._loaded else None
        if found is None:
            # A capability granted since the last read is found at once. A request that
            # finds none costs this read, as its denial costs an audit row anyway.
            self.reload()
            found = self._find(uri)
        if found is None:
            return None
        self._by_uri[uri] = (found, found.expires_at.timestamp())
        return found.to_string()

    def tokens(self) -> list[CapabilityToken]:
        """Return the live tokens held, as last read."""
        if not self._loaded:
            self.reload()
        return [token for token in self._tokens if self._usable(token)]

    def _find(self, uri: str) -> CapabilityToken | None:
        try:
            resource = parse_resource(uri)
        except InvalidResource:
            return None
        for token in self._tokens:
            if (
                self._usable(token)
                and resource.operation in token.operations
                and token.pattern.matches(resource)
            ):
                return token
        return None

    def _usable(self, token: CapabilityToken) -> bool:
        revoked = self.guard.verifier.revoked
        return revoked.isdisjoint(token.revocation_ids) and token.expires_at > datetime.now(UTC)


_guards: dict[str, Guard] = {}
_guards_lock = threading.Lock()


def process_guard(store: CheckpointStore, settings: Settings) -> Guard:
    """Return this process's guard for the store at ``settings.database_url``."""
    with _guards_lock:
        guard = _guards.get(settings.database_url)
        if guard is None:
            guard = Guard(store, settings)
            _guards[settings.database_url] = guard
        return guard


def _public_key(store: CheckpointStore) -> str:
    deadline = time.monotonic() + SIGNING_KEY_WAIT_S
    while True:
        key = store.signing_key()
        if key is not None:
            return key[0]
        if time.monotonic() > deadline:
            raise ArborError(
                "the store has no capability signing key after "
                f"{SIGNING_KEY_WAIT_S} s; start the registry with arbor.init() first"
            )
        time.sleep(0.2)


def _kind(uri: str) -> str:
    parts = uri.split("/")
    return (
        parts[2]
        if len(parts) > 2 and parts[2] in ("agent", "capability", "secret", "audit", "topic")
        else "other"
    )


def _denial_reason(reason: str) -> str:
    """Map a denial's text onto the bounded reasons the denial metric takes."""
    for word, label in (
        ("revoked", "revoked"),
        ("expired", "expired"),
        ("no capability", "missing"),
        ("invalid", "invalid_token"),
        ("depth", "depth_exceeded"),
    ):
        if word in reason:
            return label
    return "constraint"


def _right(uri: str) -> str:
    parts = uri.split("/")
    return parts[3] if len(parts) > 3 else "access"
