"""Store tables for topics: the per-topic event log and the durable subscriptions.

The SQLite and PostgreSQL stores share these methods by mixing this class in. Each topic
has a head, the seq of the newest event ever appended. Seqs start at 1, grow by one per
event and are never reused. A subscriber's position (the seq of the last event it has
passed) and a message id built from a seq therefore stay valid after trimming.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

# Subscription kinds: an agent receives deliveries from the registry's pump, and a client
# iterator fetches events from the registry itself.
AGENT_SUBSCRIPTION = "agent"
CLIENT_SUBSCRIPTION = "client"

_SUBSCRIPTION_COLUMNS = (
    "topic, subscriber, kind, handler, max_lag, position, delivered, skipped, created_at"
)


@dataclass(frozen=True)
class TopicEventRecord:
    """One event of a topic's log.

    Attributes:
        topic: the topic it was published to.
        seq: its position in the topic, from 1.
        publisher: the agent that published it, or None for a client.
        event_json: the event as JSON text.
        published_at: when it was appended.
    """

    topic: str
    seq: int
    publisher: str | None
    event_json: str
    published_at: datetime


@dataclass(frozen=True)
class SubscriptionRecord:
    """One subscription as the store keeps it.

    Attributes:
        topic: the topic.
        subscriber: an agent name, or ``client:<id>`` for a client iterator.
        kind: `AGENT_SUBSCRIPTION` or `CLIENT_SUBSCRIPTION`.
        handler: the agent's handler that receives ``(topic, event)``; None for a client.
        max_lag: events the subscriber may fall behind the head before the oldest are
            skipped.
        position: the seq of the last event the subscriber has passed, delivered or skipped.
        delivered: events delivered and recorded so far.
        skipped: events skipped by the overflow policy so far.
        created_at: when the subscription was first made.
    """

    topic: str
    subscriber: str
    kind: str
    handler: str | None
    max_lag: int
    position: int
    delivered: int
    skipped: int
    created_at: datetime


class TopicTables:
    """Topic methods for a store with ``_transaction`` and ``_retry``."""

    dialect: str
    # Provided by the store class that mixes this in.
    _transaction: Any
    _retry: Any

    def append_topic_event(
        self, topic: str, publish_id: str, publisher: str | None, event_json: str
    ) -> tuple[int, bool]:
        """Append an event to the topic's log, once per ``publish_id``.

        Returns:
            The event's seq, and False when an event with ``publish_id`` was already in
            the log, in which case nothing was appended and its seq is returned.
        """
        now = self._topic_time(datetime.now(UTC))

        def step() -> tuple[int, bool]:
            with self._transaction() as connection:
                # Locking the topic row serialises appends to one topic, so seqs have no
                # gaps and two retries of one publish cannot both pass the check below.
                connection.execute(
                    self._topic_sql(
                        "INSERT INTO arbor_topics (topic, head) VALUES (?, 0) "
                        "ON CONFLICT (topic) DO NOTHING"
                    ),
                    (topic,),
                )
                lock = " FOR UPDATE" if self.dialect == "postgresql" else ""
                head = connection.execute(
                    self._topic_sql(f"SELECT head FROM arbor_topics WHERE topic = ?{lock}"),
                    (topic,),
                ).fetchone()[0]
                existing = connection.execute(
                    self._topic_sql(
                        "SELECT seq FROM arbor_topic_events WHERE topic = ? AND publish_id = ?"
                    ),
                    (topic, publish_id),
                ).fetchone()
                if existing is not None:
                    return int(existing[0]), False
                seq = int(head) + 1
                connection.execute(
                    self._topic_sql("UPDATE arbor_topics SET head = ? WHERE topic = ?"),
                    (seq, topic),
                )
                connection.execute(
                    self._topic_sql(
                        "INSERT INTO arbor_topic_events (topic, seq, publish_id, publisher, "
                        "event, published_at) VALUES (?, ?, ?, ?, ?, ?)"
                    ),
                    (topic, seq, publish_id, publisher, event_json, now),
                )
                return seq, True

        result: tuple[int, bool] = self._retry("append_topic_event", step)
        return result

    def read_topic_events(self, topic: str, after: int, limit: int) -> list[TopicEventRecord]:
        """Return up to ``limit`` events of ``topic`` with a seq above ``after``, oldest first."""

        def step() -> list[TopicEventRecord]:
            with self._transaction() as connection:
                rows = connection.execute(
                    self._topic_sql(
                        "SELECT topic, seq, publisher, event, published_at "
                        "FROM arbor_topic_events WHERE topic = ? AND seq > ? "
                        "ORDER BY seq LIMIT ?"
                    ),
                    (topic, after, limit),
                ).fetchall()
            return [
                TopicEventRecord(row[0], int(row[1]), row[2], row[3], self._topic_read_time(row[4]))
                for row in rows
            ]

        result: list[TopicEventRecord] = self._retry("read_topic_events", step)
        return result

    def topic_heads(self) -> dict[str, int]:
        """Return the head seq of every topic that has had an event."""

        def step() -> dict[str, int]:
            with self._transaction() as connection:
                rows = connection.execute("SELECT topic, head FROM arbor_topics").fetchall()
            return {row[0]: int(row[1]) for row in rows}

        result: dict[str, int] = self._retry("topic_heads", step)
        return result

    def save_subscription(
        self, topic: str, subscriber: str, kind: str, handler: str | None, max_lag: int
    ) -> SubscriptionRecord:
        """Subscribe ``subscriber`` to ``topic`` from the next event published.

        Subscribing again changes the handler and ``max_lag`` and keeps the position, so
        no event is delivered twice or missed because of it.
        """
        now = self._topic_time(datetime.now(UTC))

        def step() -> SubscriptionRecord:
            with self._transaction() as connection:
                head = connection.execute(
                    self._topic_sql("SELECT head FROM arbor_topics WHERE topic = ?"), (topic,)
                ).fetchone()
                connection.execute(
                    self._topic_sql(
                        f"INSERT INTO arbor_subscriptions ({_SUBSCRIPTION_COLUMNS}) "
                        "VALUES (?, ?, ?, ?, ?, ?, 0, 0, ?) "
                        "ON CONFLICT (topic, subscriber) DO UPDATE SET kind = excluded.kind, "
                        "handler = excluded.handler, max_lag = excluded.max_lag"
                    ),
                    (topic, subscriber, kind, handler, max_lag, int(head[0]) if head else 0, now),
                )
                row = connection.execute(
                    self._topic_sql(
                        f"SELECT {_SUBSCRIPTION_COLUMNS} FROM arbor_subscriptions "
                        "WHERE topic = ? AND subscriber = ?"
                    ),
                    (topic, subscriber),
                ).fetchone()
            return self._subscription(row)

        result: SubscriptionRecord = self._retry("save_subscription", step)
        return result

    def list_subscriptions(
        self, topic: str | None = None, subscriber: str | None = None, namespace: str | None = None
    ) -> list[SubscriptionRecord]:
        """Return the subscriptions to ``topic`` and of ``subscriber`` (None: any).

        ``namespace`` keeps the subscriptions to that namespace's topics, read through the
        index on the ``namespace`` column the database derives from the topic.
        """
        conditions = []
        parameters: list[Any] = []
        for column, value in (
            ("topic", topic),
            ("subscriber", subscriber),
            ("namespace", namespace),
        ):
            if value is not None:
                conditions.append(f"{column} = ?")
                parameters.append(value)
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""

        def step() -> list[SubscriptionRecord]:
            with self._transaction() as connection:
                rows = connection.execute(
                    self._topic_sql(
                        f"SELECT {_SUBSCRIPTION_COLUMNS} FROM arbor_subscriptions{where} "
                        "ORDER BY topic, subscriber"
                    ),
                    tuple(parameters),
                ).fetchall()
            return [self._subscription(row) for row in rows]

        result: list[SubscriptionRecord] = self._retry("list_subscriptions", step)
        return result

    def advance_subscription(
        self, topic: str, subscriber: str, position: int, delivered: int, skipped: int
    ) -> bool:
        """Move a subscription to ``position`` and add to its delivered and skipped counts.

        Nothing changes unless the stored position is behind ``position``, so a position
        never moves back.

        Returns:
            Whether the subscription exists and moved.
        """

        def step() -> bool:
            with self._transaction() as connection:
                cursor = connection.execute(
                    self._topic_sql(
                        "UPDATE arbor_subscriptions SET position = ?, "
                        "delivered = delivered + ?, skipped = skipped + ? "
                        "WHERE topic = ? AND subscriber = ? AND position < ?"
                    ),
                    (position, delivered, skipped, topic, subscriber, position),
                )
                return bool(cursor.rowcount > 0)

        result: bool = self._retry("advance_subscription", step)
        return result

    def delete_subscription(self, topic: str, subscriber: str) -> bool:
        """Delete one subscription; returns whether it existed."""

        def step() -> bool:
            with self._transaction() as connection:
                cursor = connection.execute(
                    self._topic_sql(
                        "DELETE FROM arbor_subscriptions WHERE topic = ? AND subscriber = ?"
                    ),
                    (topic, subscriber),
                )
                return bool(cursor.rowcount > 0)

        result: bool = self._retry("delete_subscription", step)
        return result

    def delete_subscriptions(self, subscriber: str) -> int:
        """Delete every subscription of ``subscriber``; returns how many there were."""

        def step() -> int:
            with self._transaction() as connection:
                cursor = connection.execute(
                    self._topic_sql("DELETE FROM arbor_subscriptions WHERE subscriber = ?"),
                    (subscriber,),
                )
                return int(cursor.rowcount)

        result: int = self._retry("delete_subscriptions", step)
        return result

    def trim_topic(self, topic: str) -> tuple[int, bool]:
        """Delete the events of ``topic`` that no subscription will deliver.

        A subscription still needs the events after ``max(position, head - max_lag)``,
        because it skips anything older. With no subscription, every event goes.

        Returns:
            How many events were deleted, and whether the log is now empty.
        """

        def step() -> tuple[int, bool]:
            with self._transaction() as connection:
                row = connection.execute(
                    self._topic_sql("SELECT head FROM arbor_topics WHERE topic = ?"), (topic,)
                ).fetchone()
                if row is None:
                    return 0, True
                head = int(row[0])
                needed = connection.execute(
                    self._topic_sql(
                        "SELECT position, max_lag FROM arbor_subscriptions WHERE topic = ?"
                    ),
                    (topic,),
                ).fetchall()
                keep_after = min(
                    (max(int(position), head - int(max_lag)) for position, max_lag in needed),
                    default=head,
                )
                cursor = connection.execute(
                    self._topic_sql("DELETE FROM arbor_topic_events WHERE topic = ? AND seq <= ?"),
                    (topic, keep_after),
                )
                return int(cursor.rowcount), keep_after >= head

        result: tuple[int, bool] = self._retry("trim_topic", step)
        return result

    def _topic_sql(self, text: str) -> str:
        return text.replace("?", "%s") if self.dialect == "postgresql" else text

    def _topic_time(self, moment: datetime) -> Any:
        return moment if self.dialect == "postgresql" else moment.timestamp()

    def _topic_read_time(self, value: Any) -> datetime:
        if isinstance(value, datetime):
            return value
        return datetime.fromtimestamp(float(value), UTC)

    def _subscription(self, row: tuple[Any, ...]) -> SubscriptionRecord:
        return SubscriptionRecord(
            topic=row[0],
            subscriber=row[1],
            kind=row[2],
            handler=row[3],
            max_lag=int(row[4]),
            position=int(row[5]),
            delivered=int(row[6]),
            skipped=int(row[7]),
            created_at=self._topic_read_time(row[8]),
        )
