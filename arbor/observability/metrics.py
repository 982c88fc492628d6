"""Arbor's Prometheus metrics, recorded through ``ray.util.metrics``.

Each process records into Ray's metric API, and the metrics agent on each Ray node collects
every worker process of that node and serves them as Prometheus text on the node's metrics
export port. Ray 2.60 (its default OpenTelemetry metrics path) changes the names on export:

- it puts ``ray_`` before every name, so ``arbor_agents_spawned_total`` is scraped as
  ``ray_arbor_agents_spawned_total``;
- a counter keeps one ``_total`` suffix: a name that already ends in ``_total`` is exported
  unchanged, any other counter gets ``_total`` appended;
- a histogram becomes ``<name>_bucket`` (with ``le``), ``<name>_count`` and ``<name>_sum``;
- every series gets the labels ``Component``, ``NodeAddress``, ``SessionName``, ``Version``,
  ``WorkerId`` and ``otel_scope_*``. ``WorkerId`` makes one series per worker process, so
  queries sum over it, for example ``sum by (agent_type) (rate(...[5m]))``.

`exported_name` and `exported_series_names` apply these rules for dashboards and tests.

Label values are bounded: agent types, handler names, nodes, routes and reasons, never an
agent's name or a message id. Labels with a fixed set of values reject anything else with
`ValueError`. Open label sets (agent type, handler, node, route, audit action) keep at most
`MAX_LABEL_VALUES` distinct values per metric and label in each process and record later
new values as ``"other"``.

Every ``record_*`` and ``set_*`` function returns at once, without touching Ray, when
``ARBOR_METRICS=false`` or when the calling process has not connected to Ray. The Ray metric
objects are created on the first recording call of a process, once.
"""

from __future__ import annotations

import atexit
import collections
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import ray
import ray.util.metrics as ray_metrics

from arbor.config import get_settings

logger = logging.getLogger(__name__)

# The prefix Ray's metrics agent puts before every application metric it exports.
RAY_EXPORT_PREFIX = "ray_"

# Distinct values kept per metric and open label in one process before new values are
# recorded as "other". That is enough for the agent classes and handlers of a real
# deployment, and a runaway label (say, a handler name taken from unchecked input) stays bounded.
MAX_LABEL_VALUES = 200
OTHER_LABEL_VALUE = "other"

# Seconds. Message handling runs from tens of microseconds (an in-memory handler in a warm
# actor) to seconds (a handler that calls a model), so the buckets cover 50 µs to 30 s
# at about 2.5x steps.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

# Seconds. Recovery targets are 1 s after a process crash and 30 s after a node loss, and
# both are bucket boundaries so that quantiles near the targets are not interpolated
# across a wide bucket.
RECOVERY_BUCKETS_S: tuple[float, ...] = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)

# Seconds. A reminder normally fires within milliseconds of its due time, and one that
# came due while its agent or the whole cluster was down fires up to hours late.
LATENESS_BUCKETS_S: tuple[float, ...] = (*LATENCY_BUCKETS_S[4:], 60.0, 300.0, 3600.0)

