"""Authentication of bearer API keys and capability checks for each request.

Checks go through the same `Guard` and `Wallet` the agents use: the guard verifies the
key's token locally, audits a denial, and learns revocations from the store.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
import uuid
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any

from arbor.errors import CapabilityDenied, InvalidAgentName, InvalidApiKey
from arbor.gateway.keys import _KEY_PATTERN, parse_key, secret_matches
from arbor.registry.spec import validate_name
from arbor.runtime.guard import Guard, Wallet
from arbor.security import parse_resource

# Seconds a verified key is trusted before its row is read again, so a revoked key stops
# working within this long on every replica.
KEY_RECHECK_S = 1.0

# Wallets kept per replica, least recently used dropped first.
MAX_WALLETS = 1024

_KEY_PRINCIPAL = "key:"


class KeyOrigin:
    """The sender of messages that an API key sends through the gateway.

    `AgentRef` takes the message id and the capability token from its origin, so the
    receiving agent checks the key exactly as it checks another agent.
    """

    def __init__(self, principal: str, wallet: Wallet, guard: Guard) -> None:
        self.name = principal
        self._wallet = wallet
        self._guard = guard

    def next_message_id(self) -> str:
        """Return a fresh message id."""
        return uuid.uuid4().hex

    def credential(self, operation: str, target: str) -> str | None:
        """Return the key's token for ``operation`` on agent ``target``.

        Raises:
            CapabilityDenied: the key holds no capability for it; the denial is audited.
        """
        uri = f"arbor://agent/{operation}/{target}"
        token = self._wallet.token_for(uri)
        if token is None:
            self._guard.require(None, self.name, uri)
        return token

    def stage_send(self, target: str, envelope: Any) -> bool:
        """Return False: the gateway has no outbox, so every send goes out at once."""
        return False


class Authenticator:
    """Verifies bearer keys and checks their capabilities, with per-key caches."""

    def __init__(self, store: Any, guard: Guard) -> None:
        self.store = store
        self.guard = guard
        self._lock = threading.Lock()
        # key id -> (SHA-256 of the verified secret, monotonic time of the last row read).
        self._verified: dict[str, tuple[bytes, float]] = {}
        self._wallets: OrderedDict[str, Wallet] = OrderedDict()
        # (principal, uri) -> the token that last passed the check, for `require_cached`.
        self._allowed: OrderedDict[tuple[str, str], str] = OrderedDict()

    def authenticate_cached(self, authorization: str | None) -> str | None:
        """Return the principal when the key was verified in the last `KEY_RECHECK_S` seconds.

        It does no I/O, so the event loop may call it; None means: call `authenticate`.
        """
        if not authorization:
            return None
        scheme, _, credentials = authorization.partition(" ")
        match = _KEY_PATTERN.fullmatch(credentials.strip())
        if scheme.lower() != "bearer" or match is None:
            return None
        with self._lock:
            cached = self._verified.get(match.group(1))
        if cached is None or time.monotonic() - cached[1] >= KEY_RECHECK_S:
            return None
        digest = hashlib.sha256(match.group(2).encode()).digest()
        return _KEY_PRINCIPAL + match.group(1) if hmac.compare_digest(cached[0], digest) else None

    def authenticate(self, authorization: str | None) -> str:
        """Return the principal ``key:<id>`` of the request's bearer key.

        Raises:
            InvalidApiKey: the header is missing, malformed, or names an unknown or revoked
                key, or the secret is wrong.
        """
        if not authorization:
            raise InvalidApiKey(
                "missing API key; send the header 'Authorization: Bearer arbor_<id>_<secret>'"
            )
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise InvalidApiKey(
                "the Authorization header is not a bearer key; send 'Bearer arbor_<id>_<secret>'"
            )
        key_id, secret = parse_key(credentials.strip())
        digest = hashlib.sha256(secret.encode()).digest()
        with self._lock:
            cached = self._verified.get(key_id)
        now = time.monotonic()
        known = cached is not None and hmac.compare_digest(cached[0], digest)
        if known and cached is not None and now - cached[1] < KEY_RECHECK_S:
            return _KEY_PRINCIPAL + key_id
        record = self.store.get_api_key(key_id)
        if record is None or record.revoked_at is not None:
            with self._lock:
                self._verified.pop(key_id, None)
            state = "revoked" if record is not None else "unknown"
            raise InvalidApiKey(
                f"API key {key_id} is {state}; create a new one with `arbor keys create`"
            )
        if not known and not secret_matches(secret, record.secret_hash):
            raise InvalidApiKey(f"API key {key_id}: the secret is wrong")
        with self._lock:
            self._verified[key_id] = (digest, now)
        return _KEY_PRINCIPAL + key_id

    def wallet(self, principal: str) -> Wallet:
        """Return the cached wallet of ``principal``."""
        with self._lock:
            wallet = self._wallets.get(principal)
            if wallet is not None:
                self._wallets.move_to_end(principal)
                return wallet
        wallet = Wallet(principal, self.guard)
        with self._lock:
            self._wallets[principal] = wallet
            while len(self._wallets) > MAX_WALLETS:
                self._wallets.popitem(last=False)
        return wallet

    def require(self, principal: str, uri: str) -> str:
        """Return the key's token for ``uri``, or raise `CapabilityDenied` naming the URI.

        A denial is audited by the guard.
        """
        token = self.wallet(principal).token_for(uri)
        decision = self.guard.check(token, principal, uri)
        if not decision.allowed:
            with self._lock:
                self._allowed.pop((principal, uri), None)
            raise CapabilityDenied(principal, uri, decision.right, decision.reason)
        assert token is not None
        with self._lock:
            self._allowed[(principal, uri)] = token
            while len(self._allowed) > MAX_WALLETS * 4:
                self._allowed.popitem(last=False)
        return token

    def require_cached(self, principal: str, uri: str) -> str | None:
        """Return the token that last passed for ``uri`` if it still passes, else None.

        It reads no store unless the check is denied (a denial is audited), so the event
        loop may call it. None means the cached token is revoked or expired, or there is
        none: call `require`, which may read the store.

        Raises:
            CapabilityDenied: the cached token no longer passes, such as when its
                ``max_uses`` are spent.
        """
        with self._lock:
            token = self._allowed.get((principal, uri))
        if token is None:
            return None
        loaded = self.guard.verifier.load(token)
        revoked = not self.guard.verifier.revoked.isdisjoint(loaded.revocation_ids)
        if revoked or loaded.expires_at <= datetime.now(UTC):
            # The wallet may hold another token that fits; `require` looks for it.
            return None
        decision = self.guard.check(token, principal, uri)
        if not decision.allowed:
            raise CapabilityDenied(principal, uri, decision.right, decision.reason)
        return token

    def may(self, principal: str, uri: str) -> bool:
        """Return whether a held, live token's pattern covers ``uri``, without auditing.

        For filtering lists: use limits (``max_uses``) and caller limits are not applied.
        """
        resource = parse_resource(uri)
        for token in self.wallet(principal).tokens():
            if resource.operation in token.operations and token.pattern.matches(resource):
                return True
        return False

    def origin(self, principal: str) -> KeyOrigin:
        """Return the message origin of ``principal``."""
        return KeyOrigin(principal, self.wallet(principal), self.guard)


def principal_path(principal: str) -> str:
    """Return the URI path of a principal: an agent name, or ``key/<id>`` for ``key:<id>``.

    A ``:`` cannot appear in a resource path, so key principals use ``key/<id>``, which
    ``arbor://capability/grant/key/*`` covers.

    Raises:
        InvalidAgentName: the principal is neither a valid agent name nor ``key:<id>``.
    """
    if principal.startswith(_KEY_PRINCIPAL):
        key_id = principal[len(_KEY_PRINCIPAL) :]
        if len(key_id) == 16 and all(char in "0123456789abcdef" for char in key_id):
            return f"key/{key_id}"
        raise InvalidAgentName(
            f"principal {principal!r} is invalid; a key principal is key:<16 hex digits>"
        )
    return validate_name(principal)
