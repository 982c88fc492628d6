"""Store table for durable reminders.

The SQLite and PostgreSQL stores share these methods by mixing this class in. Due times
cross this interface as integer Unix milliseconds, so a due time read back from either
database equals the one written, and a message id derived from it is stable.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

_COLUMNS = "agent, name, id, due_at, period_ms, payload, created_at, fired"


@dataclass(frozen=True)
class ReminderRecord:
    """One reminder as the store keeps it.

    Attributes:
        agent: the agent it is delivered to.
        name: its name, unique per agent.
        id: a random id, new each time the reminder is set.
        due_ms: the next firing, in Unix milliseconds.
        period_ms: the period of a periodic reminder in milliseconds, or None for a one-shot.
        payload_json: the payload as JSON text.
        created_at: when it was last set.
        fired: deliveries the agent acknowledged since it was set.
    """

    agent: str
    name: str
    id: str
    due_ms: int
    period_ms: int | None
    payload_json: str
    created_at: datetime
    fired: int = 0


class ReminderTables:
    """Reminder methods for a store with ``_transaction`` and ``_retry``."""

    dialect: str
    # Provided by the store class that mixes this in.
    _transaction: Any
    _retry: Any

    def save_reminder(self, record: ReminderRecord) -> None:
        """Insert the reminder, or replace the one the agent has under the same name."""

        def step() -> None:
            with self._transaction() as connection:
                connection.execute(
                    self._rem_sql(
                        f"INSERT INTO arbor_reminders ({_COLUMNS}) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, 0) "
                        "ON CONFLICT (agent, name) DO UPDATE SET id = excluded.id, "
                        "due_at = excluded.due_at, period_ms = excluded.period_ms, "
                        "payload = excluded.payload, created_at = excluded.created_at, "
                        "fired = 0"
                    ),
                    (
                        record.agent,
                        record.name,
                        record.id,
                        self._rem_time(record.due_ms),
                        record.period_ms,
                        record.payload_json,
                        self._rem_time(round(record.created_at.timestamp() * 1000)),
                    ),
                )

        self._retry("save_reminder", step)

    def list_reminders(
        self, agent: str | None = None, namespace: str | None = None
    ) -> list[ReminderRecord]:
        """Return the reminders of ``agent`` (every agent's when None), soonest first.

        ``namespace`` keeps the reminders of that namespace's agents, read through the
        index on the ``namespace`` column the database derives from the agent's name.
        """
        conditions, parameters = [], []
        for column, value in (("agent", agent), ("namespace", namespace)):
            if value is not None:
                conditions.append(f"{column} = ?")
                parameters.append(value)
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""

        def step() -> list[ReminderRecord]:
            with self._transaction() as connection:
                rows = connection.execute(
                    self._rem_sql(
                        f"SELECT {_COLUMNS} FROM arbor_reminders{where} "
                        "ORDER BY due_at, agent, name"
                    ),
                    tuple(parameters),
                ).fetchall()
            return [self._rem_record(row) for row in rows]

        result: list[ReminderRecord] = self._retry("list_reminders", step)
        return result

    def delete_reminder(self, agent: str, name: str) -> bool:
        """Delete one reminder; returns whether it existed."""

        def step() -> bool:
            with self._transaction() as connection:
                cursor = connection.execute(
                    self._rem_sql("DELETE FROM arbor_reminders WHERE agent = ? AND name = ?"),
                    (agent, name),
                )
                return bool(cursor.rowcount > 0)

        result: bool = self._retry("delete_reminder", step)
        return result

    def delete_reminders(self, agent: str) -> int:
        """Delete every reminder of ``agent``; returns how many there were."""

        def step() -> int:
            with self._transaction() as connection:
                cursor = connection.execute(
                    self._rem_sql("DELETE FROM arbor_reminders WHERE agent = ?"), (agent,)
                )
                return int(cursor.rowcount)

        result: int = self._retry("delete_reminders", step)
        return result

    def advance_reminders(self, deliveries: list[tuple[str, str, str, int, int | None]]) -> int:
        """Record acknowledged deliveries, in one transaction.

        Each item is ``(agent, name, reminder id, due ms, next due ms or None)``. A periodic
        reminder moves to its next due time, and a one-shot one (next due None) is
        deleted. A row changes only while it still has that id and due time, so a reminder
        set again, or advanced by another registry, is left alone.

        Returns:
            How many rows matched and changed.
        """
        match = "agent = ? AND name = ? AND id = ? AND due_at = ?"

        def step() -> int:
            changed = 0
            with self._transaction() as connection:
                for agent, name, reminder_id, due_ms, next_due_ms in deliveries:
                    key = (agent, name, reminder_id, self._rem_time(due_ms))
                    if next_due_ms is None:
                        cursor = connection.execute(
                            self._rem_sql(f"DELETE FROM arbor_reminders WHERE {match}"), key
                        )
                    else:
                        cursor = connection.execute(
                            self._rem_sql(
                                f"UPDATE arbor_reminders SET due_at = ?, fired = fired + 1 "
                                f"WHERE {match}"
                            ),
                            (self._rem_time(next_due_ms), *key),
                        )
                    changed += cursor.rowcount
            return changed

        result: int = self._retry("advance_reminders", step)
        return result

    def _rem_sql(self, text: str) -> str:
        return text.replace("?", "%s") if self.dialect == "postgresql" else text

    def _rem_time(self, milliseconds: int) -> Any:
        if self.dialect == "postgresql":
            return datetime.fromtimestamp(milliseconds / 1000, UTC)
        return milliseconds / 1000

    def _rem_read_ms(self, value: Any) -> int:
        if isinstance(value, datetime):
            return round(value.timestamp() * 1000)
        return round(float(value) * 1000)

    def _rem_record(self, row: tuple[Any, ...]) -> ReminderRecord:
        return ReminderRecord(
            agent=row[0],
            name=row[1],
            id=row[2],
            due_ms=self._rem_read_ms(row[3]),
            period_ms=int(row[4]) if row[4] is not None else None,
            payload_json=row[5],
            created_at=datetime.fromtimestamp(self._rem_read_ms(row[6]) / 1000, UTC),
            fired=int(row[7]),
        )