MetricKind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True)
class MetricSpec:
    """One metric family: its name as recorded, kind, help text, labels and buckets."""

    name: str
    kind: MetricKind
    description: str
    labels: tuple[str, ...]
    boundaries: tuple[float, ...] = ()


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "arbor_agents_spawned_total",
        "counter",
        "Agents spawned, by agent type and node.",
        ("agent_type", "node"),
    ),
    MetricSpec(
        "arbor_agent_spawn_failures_total",
        "counter",
        "Spawns that failed, by agent type and reason.",
        ("agent_type", "reason"),
    ),
    MetricSpec(
        "arbor_agents_stopped_total",
        "counter",
        "Agents stopped, by agent type, node and reason.",
        ("agent_type", "node", "reason"),
    ),
    MetricSpec(
        "arbor_agents_restarted_total",
        "counter",
        "New incarnations of existing agents, by agent type, node and reason.",
        ("agent_type", "node", "reason"),
    ),
    MetricSpec(
        "arbor_agents_active",
        "gauge",
        "Agents running, by agent type and node.",
        ("agent_type", "node"),
    ),
    MetricSpec(
        "arbor_agent_message_duration_seconds",
        "histogram",
        "Time to handle one message, from dequeue to reply, by agent type, handler and status.",
        ("agent_type", "handler", "status"),
        LATENCY_BUCKETS_S,
    ),
    MetricSpec(
        "arbor_mailbox_depth",
        "gauge",
        "Messages waiting for an agent's handler, summed per agent type and node.",
        ("agent_type", "node"),
    ),
    MetricSpec(
        "arbor_checkpoint_writes_total",
        "counter",
        "Checkpoint writes, by agent type and status.",
        ("agent_type", "status"),
    ),
    MetricSpec(
        "arbor_checkpoint_bytes_total",
        "counter",
        "Bytes of encoded state written in successful checkpoints, by agent type.",
        ("agent_type",),
    ),
    MetricSpec(
        "arbor_checkpoint_duration_seconds",
        "histogram",
        "Time to write one checkpoint, by agent type.",
        ("agent_type",),
        LATENCY_BUCKETS_S,
    ),
    MetricSpec(
        "arbor_recovery_duration_seconds",
        "histogram",
        "Time from the loss of an agent to its restored incarnation taking messages, by "
        "agent type and recovery path.",
        ("agent_type", "path"),
        RECOVERY_BUCKETS_S,
    ),
    MetricSpec(
        "arbor_reminders_fired_total",
        "counter",
        "Reminder deliveries the agent acknowledged, by agent type and status (ok, or error "
        "when on_reminder raised or is missing).",
        ("agent_type", "status"),
    ),
    MetricSpec(
        "arbor_reminder_lateness_seconds",
        "histogram",
        "Time from a reminder's due time to the delivery that the agent acknowledged, by "
        "agent type.",
        ("agent_type",),
        LATENESS_BUCKETS_S,
    ),
    MetricSpec(
        "arbor_topic_events_published_total",
        "counter",
        "Events appended to topic logs. Topic names are chosen by users and unbounded, so "
        "no topic metric has a topic label.",
        (),
    ),
    MetricSpec(
        "arbor_topic_deliveries_total",
        "counter",
        "Topic events delivered to subscribers, by the subscriber's agent type (client for "
        "a client iterator) and status (ok, or error when the handler raised or is missing).",
        ("agent_type", "status"),
    ),
    MetricSpec(
        "arbor_topic_events_skipped_total",
        "counter",
        "Topic events a subscriber never received because it fell more than max_lag events "
        "behind, by the subscriber's agent type.",
        ("agent_type",),
    ),
    MetricSpec(
        "arbor_reconciler_actions_total",
        "counter",
        "Actions of the reconciler, by action.",
        ("action",),
    ),
    MetricSpec(
        "arbor_nodes",
        "gauge",
        "Ray nodes the reconciler last saw, by state.",
        ("state",),
    ),
    MetricSpec(
        "arbor_nodes_lost_total",
        "counter",
        "Ray nodes the reconciler saw go from alive to dead.",
        (),
    ),
    MetricSpec(
        "arbor_capability_grants_total",
        "counter",
        "Capabilities granted or delegated, by resource kind, operation and whether the "
        "grant is a delegation.",
        ("kind", "operation", "delegated"),
    ),
    MetricSpec(
        "arbor_capability_revocations_total",
        "counter",
        "Capabilities revoked, by reason.",
        ("reason",),
    ),
    MetricSpec(
        "arbor_capability_denied_total",
        "counter",
        "Capability checks that denied an action, by resource kind, operation and reason.",
        ("kind", "operation", "reason"),
    ),
    MetricSpec(
        "arbor_audit_rows_total",
        "counter",
        "Rows appended to the audit log, by action and decision.",
        ("action", "decision"),
    ),
    MetricSpec(
        "arbor_gateway_requests_total",
        "counter",
        "HTTP requests the gateway answered, by route template, method and status code.",
        ("route", "method", "status"),
    ),
    MetricSpec(
        "arbor_gateway_request_duration_seconds",
        "histogram",
        "Time to answer one HTTP request, by route template and method.",
        ("route", "method"),
        LATENCY_BUCKETS_S,
    ),
)

