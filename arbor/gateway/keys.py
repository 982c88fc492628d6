"""API keys: creation, salted hashing and verification of bearer secrets.

A key reads ``arbor_<id>_<secret>``: the id is public and names the principal
``key:<id>``, the secret is 32 random bytes in URL-safe base64. The store keeps only a
scrypt hash of the secret with a per-key salt, so a copy of the database does not yield
usable keys.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from arbor.errors import ArborError, InvalidApiKey
from arbor.persistence.gateway import ApiKeyRecord

PREFIX = "arbor_"

# scrypt cost: N=2**14, r=8, p=1 uses 16 MiB and takes tens of milliseconds, the
# interactive-login setting from the scrypt paper. The gateway verifies a key once and then
# compares a SHA-256 digest, so this cost is paid once per key and replica.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
SECRET_BYTES = 32

MAX_NAME_LENGTH = 200

_KEY_PATTERN = re.compile(r"arbor_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")

__all__ = ["InvalidApiKey", "NewApiKey", "create_api_key", "hash_secret", "parse_key"]


@dataclass(frozen=True)
class NewApiKey:
    """A key just created: its record and the full key text, shown only this once."""

    record: ApiKeyRecord
    key: str

    def __repr__(self) -> str:
        return f"NewApiKey(id={self.record.id!r}, name={self.record.name!r})"


def create_api_key(store: Any, name: str) -> NewApiKey:
    """Create and store a key labelled ``name``; returns it with its secret.

    Raises:
        ArborError: the name is empty, longer than 200 characters or not printable.
    """
    if not name or len(name) > MAX_NAME_LENGTH or not name.isprintable():
        raise ArborError(
            f"API key name {name[:40]!r} is invalid; pass 1 to {MAX_NAME_LENGTH} printable "
            "characters"
        )
    key_id = secrets.token_hex(8)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(SECRET_BYTES)).decode().rstrip("=")
    record = ApiKeyRecord(
        id=key_id, name=name, secret_hash=hash_secret(secret), created_at=datetime.now(UTC)
    )
    store.create_api_key(record)
    return NewApiKey(record=record, key=f"{PREFIX}{key_id}_{secret}")


def parse_key(text: str) -> tuple[str, str]:
    """Split a key into ``(id, secret)``.

    Raises:
        InvalidApiKey: the text does not have the ``arbor_<id>_<secret>`` form.
    """
    match = _KEY_PATTERN.fullmatch(text)
    if match is None:
        raise InvalidApiKey(
            "the API key is malformed; pass the arbor_<id>_<secret> text that "
            "`arbor keys create` printed"
        )
    return match.group(1), match.group(2)


def hash_secret(secret: str, salt: bytes | None = None) -> str:
    """Return ``scrypt$N$r$p$<salt hex>$<hash hex>`` for ``secret``."""
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    digest = hashlib.scrypt(
        secret.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32
    )
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def secret_matches(secret: str, encoded: str) -> bool:
    """Return whether ``secret`` hashes to ``encoded``, comparing in constant time."""
    try:
        scheme, n, r, p, salt_hex, digest_hex = encoded.split("$")
        if scheme != "scrypt":
            return False
        digest = hashlib.scrypt(
            secret.encode(),
            salt=bytes.fromhex(salt_hex),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(digest_hex) // 2,
        )
    except ValueError:
        return False
    return hmac.compare_digest(digest.hex(), digest_hex)
