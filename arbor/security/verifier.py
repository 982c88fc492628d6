"""Local capability checks: verify a token and decide one request without a network call."""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Literal

import biscuit_auth

from arbor.errors import CapabilityDenied, InvalidCapability, InvalidResource
from arbor.security.blocks import (
    CALLER,
    DEPTH,
    EXPIRY,
    HOLDER,
    RESOURCE,
    USES,
    CapabilityBlock,
)
from arbor.security.capability import CapabilityToken, load_token, parse_public_key
from arbor.security.uri import Resource, parse_resource

logger = logging.getLogger(__name__)

Engine = Literal["python", "biscuit", "both"]
ENGINES: tuple[Engine, ...] = ("python", "biscuit", "both")

# Verified tokens kept per verifier, so a token seen before skips signature verification
# and block validation (0.3 ms for an issued token and 0.8 ms for a three-block chain, p50
# of benchmarks/bench_capability.py on a 2-CPU machine). Entries are keyed by the token
# string, which the signatures bind, so a cached entry cannot go stale.
DEFAULT_CACHE_SIZE = 4096

_FAILED_CHECK = re.compile(r"Check n°(\d+) in block n°(\d+)")

# Wall-clock limit of one Biscuit authorization. The library's default of 1 ms denied
# valid tokens when other processes held the CPU; Arbor tokens carry only their own few
# checks (load_token rejects anything else), so a longer limit cannot be abused.
BISCUIT_MAX_TIME = timedelta(milliseconds=100)


@dataclass(frozen=True)
class Decision:
    """The outcome of one capability check.

    Attributes:
        allowed: whether the request may proceed; a Decision is truthy when allowed.
        principal: who made the request.
        resource: the resource URI requested (escaped with ``ascii()`` when it is invalid).
        right: the operation requested, such as ``send``; ``access`` when the URI is invalid.
        reason: why a denied request was denied; empty when allowed.
        token_id: the id of the token checked, when it could be loaded.
    """

    allowed: bool
    principal: str
    resource: str
    right: str
    reason: str = ""
    token_id: str | None = None

    def __bool__(self) -> bool:
        return self.allowed

    @property
    def message(self) -> str:
        """A sentence naming the principal, the resource, the missing right and the reason."""
        if self.allowed:
            return f"{self.principal!r} may {self.right} on {self.resource}"
        return str(self.error())

    def error(self) -> CapabilityDenied:
        """Return the `CapabilityDenied` that describes this decision."""
        return CapabilityDenied(self.principal, self.resource, self.right, self.reason)

    def raise_if_denied(self) -> None:
        """Raise `CapabilityDenied` unless the request is allowed."""
        if not self.allowed:
            raise self.error()