# The values allowed for labels with a fixed set. Any other value raises ValueError.
MESSAGE_STATUSES = frozenset({"ok", "error", "rejected", "duplicate"})
CHECKPOINT_STATUSES = frozenset({"ok", "conflict", "rejected", "error"})
SPAWN_FAILURE_REASONS = frozenset(
    {"name_taken", "invalid", "denied", "timeout", "store_unavailable", "error"}
)
STOP_REASONS = frozenset({"requested", "purged", "fenced", "error"})
RESTART_REASONS = frozenset({"crash", "node_lost", "reconciled", "restored"})
RECOVERY_PATHS = frozenset({"process", "node", "reconcile"})
REMINDER_STATUSES = frozenset({"ok", "error"})
TOPIC_DELIVERY_STATUSES = frozenset({"ok", "error"})
RECONCILER_ACTIONS = frozenset({"recreate", "mark_stopped", "remove_actor", "fail"})
NODE_STATES = frozenset({"alive", "dead"})
REVOCATION_REASONS = frozenset({"requested", "cascade", "agent_stopped", "expired"})
DENIAL_REASONS = frozenset(
    {"missing", "expired", "revoked", "invalid_token", "constraint", "depth_exceeded"}
)
AUDIT_DECISIONS = frozenset({"allow", "deny", "info"})
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

_SPECS = {spec.name: spec for spec in METRICS}


def exported_name(name: str) -> str:
    """Return the name Prometheus scrapes for an Arbor metric, as Ray 2.60 exports it.

    Args:
        name: a name from `METRICS`, such as ``"arbor_agents_spawned_total"``.

    Raises:
        KeyError: ``name`` is not an Arbor metric.
    """
    spec = _SPECS[name]
    exported = RAY_EXPORT_PREFIX + spec.name
    if spec.kind == "counter" and not exported.endswith("_total"):
        exported += "_total"
    return exported


def exported_series_names() -> frozenset[str]:
    """Return every series name Prometheus can scrape from Arbor, histogram parts included."""
    names: set[str] = set()
    for spec in METRICS:
        base = exported_name(spec.name)
        if spec.kind == "histogram":
            names.update({f"{base}_bucket", f"{base}_count", f"{base}_sum"})
        else:
            names.add(base)
    return frozenset(names)


def enabled() -> bool:
    """Return True when recording calls in this process reach Ray's metric API."""
    return get_settings().metrics and ray.is_initialized()


def prepare() -> None:
    """Create this process's Ray metric objects now rather than at the first recording."""
    if enabled():
        _get_registry()


# --- agents -------------------------------------------------------------------------------


def record_spawn(agent_type: str, node: str) -> None:
    """Count one agent spawned on ``node`` (a Ray node id)."""
    if not enabled():
        return
    _inc("arbor_agents_spawned_total", agent_type=agent_type, node=node)


def record_spawn_failure(agent_type: str, reason: str) -> None:
    """Count one failed spawn, for a ``reason`` from `SPAWN_FAILURE_REASONS`."""
    if not enabled():
        return
    _check_value("reason", reason, SPAWN_FAILURE_REASONS)
    _inc("arbor_agent_spawn_failures_total", agent_type=agent_type, reason=reason)


def record_stop(agent_type: str, node: str, reason: str) -> None:
    """Count one agent stopped, for a ``reason`` from `STOP_REASONS`."""
    if not enabled():
        return
    _check_value("reason", reason, STOP_REASONS)
    _inc("arbor_agents_stopped_total", agent_type=agent_type, node=node, reason=reason)


def record_restart(agent_type: str, node: str, reason: str) -> None:
    """Count one new incarnation of an existing agent, for a reason in `RESTART_REASONS`."""
    if not enabled():
        return
    _check_value("reason", reason, RESTART_REASONS)
    _inc("arbor_agents_restarted_total", agent_type=agent_type, node=node, reason=reason)


def set_active_agents(agent_type: str, node: str, count: int) -> None:
    """Set the number of running agents of ``agent_type`` on ``node``."""
    if not enabled():
        return
    _check_non_negative("count", count)
    _set("arbor_agents_active", count, agent_type=agent_type, node=node)


# --- messages -----------------------------------------------------------------------------


def record_message(agent_type: str, handler: str, status: str, seconds: float) -> None:
    """Observe the handling time of one message.

    Args:
        agent_type: the agent's class name.
        handler: the handler that ran. Pass a handler name only after it resolved to a
            method, because unchecked names from callers would grow the label set.
        status: one of `MESSAGE_STATUSES`: ``ok``, ``error`` (the handler raised),
            ``rejected`` (unknown handler or invalid arguments), ``duplicate`` (a retried
            message whose recorded reply was returned without running the handler).
        seconds: handling time in seconds.

    Raises:
        ValueError: ``status`` is not in `MESSAGE_STATUSES`, or ``seconds`` is negative.
    """
    if not enabled():
        return
    _check_value("status", status, MESSAGE_STATUSES)
    _check_non_negative("seconds", seconds)
    _observe(
        "arbor_agent_message_duration_seconds",
        seconds,
        agent_type=agent_type,
        handler=handler,
        status=status,
    )


