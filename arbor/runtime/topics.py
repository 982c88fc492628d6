"""Publishing and subscribing from inside an agent, and the append that every publisher makes."""

from __future__ import annotations

import inspect
import logging
from typing import TYPE_CHECKING, Any

from arbor.errors import InvalidArguments, UnknownHandler
from arbor.observability import metrics
from arbor.persistence import CheckpointStore
from arbor.registry.topic_spec import SubscriptionInfo, encode_event, validate_topic
from arbor.runtime import telemetry
from arbor.runtime.ref import registry_handle

if TYPE_CHECKING:
    from arbor.runtime.cell import AgentCell

logger = logging.getLogger(__name__)


def append_event(
    store: CheckpointStore, topic: str, event: Any, publish_id: str, publisher: str | None
) -> int:
    """Append ``event`` to the topic's log, notify the registry, and return the event's seq.

    The registry is notified without waiting, so publishing never waits for delivery. A
    lost notice delays delivery by at most the registry's head poll, about 1 s.

    Raises:
        InvalidTopicName: the topic name is invalid.
        InvalidArguments: the event is not JSON or is too large.
    """
    validate_topic(topic)
    event_json = encode_event(topic, event)
    seq, appended = store.append_topic_event(topic, publish_id, publisher, event_json)  # type: ignore[attr-defined]
    if appended:
        telemetry.record(metrics.record_topic_published)
    try:
        registry_handle().topic.remote("published", topic, seq)
    except ValueError:
        logger.warning(
            "no registry runs to deliver event %d of topic %s; it is delivered once one starts",
            seq,
            topic,
        )
    return int(seq)


def publish(cell: AgentCell, topic: str, event: Any) -> int:
    """Publish ``event`` as the agent of ``cell``; needs ``arbor://topic/publish/<topic>``.

    Inside a handler the event's publish id derives from the message being handled, so a
    handler run again after a crash appends nothing new.
    """
    validate_topic(topic)
    uri = f"arbor://topic/publish/{topic}"
    if cell.guard is not None:
        token = cell.wallet.token_for(uri) if cell.wallet is not None else None
        cell.guard.require(token, cell.name, uri)
    return append_event(cell.store, topic, event, cell.next_message_id(), cell.name)


def subscribe(
    cell: AgentCell, topic: str, handler: Any, max_lag: int | None, call: Any
) -> SubscriptionInfo:
    """Subscribe the agent of ``cell`` to ``topic``; needs ``arbor://topic/subscribe/<topic>``.

    Args:
        cell: the subscribing agent's cell.
        topic: the topic name.
        handler: the name of a handler of the agent that takes ``(topic, event)``, or the
            bound method.
        max_lag: events it may fall behind before the oldest are skipped; None for
            ``ARBOR_TOPIC_MAX_LAG``.
        call: waits for a registry call and returns its result.

    Raises:
        UnknownHandler: the agent has no such public handler.
        InvalidArguments: the handler cannot take ``(topic, event)``, or ``max_lag`` is invalid.
    """
    from arbor.agent import resolve_handler

    validate_topic(topic)
    name = handler
    if callable(handler) and not isinstance(handler, str):
        if getattr(handler, "__self__", None) is not cell.agent:
            raise InvalidArguments(
                f"agent {cell.name!r} cannot subscribe {handler!r} to topic {topic!r}; pass "
                "the name of one of its handlers, or a bound method such as self.on_order"
            )
        name = handler.__name__
    try:
        method = resolve_handler(cell.agent, name)
    except UnknownHandler as error:
        raise UnknownHandler(
            f"agent {cell.name!r} cannot subscribe to topic {topic!r}: {error}"
        ) from None
    try:
        inspect.signature(method).bind(topic, None)
    except TypeError:
        raise InvalidArguments(
            f"agent {cell.name!r} cannot subscribe {name}{inspect.signature(method)} to "
            f"topic {topic!r}: a subscribed handler receives (topic, event); define it as "
            f"{name}(self, topic, event)"
        ) from None
    uri = f"arbor://topic/subscribe/{topic}"
    token = cell.wallet.token_for(uri) if cell.wallet is not None else None
    result: SubscriptionInfo = call(
        registry_handle().topic.remote("subscribe", topic, cell.name, name, max_lag, token)
    )
    return result


def unsubscribe(cell: AgentCell, topic: str, call: Any) -> bool:
    """Delete the subscription of the agent of ``cell`` to ``topic``; returns whether it existed."""
    validate_topic(topic)
    result: bool = call(registry_handle().topic.remote("unsubscribe", topic, cell.name))
    return result
