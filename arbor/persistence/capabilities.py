"""Store tables for capabilities, revocations and the cluster signing key.

The SQLite and PostgreSQL stores share these methods by mixing this class in. The two
differ only in placeholders and in how times and JSON are kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

# The name of the one signing key row; a later key rotation can add others.
SIGNING_KEY = "capabilities"

_COLUMNS = (
    "id, principal, parent_id, pattern, operations, token, granted_by, created_at, "
    "expires_at, revoked_at"
)


@dataclass(frozen=True)
class CapabilityRecord:
    """One issued capability token as the store keeps it.

    Attributes:
        id: the token id (the revocation id of its last block).
        principal: the holder, an agent name or an API key id such as ``key:ab12``.
        parent_id: the token it was delegated from, or None for an issued one.
        pattern: the resource pattern, such as ``arbor://agent/send/workers/**``.
        operations: the operations granted on the pattern.
        token: the signed token text, a bearer credential.
        granted_by: the principal that granted or delegated it.
        created_at: when it was issued.
        expires_at: the end of its validity.
        revoked_at: when it was revoked, directly or through a parent, or None.
    """

    id: str
    principal: str
    parent_id: str | None
    pattern: str
    operations: tuple[str, ...]
    token: str
    granted_by: str
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None = None

    def __repr__(self) -> str:
        # The token text is a credential, so it stays out of reprs and logs.
        return (
            f"CapabilityRecord(id={self.id[:16]}..., principal={self.principal!r}, "
            f"pattern={self.pattern!r}, operations={list(self.operations)}, "
            f"revoked={self.revoked_at is not None})"
        )


class CapabilityTables:
    """Capability, revocation and signing key methods for a store with ``_transaction``."""

    dialect: str
    # Provided by the store class that mixes this in.
    _transaction: Any
    _retry: Any

    def save_capability(self, record: CapabilityRecord) -> None:
        """Insert an issued or delegated capability."""

        def step() -> None:
            with self._transaction() as connection:
                connection.execute(
                    self._cap_sql(
                        f"INSERT INTO arbor_capabilities ({_COLUMNS}) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    ),
                    (
                        record.id,
                        record.principal,
                        record.parent_id,
                        record.pattern,
                        self._cap_json(list(record.operations)),
                        record.token,
                        record.granted_by,
                        self._cap_time(record.created_at),
                        self._cap_time(record.expires_at),
                        self._cap_time(record.revoked_at),
                    ),
                )

        self._retry("save_capability", step)

    def get_capability(self, capability_id: str) -> CapabilityRecord | None:
        """Return the capability with this id, or None."""

        def step() -> CapabilityRecord | None:
            with self._transaction() as connection:
                row = connection.execute(
                    self._cap_sql(f"SELECT {_COLUMNS} FROM arbor_capabilities WHERE id = ?"),
                    (capability_id,),
                ).fetchone()
            return self._cap_record(row) if row else None

        result: CapabilityRecord | None = self._retry("get_capability", step)
        return result

    def list_capabilities(
        self,
        principal: str | None = None,
        include_revoked: bool = False,
        namespace: str | None = None,
    ) -> list[CapabilityRecord]:
        """Return capabilities, optionally of one holder, oldest first.

        ``namespace`` keeps the capabilities held by that namespace's principals, read
        through the index on the ``namespace`` column the database derives from the
        principal. API keys (``key:<id>``) are in no namespace and never match one.
        """
        conditions, parameters = [], []
        for column, value in (("principal", principal), ("namespace", namespace)):
            if value is not None:
                conditions.append(f"{column} = ?")
                parameters.append(value)
        if not include_revoked:
            conditions.append("revoked_at IS NULL")
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""

        def step() -> list[CapabilityRecord]:
            with self._transaction() as connection:
                rows = connection.execute(
                    self._cap_sql(
                        f"SELECT {_COLUMNS} FROM arbor_capabilities{where} ORDER BY created_at, id"
                    ),
                    tuple(parameters),
                ).fetchall()
            return [self._cap_record(row) for row in rows]

        result: list[CapabilityRecord] = self._retry("list_capabilities", step)
        return result

    def revoke_capabilities(
        self, capability_ids: list[str] | None = None, principal: str | None = None
    ) -> list[str]:
        """Revoke capabilities and everything delegated from them, in one transaction.

        Args:
            capability_ids: the tokens to revoke.
            principal: also revoke every live token this holder has.

        Returns:
            The ids newly revoked, the named ones and their descendants; already revoked
            ones are left out.
        """
        now = datetime.now(UTC)

        def step() -> list[str]:
            with self._transaction() as connection:
                pending = list(capability_ids or [])
                if principal is not None:
                    rows = connection.execute(
                        self._cap_sql(
                            "SELECT id FROM arbor_capabilities "
                            "WHERE principal = ? AND revoked_at IS NULL"
                        ),
                        (principal,),
                    ).fetchall()
                    pending.extend(row[0] for row in rows)
                revoked: list[str] = []
                seen: set[str] = set()
                while pending:
                    current = pending.pop()
                    if current in seen:
                        continue
                    seen.add(current)
                    updated = connection.execute(
                        self._cap_sql(
                            "UPDATE arbor_capabilities SET revoked_at = ? "
                            "WHERE id = ? AND revoked_at IS NULL"
                        ),
                        (self._cap_time(now), current),
                    )
                    if updated.rowcount:
                        revoked.append(current)
                        connection.execute(
                            self._cap_sql(
                                "INSERT INTO arbor_revocations (token_id, revoked_at) VALUES (?, ?)"
                            ),
                            (current, self._cap_time(now)),
                        )
                    children = connection.execute(
                        self._cap_sql("SELECT id FROM arbor_capabilities WHERE parent_id = ?"),
                        (current,),
                    ).fetchall()
                    pending.extend(row[0] for row in children)
                return revoked

        result: list[str] = self._retry("revoke_capabilities", step)
        return result

    def revocations_since(self, seq: int) -> list[tuple[int, str]]:
        """Return ``(seq, token id)`` of the revocations after ``seq``, in order."""

        def step() -> list[tuple[int, str]]:
            with self._transaction() as connection:
                rows = connection.execute(
                    self._cap_sql(
                        "SELECT seq, token_id FROM arbor_revocations WHERE seq > ? ORDER BY seq"
                    ),
                    (seq,),
                ).fetchall()
            return [(int(row[0]), str(row[1])) for row in rows]

        result: list[tuple[int, str]] = self._retry("revocations_since", step)
        return result

    def signing_key(self) -> tuple[str, str | None] | None:
        """Return the stored ``(public key, private key or None)``, or None before any."""

        def step() -> tuple[str, str | None] | None:
            with self._transaction() as connection:
                row = connection.execute(
                    self._cap_sql(
                        "SELECT public_key, private_key FROM arbor_cluster_keys WHERE name = ?"
                    ),
                    (SIGNING_KEY,),
                ).fetchone()
            return (row[0], row[1]) if row else None

        result: tuple[str, str | None] | None = self._retry("signing_key", step)
        return result

    def store_signing_key(
        self, public_key: str, private_key: str | None, replace: bool = False
    ) -> tuple[str, str | None]:
        """Store the signing key unless one exists (or ``replace``); returns the stored one.

        Two registries starting at once both call this, and both get the first one's key.
        """

        def step() -> tuple[str, str | None]:
            with self._transaction() as connection:
                if replace:
                    connection.execute(
                        self._cap_sql("DELETE FROM arbor_cluster_keys WHERE name = ?"),
                        (SIGNING_KEY,),
                    )
                connection.execute(
                    self._cap_sql(
                        "INSERT INTO arbor_cluster_keys (name, public_key, private_key) "
                        "VALUES (?, ?, ?) ON CONFLICT (name) DO NOTHING"
                    ),
                    (SIGNING_KEY, public_key, private_key),
                )
                row = connection.execute(
                    self._cap_sql(
                        "SELECT public_key, private_key FROM arbor_cluster_keys WHERE name = ?"
                    ),
                    (SIGNING_KEY,),
                ).fetchone()
            return (row[0], row[1])

        result: tuple[str, str | None] = self._retry("store_signing_key", step)
        return result

    def _cap_sql(self, text: str) -> str:
        return text.replace("?", "%s") if self.dialect == "postgresql" else text

    def _cap_json(self, value: Any) -> Any:
        if self.dialect == "postgresql":
            from psycopg.types.json import Jsonb

            return Jsonb(value)
        return json.dumps(value)

    def _cap_time(self, value: datetime | None) -> Any:
        if value is None or self.dialect == "postgresql":
            return value
        return value.timestamp()

    def _cap_read_time(self, value: Any) -> datetime | None:
        if value is None or isinstance(value, datetime):
            return value
        return datetime.fromtimestamp(float(value), UTC)

    def _cap_record(self, row: tuple[Any, ...]) -> CapabilityRecord:
        operations = row[4] if isinstance(row[4], list) else json.loads(row[4])
        created_at = self._cap_read_time(row[7])
        expires_at = self._cap_read_time(row[8])
        assert created_at is not None and expires_at is not None
        return CapabilityRecord(
            id=row[0],
            principal=row[1],
            parent_id=row[2],
            pattern=row[3],
            operations=tuple(operations),
            token=row[5],
            granted_by=row[6],
            created_at=created_at,
            expires_at=expires_at,
            revoked_at=self._cap_read_time(row[9]),
        )