class MessageTimes:
    """Handling times waiting to be observed, handed to Ray by a thread every second.

    Observing one value through Ray's metric API took about 4 µs here, a quarter of the
    budget of a message between two agents of one host. `add` only appends to a queue, and
    a daemon thread started at the first `add` observes what queued every
    ``interval_s`` seconds. Ray exports a process's metrics once per
    ``metrics_report_interval_ms`` and at most once a second, so the wait adds at most
    about one export period before a scrape shows a message. What is still queued when the
    process exits is observed at exit.
    """

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self._queue: collections.deque[tuple[str, str, str, float]] = collections.deque()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def add(self, agent_type: str, handler: str, status: str, seconds: float) -> None:
        """Queue one handling time, as `record_message` takes it."""
        if not get_settings().metrics:
            # Whether Ray is initialised is left to the flush, which costs a call less.
            return
        self._queue.append((agent_type, handler, status, seconds))
        if self._thread is None:
            self._start()

    def flush(self) -> int:
        """Observe every queued time now; returns how many were observed."""
        queue = self._queue
        count = 0
        while True:
            try:
                agent_type, handler, status, seconds = queue.popleft()
            except IndexError:
                return count
            try:
                record_message(agent_type, handler, status, seconds)
            except Exception as error:
                logger.warning(
                    "metric arbor_agent_message_duration_seconds not recorded: %s", error
                )
            count += 1

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(
                target=self._run, name="arbor-message-metrics", daemon=True
            )
            self._thread.start()
            atexit.register(self.flush)

    def _run(self) -> None:
        stopping = threading.Event()
        while not stopping.wait(self.interval_s):
            self.flush()


# The handling times of this process's messages; see `MessageTimes`.
message_times = MessageTimes()


def set_mailbox_depth(agent_type: str, node: str, depth: int) -> None:
    """Set the number of messages waiting for agents of ``agent_type`` on ``node``.

    The registry sets it for dedicated agents from Ray's task state. Ray labels each
    process's value with its ``WorkerId``, so a process that reports several agents of one
    type passes their sum.
    """
    if not enabled():
        return
    _check_non_negative("depth", depth)
    _set("arbor_mailbox_depth", depth, agent_type=agent_type, node=node)


# --- checkpoints and recovery -------------------------------------------------------------


def record_checkpoint(agent_type: str, nbytes: int, seconds: float, status: str = "ok") -> None:
    """Count one checkpoint write, its encoded size and its duration.

    Args:
        agent_type: the agent's class name.
        nbytes: size of the encoded state in bytes, counted only when ``status`` is ``ok``.
        seconds: time the write took, in seconds, whatever its status.
        status: one of `CHECKPOINT_STATUSES`: ``ok``, ``conflict`` (fenced by a newer
            epoch), ``rejected`` (state not serializable), ``error`` (store failure).

    Raises:
        ValueError: ``status`` is unknown, or ``nbytes`` or ``seconds`` is negative.
    """
    if not enabled():
        return
    _check_value("status", status, CHECKPOINT_STATUSES)
    _check_non_negative("nbytes", nbytes)
    _check_non_negative("seconds", seconds)
    _inc("arbor_checkpoint_writes_total", agent_type=agent_type, status=status)
    _observe("arbor_checkpoint_duration_seconds", seconds, agent_type=agent_type)
    if status == "ok" and nbytes > 0:
        _inc("arbor_checkpoint_bytes_total", nbytes, agent_type=agent_type)


def record_recovery(agent_type: str, path: str, seconds: float) -> None:
    """Observe how long an agent took to come back.

    Args:
        agent_type: the agent's class name.
        path: ``process`` when Ray restarted the actor on the same node after its process
            exited (target 1 s). ``node`` when the agent came back on another node after
            its node was lost, whether Ray or the reconciler brought it back (target 30 s).
            ``reconcile`` when the reconciler recreated it for another reason, such as an
            exhausted restart budget or a new Ray cluster (target 30 s).
        seconds: from the loss (process exit or node death) to the restored incarnation
            taking messages, in seconds.

    Raises:
        ValueError: ``path`` is not in `RECOVERY_PATHS`, or ``seconds`` is negative.
    """
    if not enabled():
        return
    _check_value("path", path, RECOVERY_PATHS)
    _check_non_negative("seconds", seconds)
    _observe("arbor_recovery_duration_seconds", seconds, agent_type=agent_type, path=path)


