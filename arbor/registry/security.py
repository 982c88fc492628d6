"""The registry's side of capabilities: issuing, delegating, revoking, and auditing each."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from arbor.config import Settings
from arbor.errors import ArborError, CapabilityDenied, InvalidArguments
from arbor.names import namespace_of
from arbor.observability import metrics
from arbor.persistence import ALLOWED, DENIED, AuditEntry, CheckpointStore
from arbor.persistence.capabilities import CapabilityRecord
from arbor.runtime import telemetry
from arbor.runtime.guard import Guard, process_guard
from arbor.security import (
    CapabilityAuthority,
    CapabilityToken,
    delegate,
    generate_keypair,
    parse_pattern,
)

logger = logging.getLogger(__name__)

# The principal recorded for grants made by code that connects to Ray directly.
OPERATOR = "operator"

# API key principals are written key:<id> and belong to no namespace.
KEY_PREFIX = "key:"


@dataclass(frozen=True)
class CapabilityInfo:
    """The public view of a capability: everything but the token text.

    Attributes:
        id: the token id; pass it to `arbor.revoke` or ``self.context.delegate``.
        principal: the holder, an agent name or an API key id.
        parent_id: the capability it was delegated from, or None for a grant.
        pattern: the resource pattern, such as ``arbor://agent/send/workers/**``.
        operations: the operations granted on the pattern.
        granted_by: the principal that granted or delegated it.
        created_at: when it was issued.
        expires_at: the end of its validity.
        revoked_at: when it was revoked, or None.
    """

    id: str
    principal: str
    parent_id: str | None
    pattern: str
    operations: tuple[str, ...]
    granted_by: str
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None

    @classmethod
    def from_record(cls, record: CapabilityRecord) -> CapabilityInfo:
        """Build the public view of a stored capability."""
        return cls(
            id=record.id,
            principal=record.principal,
            parent_id=record.parent_id,
            pattern=record.pattern,
            operations=record.operations,
            granted_by=record.granted_by,
            created_at=record.created_at,
            expires_at=record.expires_at,
            revoked_at=record.revoked_at,
        )


@dataclass(frozen=True)
class GrantRequest:
    """A grant request: a pattern and optional narrowing terms, as `arbor.grant` takes them."""

    pattern: str
    operations: tuple[str, ...] | None = None
    expires_at: datetime | None = None
    max_uses: int | None = None
    allowed_callers: tuple[str, ...] | None = None
    depth: int | None = None

    @classmethod
    def parse(cls, item: Any) -> GrantRequest:
        """Accept a pattern string, a dict of `arbor.grant` keywords, or a GrantRequest.

        Raises:
            InvalidArguments: the item has another type or unknown keys.
            InvalidResource: the pattern does not parse.
        """
        if isinstance(item, GrantRequest):
            request = item
        elif isinstance(item, str):
            request = cls(pattern=item)
        elif isinstance(item, dict):
            unknown = set(item) - set(cls.__dataclass_fields__)
            if unknown or "pattern" not in item:
                raise InvalidArguments(
                    f"capability {item!r} is invalid; use a pattern string or a dict with "
                    f"'pattern' and any of operations, expires_at, max_uses, "
                    f"allowed_callers, depth (unknown keys: {sorted(unknown)})"
                )
            values = dict(item)
            for key in ("operations", "allowed_callers"):
                if values.get(key) is not None:
                    values[key] = tuple(values[key])
            request = cls(**values)
        else:
            raise InvalidArguments(
                f"capability {item!r} is invalid; pass a pattern string such as "
                "'arbor://agent/send/workers/*' or a dict of arbor.grant keywords"
            )
        parse_pattern(request.pattern)
        return request


class CapabilityService:
    """Issues, delegates and revokes capabilities, and writes an audit row for each.

    The signing key comes from ``signing_key`` (read from a secret provider) when given.
    Otherwise the first registry generates one and keeps it in the store, so any later
    registry of the cluster signs with the same key.
    """

    def __init__(
        self,
        store: CheckpointStore,
        settings: Settings,
        signing_key: bytes | None = None,
        guard: Guard | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.authority = _authority(store, signing_key)
        # The process's guard by default, so grants and checks share one revocation list.
        self.guard: Guard = guard or process_guard(store, settings)

    def grant(
        self, principal: str, request: GrantRequest, granted_by: str = OPERATOR
    ) -> CapabilityInfo:
        """Issue a new capability to ``principal``."""
        _check_principal(principal)
        token = self.authority.issue(
            principal,
            request.pattern,
            request.operations,
            expires_at=request.expires_at or self._default_expiry(),
            max_uses=request.max_uses,
            allowed_callers=request.allowed_callers,
            depth=request.depth or 0,
        )
        record = self._save(token, granted_by)
        _count_grant(record, delegated=False)
        self.audit(granted_by, "grant", record.pattern, ALLOWED, to=principal, id=token.id)
        return CapabilityInfo.from_record(record)

    def delegate(
        self, holder: str, parent_id: str, to_principal: str, request: GrantRequest | None
    ) -> CapabilityInfo:
        """Derive a narrower capability from one ``holder`` has, for ``to_principal``.

        Raises:
            CapabilityDenied: the holder does not hold the parent, it is revoked or
                expired, or the request widens it.
        """
        _check_principal(to_principal)
        parent = self.store.get_capability(parent_id)
        # The pattern the audit row names when the delegation is denied.
        if request is not None:
            pattern = request.pattern
        elif parent is not None:
            pattern = parent.pattern
        else:
            pattern = parent_id
        if parent is None or parent.principal != holder:
            self._deny(holder, pattern, "delegate", f"{holder!r} holds no capability {parent_id!r}")
        assert parent is not None
        token = self.guard.verifier.load(parent.token)
        if not self.guard.verifier.revoked.isdisjoint(token.revocation_ids) or (
            parent.revoked_at is not None
        ):
            self._deny(holder, pattern, "delegate", f"capability {parent_id[:16]} is revoked")
        if token.expires_at <= datetime.now(UTC):
            self._deny(holder, pattern, "delegate", f"capability {parent_id[:16]} has expired")
        return self._delegate_from(holder, token, to_principal, request)

    def delegate_covering(
        self, holder: str, to_principal: str, request: GrantRequest
    ) -> CapabilityInfo:
        """Delegate ``request`` from whichever capability of ``holder`` allows it.

        Raises:
            CapabilityDenied: no capability of the holder can be narrowed to the request.
        """
        reasons = []
        for record in self.store.list_capabilities(holder):
            token = self.guard.verifier.load(record.token)
            if not self.guard.verifier.revoked.isdisjoint(token.revocation_ids):
                continue
            try:
                return self._delegate_from(holder, token, to_principal, request, audit_denial=False)
            except CapabilityDenied as error:
                reasons.append(f"{record.id[:16]}: {error.reason}")
        self._deny(
            holder,
            request.pattern,
            "delegate",
            "no capability it holds allows it" + (f" ({'; '.join(reasons)})" if reasons else ""),
        )
        raise AssertionError("unreachable")

    def revoke(self, capability_id: str, by: str = OPERATOR, checked: bool = False) -> list[str]:
        """Revoke a capability and everything delegated from it; returns the revoked ids.

        An agent may revoke a capability it holds or one delegated, at any depth, from a
        capability it holds. The operator may revoke any, and so may a caller whose
        capability for ``arbor://capability/revoke/<holder>`` was checked (``checked``).

        Raises:
            CapabilityDenied: ``by`` is an agent with no such relation to the capability.
            ArborError: no capability has this id.
        """
        record = self.store.get_capability(capability_id)
        if record is None:
            raise ArborError(
                f"capability {capability_id!r} not found; arbor.capabilities(principal) "
                "lists the ids"
            )
        if by != OPERATOR and not checked and not self._is_ancestor_held(by, record):
            self._deny(
                by,
                f"arbor://capability/revoke/{record.principal}",
                "revoke",
                f"{by!r} neither holds capability {capability_id[:16]} nor delegated it",
            )
        revoked = self.store.revoke_capabilities([capability_id])
        self.guard.verifier.revoke(*revoked)
        telemetry.record(metrics.record_capability_revocation, "requested", 1)
        if len(revoked) > 1:
            telemetry.record(metrics.record_capability_revocation, "cascade", len(revoked) - 1)
        self.audit(by, "revoke", record.pattern, ALLOWED, id=capability_id, cascade=len(revoked))
        return revoked

    def revoke_principal(self, principal: str, by: str = OPERATOR) -> list[str]:
        """Revoke everything ``principal`` holds, as when an agent stops."""
        revoked = self.store.revoke_capabilities(principal=principal)
        if revoked:
            self.guard.verifier.revoke(*revoked)
            telemetry.record(metrics.record_capability_revocation, "agent_stopped", len(revoked))
            self.audit(by, "revoke", principal, ALLOWED, holder=principal, cascade=len(revoked))
        return revoked

    def list(
        self,
        principal: str | None = None,
        include_revoked: bool = False,
        namespace: str | None = None,
    ) -> list[CapabilityInfo]:
        """Return the capabilities of ``principal`` (or all, or ``namespace``'s), oldest first."""
        records = self.store.list_capabilities(principal, include_revoked, namespace)
        return [CapabilityInfo.from_record(record) for record in records]

    def audit(self, actor: str, action: str, resource: str, decision: str, **detail: Any) -> None:
        """Append one audit row for ``actor``; a database outage is logged, not raised."""
        entry = AuditEntry(
            principal=actor,
            action=action,
            resource=resource,
            decision=decision,
            detail=detail,
            trace_id=telemetry.current_trace_id(),
        )
        try:
            self.store.append_audit(entry)
            telemetry.record(
                metrics.record_audit_row, action, "allow" if decision == ALLOWED else "deny"
            )
        except ArborError as error:
            logger.error(
                "audit row %s %s on %s was not written: %s", actor, action, resource, error
            )

    def _delegate_from(
        self,
        holder: str,
        token: CapabilityToken,
        to_principal: str,
        request: GrantRequest | None,
        audit_denial: bool = True,
    ) -> CapabilityInfo:
        crossing = _crossed_namespace(holder, to_principal)
        if crossing is not None:
            uri = request.pattern if request is not None else str(token.blocks[-1].pattern)
            if audit_denial:
                self._deny(holder, uri, "delegate", crossing)
            raise CapabilityDenied(holder, uri, "delegate", crossing)
        try:
            child = delegate(
                token,
                to_principal,
                request.pattern if request else None,
                request.operations if request else None,
                expires_at=request.expires_at if request else None,
                max_uses=request.max_uses if request else None,
                allowed_callers=request.allowed_callers if request else None,
                depth=request.depth if request else None,
            )
        except CapabilityDenied as error:
            if audit_denial:
                self.audit(holder, "delegate", error.uri, DENIED, reason=error.reason)
            raise
        record = self._save(child, holder)
        _count_grant(record, delegated=True)
        self.audit(holder, "delegate", record.pattern, ALLOWED, to=to_principal, id=child.id)
        return CapabilityInfo.from_record(record)

    def _is_ancestor_held(self, holder: str, record: CapabilityRecord) -> bool:
        current: CapabilityRecord | None = record
        while current is not None:
            if current.principal == holder:
                return True
            current = self.store.get_capability(current.parent_id) if current.parent_id else None
        return False

    def _save(self, token: CapabilityToken, granted_by: str) -> CapabilityRecord:
        record = CapabilityRecord(
            id=token.id,
            principal=token.principal,
            parent_id=token.parent_id,
            pattern=str(token.pattern),
            operations=tuple(sorted(token.operations)),
            token=token.to_string(),
            granted_by=granted_by,
            created_at=datetime.now(UTC),
            expires_at=token.expires_at,
        )
        self.store.save_capability(record)
        return record

    def _deny(self, principal: str, uri: str, right: str, reason: str) -> None:
        self.audit(principal, right, uri, DENIED, reason=reason)
        raise CapabilityDenied(principal, uri, right, reason)

    def _default_expiry(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self.settings.capability_ttl_s)


def _crossed_namespace(holder: str, to_principal: str) -> str | None:
    """Return why an agent may not delegate to ``to_principal``, or None if it may.

    Agents delegate within their own namespace only; API keys belong to no namespace.
    """
    if holder == OPERATOR or holder.startswith(KEY_PREFIX) or to_principal.startswith(KEY_PREFIX):
        return None
    source, target = namespace_of(holder), namespace_of(to_principal)
    if source == target:
        return None
    return (
        f"{to_principal!r} is in namespace {target!r}, not {source!r}; an agent delegates "
        "within its own namespace only, and an operator grant reaches another"
    )


def _count_grant(record: CapabilityRecord, delegated: bool) -> None:
    kind = record.pattern.split("/")[2]
    for operation in record.operations:
        telemetry.record(metrics.record_capability_grant, kind, operation, delegated)


def grant_requests(items: Iterable[Any] | None) -> list[GrantRequest]:
    """Parse the ``capabilities=`` argument of a spawn."""
    if items is None:
        return []
    if isinstance(items, str | dict):
        raise InvalidArguments(
            f"capabilities={items!r} is invalid; pass a list, such as "
            "capabilities=['arbor://agent/send/workers/*']"
        )
    return [GrantRequest.parse(item) for item in items]


def _authority(store: CheckpointStore, signing_key: bytes | None) -> CapabilityAuthority:
    if signing_key is not None:
        authority = CapabilityAuthority(signing_key)
        stored = store.signing_key()
        if stored is None or stored[0] != authority.public_key:
            if stored is not None:
                logger.warning(
                    "the signing key from the secret provider differs from the stored one; "
                    "capabilities signed with the old key no longer verify"
                )
            store.store_signing_key(authority.public_key, None, replace=True)
        return authority
    stored = store.signing_key()
    if stored is None:
        pair = generate_keypair()
        stored = store.store_signing_key(pair.public_key, pair.private_key)
        # On one machine with the embedded store this is the expected set-up; a shared
        # database is where a readable private key matters.
        level = logging.WARNING if store.dialect == "postgresql" else logging.INFO
        logger.log(
            level,
            "generated a capability signing key and stored it in the database; set "
            "ARBOR_SIGNING_KEY_SECRET to keep the private key in a secret provider instead",
        )
    if stored[1] is None:
        raise ArborError(
            "the store keeps only the public signing key, because the private key came from "
            "a secret provider; set ARBOR_SIGNING_KEY_SECRET for this registry too"
        )
    return CapabilityAuthority(stored[1])


def _check_principal(principal: object) -> None:
    if not isinstance(principal, str) or not principal or len(principal) > 200:
        raise InvalidArguments(
            f"principal {principal!r} is invalid; pass an agent name or an API key id"
        )
