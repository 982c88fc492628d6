"""Topic names, events and subscriptions: the checks they pass and their public views."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from arbor.errors import InvalidArguments, InvalidTopicName, StateNotSerializable
from arbor.names import local_name, namespace_problem
from arbor.persistence.jsonstate import encode_state
from arbor.persistence.topics import SubscriptionRecord, TopicEventRecord

# Topic names become a capability URI path, arbor://topic/<operation>/<topic>, so they
# follow its segment rule, and stay short because every stored event repeats them.
MAX_TOPIC_LENGTH = 200
_TOPIC_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*")

# Bytes of JSON one event may take. Each event is stored once and sent to every
# subscriber, so large payloads belong in object storage, with a reference in the event.
MAX_EVENT_BYTES = 256 * 1024

# The prefix of a client iterator's subscriber id; agent names cannot contain ':'.
CLIENT_PREFIX = "client:"


@dataclass(frozen=True)
class TopicEvent:
    """One event as a client subscription yields it.

    Attributes:
        topic: the topic it was published to.
        seq: its position in the topic, from 1; later events have larger seqs.
        data: the published JSON value.
        publisher: the agent that published it, or None for a client.
        published_at: when it was stored, a timezone-aware UTC datetime.
    """

    topic: str
    seq: int
    data: Any
    publisher: str | None
    published_at: datetime

    @classmethod
    def from_record(cls, record: TopicEventRecord) -> TopicEvent:
        """Build the public view of a stored event."""
        return cls(
            topic=record.topic,
            seq=record.seq,
            data=json.loads(record.event_json),
            publisher=record.publisher,
            published_at=record.published_at,
        )


@dataclass(frozen=True)
class SubscriptionInfo:
    """A subscription as `arbor.subscriptions` and ``self.context.subscribe`` return it.

    Attributes:
        topic: the topic.
        subscriber: the agent name, or ``client:<id>`` for a client iterator.
        handler: the agent handler that receives ``(topic, event)``; None for a client.
        max_lag: events the subscriber may fall behind before the oldest are skipped.
        position: the seq of the last event it has passed, as last recorded. The registry
            records it after every few deliveries, so it may trail the deliveries made.
        delivered: events delivered, as last recorded.
        skipped: events skipped because the subscriber fell more than ``max_lag`` behind.
        created_at: when the subscription was made.
    """

    topic: str
    subscriber: str
    handler: str | None
    max_lag: int
    position: int
    delivered: int
    skipped: int
    created_at: datetime

    @classmethod
    def from_record(cls, record: SubscriptionRecord) -> SubscriptionInfo:
        """Build the public view of a stored subscription."""
        return cls(
            topic=record.topic,
            subscriber=record.subscriber,
            handler=record.handler,
            max_lag=record.max_lag,
            position=record.position,
            delivered=record.delivered,
            skipped=record.skipped,
            created_at=record.created_at,
        )


def validate_topic(topic: object) -> str:
    """Return ``topic`` if it is a valid topic name.

    Raises:
        InvalidTopicName: naming the value and the rule it breaks.
    """
    if not isinstance(topic, str):
        raise InvalidTopicName(f"topic name must be a string, got {type(topic).__name__}")
    if len(topic) > MAX_TOPIC_LENGTH:
        raise InvalidTopicName(
            f"topic name {topic[:40]!r}... is longer than {MAX_TOPIC_LENGTH} characters"
        )
    problem = namespace_problem(topic)
    if problem is not None:
        raise InvalidTopicName(f"topic name {topic!r} is invalid: {problem}")
    if not _TOPIC_PATTERN.fullmatch(local_name(topic)):
        raise InvalidTopicName(
            f"topic name {topic!r} is invalid; use segments that start with a letter, digit "
            "or '_' and contain letters, digits, '.', '_' and '-', separated by '/', such "
            "as 'orders/eu', after an optional namespace and colon, such as 'team-a:orders/eu'"
        )
    return topic


def encode_event(topic: str, event: Any) -> str:
    """Return ``event`` as JSON text for the topic's log.

    Raises:
        InvalidArguments: the event is not JSON (naming the key path) or is larger than
            `MAX_EVENT_BYTES`.
    """
    try:
        text = encode_state(topic, event, root="event")
    except StateNotSerializable as error:
        raise InvalidArguments(
            f"event for topic {topic!r} cannot be published: {error.path}: "
            f"{error.reason}; publish dicts with string keys, lists, strings, finite numbers, "
            "booleans and None"
        ) from None
    size = len(text.encode("utf-8"))
    if size > MAX_EVENT_BYTES:
        raise InvalidArguments(
            f"event for topic {topic!r} is {size} bytes of JSON, more than the "
            f"{MAX_EVENT_BYTES} allowed; store large data elsewhere and publish a reference"
        )
    return text


def validate_max_lag(max_lag: object, default: int) -> int:
    """Return ``max_lag``, or ``default`` when it is None.

    Raises:
        InvalidArguments: it is not a positive integer.
    """
    if max_lag is None:
        return default
    if isinstance(max_lag, bool) or not isinstance(max_lag, int) or max_lag < 1:
        raise InvalidArguments(
            f"max_lag={max_lag!r} is invalid; pass a positive number of events, or None for "
            f"ARBOR_TOPIC_MAX_LAG ({default})"
        )
    return max_lag