def record_reminder_fired(agent_type: str, status: str, lateness_s: float) -> None:
    """Count one acknowledged reminder delivery and observe how late it was sent.

    Args:
        agent_type: the agent's class name.
        status: one of `REMINDER_STATUSES`: ``ok``, or ``error`` when the agent's
            ``on_reminder`` raised or is missing.
        lateness_s: seconds from the due time to sending the delivery that was acknowledged.

    Raises:
        ValueError: ``status`` is unknown, or ``lateness_s`` is negative.
    """
    if not enabled():
        return
    _check_value("status", status, REMINDER_STATUSES)
    _check_non_negative("lateness_s", lateness_s)
    _inc("arbor_reminders_fired_total", agent_type=agent_type, status=status)
    _observe("arbor_reminder_lateness_seconds", lateness_s, agent_type=agent_type)


# --- topics -------------------------------------------------------------------------------


def record_topic_published(count: int = 1) -> None:
    """Count events appended to topic logs; a publish retried with the same id counts 0."""
    if not enabled():
        return
    _check_non_negative("count", count)
    if count > 0:
        _inc("arbor_topic_events_published_total", count)


def record_topic_delivery(agent_type: str, status: str, count: int = 1) -> None:
    """Count topic events delivered to subscribers of ``agent_type``.

    Args:
        agent_type: the subscriber's class name, or ``client`` for a client iterator.
        status: one of `TOPIC_DELIVERY_STATUSES`: ``ok``, or ``error`` when the handler
            raised, is missing or rejected the arguments.
        count: events delivered.

    Raises:
        ValueError: ``status`` is unknown, or ``count`` is negative.
    """
    if not enabled():
        return
    _check_value("status", status, TOPIC_DELIVERY_STATUSES)
    _check_non_negative("count", count)
    if count > 0:
        _inc("arbor_topic_deliveries_total", count, agent_type=agent_type, status=status)


def record_topic_skipped(agent_type: str, count: int) -> None:
    """Count topic events skipped for a subscriber of ``agent_type`` that fell behind."""
    if not enabled():
        return
    _check_non_negative("count", count)
    if count > 0:
        _inc("arbor_topic_events_skipped_total", count, agent_type=agent_type)


def record_reconciler_action(action: str) -> None:
    """Count one reconciler action, one of `RECONCILER_ACTIONS`."""
    if not enabled():
        return
    _check_value("action", action, RECONCILER_ACTIONS)
    _inc("arbor_reconciler_actions_total", action=action)


def set_nodes(alive: int, dead: int) -> None:
    """Set the number of alive and dead Ray nodes the reconciler saw in its last pass."""
    if not enabled():
        return
    _check_non_negative("alive", alive)
    _check_non_negative("dead", dead)
    _set("arbor_nodes", alive, state="alive")
    _set("arbor_nodes", dead, state="dead")


def record_node_lost(count: int = 1) -> None:
    """Count Ray nodes that went from alive to dead since the reconciler's previous pass."""
    if not enabled():
        return
    _check_non_negative("count", count)
    if count > 0:
        _inc("arbor_nodes_lost_total", count)


# --- security -----------------------------------------------------------------------------


def record_capability_grant(kind: str, operation: str, delegated: bool = False) -> None:
    """Count one capability granted (or delegated) on a resource ``kind`` and ``operation``."""
    if not enabled():
        return
    _inc(
        "arbor_capability_grants_total",
        kind=kind,
        operation=operation,
        delegated="true" if delegated else "false",
    )


def record_capability_revocation(reason: str, count: int = 1) -> None:
    """Count revoked capabilities, for a ``reason`` from `REVOCATION_REASONS`.

    A revocation that cascades to delegated capabilities counts the first with reason
    ``requested`` and the delegated ones with ``cascade``.
    """
    if not enabled():
        return
    _check_value("reason", reason, REVOCATION_REASONS)
    _check_non_negative("count", count)
    if count > 0:
        _inc("arbor_capability_revocations_total", count, reason=reason)