class CapabilityVerifier:
    """Checks requests against capability tokens with the cluster's public key alone.

    Everything is decided in this process: the signatures, the revocation list pushed in
    with `set_revoked` or `revoke`, the expiry against the injected clock, the resource,
    the holder, the allowed callers and the use limits.

    Use limits are counted in ``use_counts``, keyed by the revocation id of the block that
    declares the limit, so every token delegated from that block draws on one count. Pass
    a mapping loaded from durable storage and an ``on_use`` hook that writes each new count
    to make the counts outlive the process. ``on_use`` runs before the count changes in
    memory; if it raises, the check raises too and the use is not counted.

    NOTE: counts are per verifier. Two processes that check the same token keep separate
    counts, so a token with max_uses=N can pass N checks in each until the counts move
    to a shared store.

    Args:
        public_key: the authority's ``ed25519/<hex>`` key.
        revoked: revocation ids denied from the start.
        clock: returns the current time in Unix seconds; tests pass a fake to move time.
        use_counts: the counts of uses so far, updated in place.
        on_use: called as ``on_use(revocation_id, new_count)`` for each limited block of
            each allowed check.
        engine: ``python`` evaluates each block's terms (the fast default), ``biscuit``
            runs the Biscuit authorizer on the token's Datalog checks, and ``both`` runs
            the two and denies unless both allow.
        cache_size: verified token strings kept in memory.

    Example:
        >>> verifier = CapabilityVerifier(authority.public_key)
        >>> verifier.check(token, "coordinator", "arbor://agent/send/workers/7").allowed
        True
    """

    def __init__(
        self,
        public_key: str,
        revoked: Iterable[str] = (),
        clock: Callable[[], float] = time.time,
        *,
        use_counts: MutableMapping[str, int] | None = None,
        on_use: Callable[[str, int], None] | None = None,
        engine: Engine = "python",
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine {engine!r} is invalid; use one of {', '.join(ENGINES)}")
        self.public_key = public_key
        self._public_key = parse_public_key(public_key)
        self._revoked: frozenset[str] = frozenset(revoked)
        self._clock = clock
        self._use_counts: MutableMapping[str, int] = {} if use_counts is None else use_counts
        self._on_use = on_use
        self._engine = engine
        self._lock = threading.Lock()
        self._load_cached = functools.lru_cache(maxsize=cache_size)(self._load_uncached)
        # Allowed decisions by (token, principal, resource, caller), each with the
        # revocation list it was decided under and the first expiry of the token's blocks.
        # A hit skips parsing and evaluation, the largest part of a check between agents
        # of one host. Tokens with use limits are never kept, as each check counts a use.
        self._allowed: dict[
            tuple[str, str, str, str | None], tuple[frozenset[str], float, Decision]
        ]
        self._allowed = {}
        self._allowed_size = cache_size
        self._biscuit_limits = biscuit_auth.AuthorizerBuilder().limits()
        self._biscuit_limits.max_time = BISCUIT_MAX_TIME

    @property
    def revoked(self) -> frozenset[str]:
        """The revocation ids this verifier denies."""
        return self._revoked

    def set_revoked(self, revocation_ids: Iterable[str]) -> None:
        """Replace the revocation list, as pushed by the registry."""
        self._revoked = frozenset(revocation_ids)

    def revoke(self, *revocation_ids: str) -> None:
        """Add revocation ids; every token whose chain contains one is denied from now on."""
        with self._lock:
            self._revoked = self._revoked | frozenset(revocation_ids)

    def load(self, token: CapabilityToken | str) -> CapabilityToken:
        """Return the token verified with this verifier's public key.

        Raises:
            InvalidCapability: the token does not verify or is not an Arbor token.
        """
        text = token.to_string() if isinstance(token, CapabilityToken) else token
        if not isinstance(text, str):
            raise InvalidCapability(f"a token must be a string, got {type(text).__name__}")
        return self._load_cached(text)

    def require(
        self,
        token: CapabilityToken | str,
        principal: str,
        resource: Resource | str,
        caller: str | None = None,
    ) -> Decision:
        """Check a request like `check` and raise unless it is allowed.

        Raises:
            CapabilityDenied: naming the principal, the resource, the right and the reason.
        """
        decision = self.check(token, principal, resource, caller)
        decision.raise_if_denied()
        return decision

    def check(
        self,
        token: CapabilityToken | str,
        principal: str,
        resource: Resource | str,
        caller: str | None = None,
    ) -> Decision:
        """Decide whether ``principal`` may act on ``resource`` with ``token``.

        The operation is the URI's second component: a check on
        ``arbor://agent/send/workers/7`` requests the right to send. A malformed URI, a
        token that does not verify or a revoked one is denied, never an exception.

        Args:
            token: the token, or its string form.
            principal: the agent name or API key id that makes the request.
            resource: the concrete resource URI.
            caller: the principal the holder acts for, such as the sender of the message
                it is handling; a token with allowed callers denies a check without one.
        """
        key = (token, principal, resource, caller)
        keyable = (
            type(token) is str
            and type(principal) is str
            and type(resource) is str
            and (caller is None or type(caller) is str)
        )
        if keyable:
            hit = self._allowed.get(key)  # type: ignore[arg-type]
            if hit is not None and hit[0] is self._revoked and self._clock() < hit[1]:
                return hit[2]
        if not isinstance(principal, str):
            reason = f"the principal must be a string, got {type(principal).__name__}"
            return Decision(False, ascii(principal), ascii(resource), "access", reason)
        if isinstance(resource, Resource):
            uri = str(resource)
        else:
            try:
                resource = parse_resource(resource)
            except InvalidResource as error:
                return Decision(False, principal, ascii(resource), "access", error.rule)
            uri = str(resource)
        right = resource.operation

        if caller is not None and not isinstance(caller, str):
            reason = f"the caller must be a string or None, got {type(caller).__name__}"
            return Decision(False, principal, uri, right, reason)

        try:
            loaded = self.load(token)
        except InvalidCapability as error:
            return Decision(False, principal, uri, right, f"the token is invalid: {error}")

        if not self._revoked.isdisjoint(loaded.revocation_ids):
            return Decision(False, principal, uri, right, self._revoked_reason(loaded), loaded.id)

        limited = [
            (revocation_id, block)
            for revocation_id, block in zip(loaded.revocation_ids, loaded.blocks, strict=True)
            if block.max_uses is not None
        ]
        if not limited:
            revoked = self._revoked
            decision = self._decide(loaded, principal, resource, caller, limited)
            if decision.allowed and keyable:
                if len(self._allowed) >= self._allowed_size:
                    self._allowed.clear()
                expires = min(block.expires_at.timestamp() for block in loaded.blocks)
                self._allowed[key] = (revoked, expires, decision)  # type: ignore[index]
            return decision
        with self._lock:
            return self._decide(loaded, principal, resource, caller, limited)

    def _load_uncached(self, text: str) -> CapabilityToken:
        return load_token(text, self._public_key)

    def _decide(
        self,
        token: CapabilityToken,
        principal: str,
        resource: Resource,
        caller: str | None,
        limited: list[tuple[str, CapabilityBlock]],
    ) -> Decision:
        uri = str(resource)
        failure: tuple[str, CapabilityBlock] | None = None
        if self._engine != "biscuit":
            failure = self._evaluate(token, principal, resource, caller, limited)
        if failure is None and self._engine != "python":
            failure, detail = self._authorize(token, principal, uri, caller, limited)
            if detail:
                return Decision(False, principal, uri, resource.operation, detail, token.id)
            if failure is not None and self._engine == "both":
                logger.error(
                    "capability engines disagree on token %s for %s on %s: Python allowed, "
                    "Biscuit check %r of block %d failed",
                    token.id[:16],
                    principal,
                    uri,
                    failure[0],
                    failure[1].index,
                )
        if failure is not None:
            constraint, block = failure
            reason = _describe(constraint, block, token, principal, caller)
            return Decision(False, principal, uri, resource.operation, reason, token.id)

        for revocation_id, _ in limited:
            count = self._use_counts.get(revocation_id, 0) + 1
            if self._on_use is not None:
                self._on_use(revocation_id, count)
            self._use_counts[revocation_id] = count
        return Decision(True, principal, uri, resource.operation, "", token.id)

    def _evaluate(
        self,
        token: CapabilityToken,
        principal: str,
        resource: Resource,
        caller: str | None,
        limited: list[tuple[str, CapabilityBlock]],
    ) -> tuple[str, CapabilityBlock] | None:
        """Return the first constraint the request breaks, with its block, or None."""
        if principal != token.principal:
            return HOLDER, token.blocks[-1]
        now = self._clock()
        for block in token.blocks:
            if now >= block.expires_at.timestamp():
                return EXPIRY, block
            if not block.allows(resource):
                return RESOURCE, block
            if block.allowed_callers is not None and caller not in block.allowed_callers:
                return CALLER, block
        for revocation_id, block in limited:
            max_uses = block.max_uses or 0
            if self._use_counts.get(revocation_id, 0) >= max_uses:
                return USES, block
        return None

    def _authorize(
        self,
        token: CapabilityToken,
        principal: str,
        uri: str,
        caller: str | None,
        limited: list[tuple[str, CapabilityBlock]],
    ) -> tuple[tuple[str, CapabilityBlock] | None, str]:
        """Run the Biscuit authorizer on the token's own checks.

        Returns:
            The failed constraint and its block, or None; and a reason for failures that
            map to no constraint (empty otherwise).
        """
        # Biscuit dates have whole seconds; rounding now down keeps "now < expiry" exact
        # because expiries are whole seconds too.
        now = datetime.fromtimestamp(int(self._clock()), timezone.utc)
        lines = [
            "time({now});",
            "resource({resource});",
            "principal({principal});",
            "delegation_depth({depth});",
        ]
        parameters: dict[str, object] = {
            "now": now,
            "resource": uri,
            "principal": principal,
            "depth": len(token.blocks) - 1,
        }
        if caller is not None:
            lines.append("caller({caller});")
            parameters["caller"] = caller
        for revocation_id, block in limited:
            lines.append(f"use_count({block.index}, {{count{block.index}}});")
            parameters[f"count{block.index}"] = self._use_counts.get(revocation_id, 0) + 1
        lines.append("allow if true;")

        builder = biscuit_auth.AuthorizerBuilder("\n".join(lines), parameters)
        builder.set_limits(self._biscuit_limits)
        try:
            builder.build(token._biscuit).authorize()
        except biscuit_auth.AuthorizationError as error:
            found = _FAILED_CHECK.search(str(error))
            if found is None:
                return None, f"the Biscuit authorizer denied the request: {error}"
            check_index, block_index = int(found.group(1)), int(found.group(2))
            block = token.blocks[block_index]
            return (block.check_names()[check_index], block), ""
        return None, ""

    def _revoked_reason(self, token: CapabilityToken) -> str:
        for index, revocation_id in enumerate(token.revocation_ids):
            if revocation_id in self._revoked:
                holder = token.blocks[index].principal
                if index == len(token.blocks) - 1:
                    return f"the token {revocation_id[:16]} was revoked"
                return (
                    f"the token was delegated from token {revocation_id[:16]} (held by "
                    f"{holder!r}), which was revoked"
                )
        return "the token was revoked"


def _describe(
    constraint: str,
    block: CapabilityBlock,
    token: CapabilityToken,
    principal: str,
    caller: str | None,
) -> str:
    """Return the reason a request breaks ``constraint`` of ``block``."""
    if constraint == HOLDER:
        return f"the token is held by {token.principal!r}, not {principal!r}"
    if constraint == EXPIRY:
        return f"the token expired at {block.expires_at.isoformat()}"
    if constraint == RESOURCE:
        return f"the token grants {sorted(block.operations)} on {block.pattern} only"
    if constraint == CALLER:
        allowed = sorted(block.allowed_callers or ())
        if caller is None:
            return f"the token accepts only the callers {allowed}, and the check named none"
        return f"caller {caller!r} is not among the allowed callers {allowed}"
    if constraint == USES:
        return f"the {block.max_uses} uses that token block {block.index} allows are spent"
    if constraint == DEPTH:
        return f"the token is delegated more often than block {block.index} allows"
    return f"constraint {constraint!r} of token block {block.index} failed"