def record_capability_denied(kind: str, operation: str, reason: str) -> None:
    """Count one capability check that denied, for a ``reason`` from `DENIAL_REASONS`."""
    if not enabled():
        return
    _check_value("reason", reason, DENIAL_REASONS)
    _inc("arbor_capability_denied_total", kind=kind, operation=operation, reason=reason)


def record_audit_row(action: str, decision: str) -> None:
    """Count one audit row, for a ``decision`` from `AUDIT_DECISIONS`."""
    if not enabled():
        return
    _check_value("decision", decision, AUDIT_DECISIONS)
    _inc("arbor_audit_rows_total", action=action, decision=decision)


# --- gateway ------------------------------------------------------------------------------


def record_gateway_request(route: str, method: str, status_code: int, seconds: float) -> None:
    """Count one HTTP request and observe its duration.

    Args:
        route: the route template that matched, such as ``/agents/{name}``, never the
            request path, which contains agent names.
        method: the HTTP method, upper case.
        status_code: the response status, from 100 to 599.
        seconds: time to the response, in seconds.

    Raises:
        ValueError: an unknown method, a status outside 100..599, or negative ``seconds``.
    """
    if not enabled():
        return
    _check_value("method", method, HTTP_METHODS)
    if not 100 <= status_code <= 599:
        raise ValueError(f"HTTP status_code {status_code!r} is invalid; pass 100 to 599")
    _check_non_negative("seconds", seconds)
    _inc("arbor_gateway_requests_total", route=route, method=method, status=str(status_code))
    _observe("arbor_gateway_request_duration_seconds", seconds, route=route, method=method)


# --- the Ray metric objects ---------------------------------------------------------------


class _Registry:
    """The Ray metric objects of this process and the label values each has seen."""

    def __init__(self) -> None:
        self.metrics: dict[str, Any] = {}
        self.seen: dict[tuple[str, str], set[str]] = {}
        for spec in METRICS:
            self.metrics[spec.name] = _create(spec)

    def tags(self, name: str, labels: dict[str, str]) -> dict[str, str]:
        bounded: dict[str, str] = {}
        for key, value in labels.items():
            seen = self.seen.setdefault((name, key), set())
            if value in seen:
                bounded[key] = value
            elif len(seen) < MAX_LABEL_VALUES:
                seen.add(value)
                bounded[key] = value
            else:
                if OTHER_LABEL_VALUE not in seen:
                    seen.add(OTHER_LABEL_VALUE)
                    logger.warning(
                        "metric %s label %s has %d values; recording new values such as "
                        "%r as %r. Label values must come from a bounded set",
                        name,
                        key,
                        MAX_LABEL_VALUES,
                        value,
                        OTHER_LABEL_VALUE,
                    )
                bounded[key] = OTHER_LABEL_VALUE
        return bounded


_registry: _Registry | None = None
_registry_lock = threading.Lock()


def _create(spec: MetricSpec) -> Any:
    if spec.kind == "counter":
        return ray_metrics.Counter(spec.name, spec.description, tag_keys=spec.labels)
    if spec.kind == "gauge":
        return ray_metrics.Gauge(spec.name, spec.description, tag_keys=spec.labels)
    return ray_metrics.Histogram(
        spec.name, spec.description, boundaries=list(spec.boundaries), tag_keys=spec.labels
    )


def _get_registry() -> _Registry:
    global _registry
    registry = _registry
    if registry is None:
        with _registry_lock:
            if _registry is None:
                _registry = _Registry()
            registry = _registry
    return registry


def _inc(name: str, value: float = 1, **labels: str) -> None:
    registry = _get_registry()
    registry.metrics[name].inc(value, tags=registry.tags(name, labels))


def _set(name: str, value: float, **labels: str) -> None:
    registry = _get_registry()
    registry.metrics[name].set(value, tags=registry.tags(name, labels))


def _observe(name: str, value: float, **labels: str) -> None:
    registry = _get_registry()
    registry.metrics[name].observe(value, tags=registry.tags(name, labels))


def _check_value(label: str, value: str, allowed: Iterable[str]) -> None:
    if value not in allowed:
        raise ValueError(
            f"metric label {label}={value!r} is invalid; use one of {', '.join(sorted(allowed))}"
        )


def _check_non_negative(name: str, value: float) -> None:
    if value < 0:
        raise ValueError(f"metric value {name}={value!r} is negative; pass 0 or more")
