"""The in-process unit that runs one agent: mailbox, dispatch, deduplication, checkpoints.

A cell does not depend on being alone in its Ray actor. The dedicated placement wraps one
cell in one actor, and a hosted placement can put many cells in one process.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import json
import logging
import pickle
import time
import traceback
import types
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal

from arbor.agent import Agent, handler_names, handler_timeout, resolve_handler
from arbor.errors import (
    CapabilityDenied,
    CheckpointConflict,
    InvalidArguments,
    NameTaken,
    StateNotSerializable,
    StoreUnavailable,
    UnknownHandler,
)
from arbor.messages import Envelope, ErrorInfo, Reply, new_message_id
from arbor.observability import logs
from arbor.persistence import STOPPED, AgentRecord, CheckpointStore
from arbor.persistence.audit import AuditEntry
from arbor.persistence.group import GroupCommitter
from arbor.persistence.jsonstate import encode_reply, encode_state
from arbor.runtime import telemetry
from arbor.runtime.outbox import Outbox
from arbor.runtime.telemetry import CellTelemetry

if TYPE_CHECKING:
    from arbor.runtime.guard import Guard, Wallet

logger = logging.getLogger(__name__)

# The cell whose handler is running in this thread or task. References made inside a
# handler send as that agent, with its capabilities, however they were obtained.
_running_cell: contextvars.ContextVar[AgentCell | None] = contextvars.ContextVar(
    "arbor_running_cell", default=None
)


def running_cell() -> AgentCell | None:
    """Return the cell whose handler is running here, or None outside any handler."""
    return _running_cell.get()


# The envelope header that carries the sender's capability token.
CAPABILITY_HEADER = "capability"


def _awaitable(value: Any) -> bool:
    """Return whether a handler's result must be awaited; cheap for coroutines and plain values."""
    kind = type(value)
    if kind is types.CoroutineType:
        return True
    return kind not in _PLAIN_RESULTS and inspect.isawaitable(value)


# Result types that are never awaitable.
_PLAIN_RESULTS = frozenset({type(None), bool, int, float, str, bytes, list, dict, tuple})

# Integers below this in magnitude are JSON that any reader takes back unchanged.
_PLAIN_INT_LIMIT = 2**63

# Encodes a state the way `encode_state` does, made once rather than per message.
_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"))

# Durability modes that commit a changed state before the message is acknowledged.
COMMIT_FIRST = frozenset({"durable", "batched"})

# Keys of a processed message's outcome as a checkpoint stores it for deduplication.
_VALUE = "v"
_ERROR = "e"
_NOT_KEPT = "n"


class AgentCell:
    """Runs one agent incarnation: restores it, then applies messages one at a time.

    Construction takes a new epoch from the store before reading the checkpoint, so any
    older incarnation still running can no longer commit. A spawn of an agent that has no
    checkpoint takes its epoch in the transaction that commits the first checkpoint.
    """

    def __init__(
        self,
        name: str,
        agent_class: type[Agent],
        store: CheckpointStore,
        context: Any,
        *,
        init_args: tuple[Any, ...] | None = None,
        init_kwargs: dict[str, Any] | None = None,
        node_id: str | None = None,
        durability: Literal["durable", "periodic", "batched"] = "durable",
        checkpoint_keep: int = 10,
        dedup_window: int = 256,
        offload_io: bool = True,
        outbox: Outbox | None = None,
        guard: Guard | None = None,
        wallet: Wallet | None = None,
        cluster_id: str | None = None,
        recovery: Callable[[], str] | None = None,
        handler_timeout_s: float = 0.0,
        run: Callable[[Awaitable[Any]], Any] | None = None,
        committer: GroupCommitter | None = None,
        deferred_metrics: bool = False,
        record: AgentRecord | None = None,
        audit: AuditEntry | None = None,
        stopping: bool = False,
    ) -> None:
        self.name = name
        # Batched agents commit through the committer their process shares; without one
        # they commit alone, as durable agents do.
        self._writer: CheckpointStore | GroupCommitter = (
            committer if committer is not None and durability == "batched" else store
        )
        # Runs an async lifecycle hook's coroutine; None where no private loop exists.
        self._run = run
        # The default running-time limit of handlers without their own, 0 for none.
        self.handler_timeout_s = handler_timeout_s
        self._timeouts: dict[str, float | None] = {}
        # With a guard, messages from other agents must carry a capability for this one.
        self.guard = guard
        # The capabilities this agent holds, presented with the requests it makes.
        self.wallet = wallet
        self.agent_class = agent_class
        self.store = store
        self.durability = durability
        self.checkpoint_keep = checkpoint_keep
        self.dedup_window = dedup_window
        # True when other cells share the event loop, so a database write must not block it.
        # A cell alone in its process writes inline and saves a thread hand-off.
        self.offload_io = offload_io
        self.fenced = False
        self.stopped = False
        self.checkpoint_version = 0
        self.messages_processed = 0
        # The pickle of a state seen equal to the committed one, or None; see _encode_changed.
        self._committed_blob: bytes | None = None
        # The agent's record as the spawn's first commit left it; None after a restore.
        self.spawn_record: AgentRecord | None = None
        self._lock = asyncio.Lock()
        self._processed: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._signatures: dict[str, inspect.Signature] = {}
        # Per handler, the number of arguments when every parameter is a plain required
        # one, so that a call passing exactly that many positionally needs no binding.
        self._plain_arity: dict[str, int | None] = {}
        # The agent's bound handlers by name, as resolved at their first message.
        self._handlers: dict[str, Callable[..., Any]] = {}
        # Messages this agent sends from handlers; None sends them at once, unrecorded.
        self.outbox = outbox
        # The message being handled, from which the ids of messages it sends derive.
        self._current_id: str | None = None
        self._child_count = 0

        self.telemetry = CellTelemetry(name, agent_class.__name__, node_id, deferred_metrics)
        restore_started = time.perf_counter()
        spawning = init_args is not None or init_kwargs is not None
        if spawning and record is None:
            record = store.get_agent(name)
        instance: Agent | None = None
        checkpoint = None
        fresh = record is not None and record.checkpoint_version == 0 and record.status != STOPPED
        if spawning and record is not None and audit is not None:
            # A spawn whose record is not stored yet: the record, its audit row and the
            # first checkpoint commit in one transaction.
            instance = _initialised(agent_class, context, init_args, init_kwargs)
            self._create_first(instance, record, audit, node_id, cluster_id)
        elif spawning and fresh:
            # A spawn: the epoch and the first checkpoint commit in one transaction.
            instance = _initialised(agent_class, context, init_args, init_kwargs)
            self._commit_first(instance, record.epoch, node_id, cluster_id)
        if self.checkpoint_version == 0:
            # Not a spawn, or another incarnation began since ``record`` was read.
            self.epoch = store.begin_incarnation(name, node_id, cluster_id, stopping)
            checkpoint = store.load_checkpoint(name)
            if checkpoint is not None:
                instance = agent_class.__new__(agent_class)
                instance._arbor_context = context
                instance.restore(checkpoint.state)
                self.checkpoint_version = checkpoint.version
                for message_id, outcome in checkpoint.processed:
                    self._processed[message_id] = outcome
                if outbox is not None:
                    outbox.load(checkpoint.outbox)
                self._committed_json = encode_state(name, instance.snapshot())
                logger.info(
                    "agent %s incarnation %d restored checkpoint version %d",
                    name,
                    self.epoch,
                    checkpoint.version,
                )
            elif not spawning:
                raise StoreUnavailable(
                    f"agent {name!r} has no checkpoint and no spawn arguments to rebuild it "
                    f"from; stop it with arbor.stop({name!r}, purge=True) and spawn it again"
                )
            else:
                if instance is None:
                    instance = _initialised(agent_class, context, init_args, init_kwargs)
                # The first checkpoint makes every later incarnation independent of the spawn
                # arguments, so the reconciler can rebuild the agent from the store alone.
                self._committed_json = encode_state(name, instance.snapshot())
                started = time.perf_counter()
                self.checkpoint_version = store.write_checkpoint(
                    name, self.epoch, self._committed_json, [], checkpoint_keep
                )
                self.telemetry.record_checkpoint(
                    len(self._committed_json), time.perf_counter() - started
                )
                logger.info("agent %s incarnation %d started fresh", name, self.epoch)
        self.agent = instance
        # Bound before on_start, so that on_start can use the context (to schedule timers).
        if hasattr(context, "attach"):
            context.attach(self)
        with self._log_scope():
            instance.on_start()
        if checkpoint is not None and recovery is not None:
            self._call_hook("on_recover", recovery())
        if checkpoint is not None:
            self.telemetry.record_restore(self.epoch, time.perf_counter() - restore_started)

    def _commit_first(
        self, instance: Agent, read_epoch: int, node_id: str | None, cluster_id: str | None
    ) -> None:
        """Take the next epoch and commit ``instance`` as checkpoint version 1, together.

        The store writes nothing when the agent's epoch is no longer ``read_epoch`` or it
        has a checkpoint; ``checkpoint_version`` then stays 0.
        """
        state_json = encode_state(self.name, instance.snapshot())
        started = time.perf_counter()
        record = self.store.begin_first_incarnation(
            self.name, read_epoch, node_id, cluster_id, state_json
        )
        if record is not None:
            self._first_committed(record, state_json, time.perf_counter() - started)

    def _first_committed(self, record: AgentRecord, state_json: str, seconds: float) -> None:
        self.telemetry.record_checkpoint(len(state_json), seconds)
        self.spawn_record = record
        self.epoch = record.epoch
        self.checkpoint_version = 1
        self._committed_json = state_json
        logger.info("agent %s incarnation %d started fresh", self.name, record.epoch)

    def _create_first(
        self,
        instance: Agent,
        record: AgentRecord,
        audit: AuditEntry,
        node_id: str | None,
        cluster_id: str | None,
    ) -> None:
        """Store ``record`` running its first epoch with ``instance`` as checkpoint version 1.

        Raises:
            NameTaken: an agent of this name exists; nothing was written.
        """
        state_json = encode_state(self.name, instance.snapshot())
        started = time.perf_counter()
        stored = self.store.create_first_incarnation(record, audit, node_id, cluster_id, state_json)
        if stored is None:
            raise NameTaken(self.name)
        self._first_committed(stored, state_json, time.perf_counter() - started)

    async def handle(self, envelope: Envelope) -> Reply:
        """Apply one message and return its reply; a handler's error becomes part of the reply.

        This is the form for an event loop shared with other cells: the mailbox lock
        serialises messages, and with ``offload_io`` the checkpoint write runs in a thread.
        """
        async with self._lock:
            return await self.handle_serialised(envelope)

    async def handle_serialised(self, envelope: Envelope) -> Reply:
        """`handle` for a caller that runs one message or operation of this cell at a time.

        A host's mailbox does that, so its messages skip the lock.
        """
        started = time.perf_counter()
        with self.telemetry.message(envelope, self.epoch):
            admitted = self._admit(envelope)
            if isinstance(admitted, Reply):
                reply = admitted
            else:
                running = self._begin(envelope)
                try:
                    value = admitted(*envelope.args, **envelope.kwargs)
                    if _awaitable(value):
                        value = await value
                    error = None
                except Exception as raised:
                    value, error = None, self._handler_error(envelope, raised)
                finally:
                    self._current_id = None
                    _running_cell.reset(running)
                settled = self._settle_state(envelope, value, error)
                if isinstance(settled, Reply):
                    reply = settled
                elif settled is not None and isinstance(self._writer, GroupCommitter):
                    # A batched commit is awaited on the loop, so a host's batches can hold
                    # more agents than it has threads.
                    reply = await self._settle_commit_async(envelope, value, error, settled)
                elif self.offload_io and settled is not None:
                    # Only a commit touches the database; a read-only message settles here.
                    reply = await asyncio.to_thread(
                        self._settle_commit, envelope, value, error, settled
                    )
                else:
                    reply = self._settle_commit(envelope, value, error, settled)
            if reply.error is not None:
                self.telemetry.mark_failed(reply)
        self.telemetry.record_message(envelope, reply, time.perf_counter() - started)
        return reply

    def handle_now(self, envelope: Envelope, run: Callable[[Awaitable[Any]], Any]) -> Reply:
        """Apply one message in the calling thread; ``run`` drives an async handler's coroutine.

        The caller makes sure that only one message runs at a time, as a synchronous Ray
        actor does.
        """
        started = time.perf_counter()
        with self.telemetry.message(envelope, self.epoch):
            reply = self._handle_now(envelope, run)
            if reply.error is not None:
                self.telemetry.mark_failed(reply)
        self.telemetry.record_message(envelope, reply, time.perf_counter() - started)
        return reply

    def _handle_now(self, envelope: Envelope, run: Callable[[Awaitable[Any]], Any]) -> Reply:
        admitted = self._admit(envelope)
        if isinstance(admitted, Reply):
            return admitted
        running = self._begin(envelope)
        try:
            value = admitted(*envelope.args, **envelope.kwargs)
            if _awaitable(value):
                value = run(value)
            error = None
        except Exception as raised:
            value, error = None, self._handler_error(envelope, raised)
        finally:
            self._current_id = None
            _running_cell.reset(running)
        return self._settle(envelope, value, error)

    def next_message_id(self) -> str:
        """Return the id for a message this agent sends now.

        Inside a handler the id derives from the message being handled, so a handler run
        again after a crash sends the same ids and receivers drop the repeats.
        """
        if self._current_id is None:
            return new_message_id()
        self._child_count += 1
        return f"{self._current_id}.{self._child_count}"

    def stage_send(self, target: str, envelope: Envelope) -> bool:
        """Keep a send made by a handler in the outbox; False means send it at once.

        Sends are staged only in durable mode, inside a handler, and when their
        arguments are JSON, because the checkpoint stores them.
        """
        if self.outbox is None or self.durability not in COMMIT_FIRST or self._current_id is None:
            return False
        wire = list(envelope.to_wire())
        # The token is attached again at dispatch, so checkpoints never contain it.
        wire[7] = {key: value for key, value in wire[7].items() if key != CAPABILITY_HEADER}
        try:
            encode_state(self.name, wire, root="message")
        except StateNotSerializable as error:
            logger.debug(
                "agent %s sends %s without the outbox: %s", self.name, envelope.message_id, error
            )
            return False
        self.outbox.stage(envelope.message_id, target, wire)
        return True

    def credential(self, operation: str, target: str) -> str | None:
        """Return the token this agent presents to ``operation`` on agent ``target``.

        Raises:
            CapabilityDenied: capabilities are enforced and none this agent holds fits;
                the denial is audited.
        """
        if self.wallet is None:
            return None
        uri = f"arbor://agent/{operation}/{target}"
        token = self.wallet.token_for(uri)
        if token is None:
            assert self.guard is not None
            self.guard.require(None, self.name, uri)
        return token

    def _begin(self, envelope: Envelope) -> contextvars.Token[AgentCell | None]:
        self._current_id = envelope.message_id
        self._child_count = 0
        return _running_cell.set(self)

    async def checkpoint(self) -> int:
        """Commit the current state now; callable from inside a handler (holds no lock)."""
        state_json = self._snapshot_json()
        if self.offload_io:
            await asyncio.to_thread(self._commit, state_json)
        else:
            self._commit(state_json)
        return self.checkpoint_version

    def flush_now(self) -> None:
        """Commit the state if it changed since the last checkpoint; the caller serialises."""
        if self.fenced or self.stopped:
            return
        state_json = self._snapshot_json()
        if state_json != self._committed_json:
            self._commit(state_json)

    async def flush(self) -> None:
        """Commit the state if it changed since the last checkpoint, under the mailbox lock."""
        async with self._lock:
            if self.offload_io:
                await asyncio.to_thread(self.flush_now)
            else:
                self.flush_now()

    def stop_now(self) -> None:
        """Run `on_stop`, commit any pending state and refuse further messages.

        The caller serialises this with messages.
        """
        if not (self.fenced or self.stopped):
            self._call_hook("on_stop")
        self.flush_now()
        self.stopped = True

    def handler_timeout(self, handler: str) -> float | None:
        """Return the running-time limit of ``handler`` in seconds, or None for no limit."""
        if handler in self._timeouts:
            return self._timeouts[handler]
        default = self.handler_timeout_s or None
        if not isinstance(handler, str) or handler not in handler_names(self.agent_class):
            # Not cached: the name came from a message and may be anything.
            return default
        timeout = handler_timeout(self.agent_class, handler) or default
        self._timeouts[handler] = timeout
        return timeout

    def record_timeout(self, envelope: Envelope, seconds: float, fence: bool = False) -> Reply:
        """Commit the last checkpoint again with ``envelope`` recorded as timed out.

        The dedicated placement then ends the process. The restarted incarnation restores
        the state from before the message, and Ray's retry of the message gets the
        `AskTimeout` reply from the deduplication record instead of running the handler
        again. With ``fence`` the write takes a new epoch first, so this incarnation,
        whose handler may still be running in another thread, can never commit again.

        Returns:
            The `AskTimeout` reply to ``envelope``.
        """
        message = (
            f"agent {self.name!r} handler {envelope.handler!r} ran longer than its {seconds:g} s "
            "limit, so its changes were dropped and the agent restarted from its last checkpoint"
        )
        checkpoint = self.store.load_checkpoint(self.name)
        assert checkpoint is not None, "an agent writes its first checkpoint at start"
        outcome = {_ERROR: ["timeout", "arbor.errors.AskTimeout", message, ""]}
        processed = [
            [message_id, kept]
            for message_id, kept in checkpoint.processed
            if message_id != envelope.message_id
        ]
        processed.append([envelope.message_id, outcome])
        epoch = self.store.fence(self.name) if fence else self.epoch
        self.store.write_checkpoint(
            self.name,
            epoch,
            json.dumps(checkpoint.state),
            processed[-max(self.dedup_window, 1) :],
            self.checkpoint_keep,
            checkpoint.outbox,
        )
        with self._log_scope():
            logger.error("%s (message %s)", message, envelope.message_id)
        kind, error_type, text, trace = outcome[_ERROR]
        info = ErrorInfo(kind=kind, error_type=error_type, message=text, traceback=trace)
        return Reply(envelope.message_id, error=info)

    def _log_scope(self) -> logs.AgentLogScope:
        """Return a block whose log lines carry this agent's fields, for work outside messages."""
        fields = logs.AgentLogFields(
            self.name, self.agent_class.__name__, self.epoch, self.telemetry.node
        )
        return logs.AgentLogScope(fields)

    def _call_hook(self, hook: str, *args: Any) -> None:
        """Run a lifecycle hook; its error is logged, so the agent still starts or stops."""
        with self._log_scope():
            self._call_hook_unscoped(hook, *args)

    def _call_hook_unscoped(self, hook: str, *args: Any) -> None:
        try:
            result = getattr(self.agent, hook)(*args)
            if inspect.isawaitable(result):
                if self._run is None:
                    raise TypeError(f"{hook} must be a plain method here, not a coroutine")
                self._run(result)
        except Exception:
            outcome = "stops" if hook == "on_stop" else "starts"
            logger.exception(
                "agent %s incarnation %d: %s raised; the agent %s anyway",
                self.name,
                self.epoch,
                hook,
                outcome,
            )

    async def stop(self) -> None:
        """Commit any pending state and refuse further messages."""
        await self.flush()
        async with self._lock:
            self.stopped = True

    def _admit(self, envelope: Envelope) -> Reply | Callable[..., Any]:
        """Return the handler for ``envelope``, or the reply that settles it without one."""
        if self.fenced or self.stopped:
            return self._unavailable_reply(envelope)
        if self.guard is not None and envelope.sender is not None:
            decision = self.guard.check(
                envelope.headers.get(CAPABILITY_HEADER),
                envelope.sender,
                f"arbor://agent/{envelope.kind}/{self.name}",
            )
            if not decision.allowed:
                denied = CapabilityDenied(
                    decision.principal, decision.resource, decision.right, decision.reason
                )
                return self._rejected(envelope, "denied", denied)
        outcome = self._processed.get(envelope.message_id)
        if outcome is not None:
            return self._replay(envelope, outcome)
        try:
            handler = self._handlers.get(envelope.handler)
            if handler is None:
                handler = resolve_handler(self.agent, envelope.handler)
                self._handlers[envelope.handler] = handler
            self._bind(envelope, handler)
        except UnknownHandler as error:
            wrapped = UnknownHandler(f"agent {self.name!r}: {error}")
            return self._rejected(envelope, "unknown_handler", wrapped)
        except TypeError as error:
            signature = self._signatures.get(envelope.handler, "(...)")
            invalid = InvalidArguments(
                f"agent {self.name!r} handler {envelope.handler}{signature}: {error}"
            )
            return self._rejected(envelope, "invalid_arguments", invalid)
        return handler

    def _rejected(self, envelope: Envelope, kind: Any, error: Exception) -> Reply:
        """Return the reply to a message that was not admitted, and log a rejected send.

        No caller reads the reply to a send, so without the log line a send to a wrong
        handler name or with wrong arguments would leave no trace.
        """
        if envelope.kind == "send":
            logger.warning(
                "agent %s rejected send %s from %s: %s",
                self.name,
                envelope.message_id,
                envelope.sender or "a client",
                error,
            )
        return self._error_reply(envelope, kind, error)

    def _handler_error(self, envelope: Envelope, error: Exception) -> ErrorInfo:
        logger.warning(
            "agent %s incarnation %d handler %s raised %s: %s",
            self.name,
            self.epoch,
            envelope.handler,
            type(error).__name__,
            error,
        )
        return ErrorInfo(
            kind="handler",
            error_type=f"{type(error).__module__}.{type(error).__qualname__}",
            message=str(error),
            traceback=traceback.format_exc(),
        )

    def _settle(self, envelope: Envelope, value: Any, error_info: ErrorInfo | None) -> Reply:
        """Record the outcome and, in durable mode, commit a changed state before replying."""
        settled = self._settle_state(envelope, value, error_info)
        if isinstance(settled, Reply):
            return settled
        return self._settle_commit(envelope, value, error_info, settled)

    def _settle_state(
        self, envelope: Envelope, value: Any, error_info: ErrorInfo | None
    ) -> Reply | str | None:
        """Record the outcome and encode the state; returns the JSON to commit, or None.

        A `Reply` means the state is not JSON and was rolled back.
        """
        self._remember(envelope.message_id, value, error_info)
        try:
            state_json = self._encode_changed(self.agent.snapshot())
        except StateNotSerializable as error:
            self._forget(envelope.message_id)
            self._roll_back()
            return self._error_reply(envelope, "state", error)
        outbox = self.outbox
        changed = state_json != self._committed_json
        if outbox is not None and outbox.busy():
            pruned = outbox.prune()
            changed = changed or pruned or outbox.has_staged
        if self.durability in COMMIT_FIRST and changed:
            return state_json
        return None

    def _settle_commit(
        self,
        envelope: Envelope,
        value: Any,
        error_info: ErrorInfo | None,
        state_json: str | None,
    ) -> Reply:
        """Commit ``state_json`` unless it is None, then dispatch the outbox and reply."""
        if state_json is not None:
            try:
                self._commit(state_json)
            except (CheckpointConflict, StoreUnavailable) as error:
                return self._uncommitted_reply(envelope, error)
        return self._acknowledge(envelope, value, error_info, state_json is not None)

    async def _settle_commit_async(
        self, envelope: Envelope, value: Any, error_info: ErrorInfo | None, state_json: str
    ) -> Reply:
        """Commit ``state_json`` through the group committer, then dispatch and reply."""
        processed, outbox = self._checkpoint_parts()
        started = time.perf_counter()
        assert isinstance(self._writer, GroupCommitter)
        try:
            with telemetry.span(
                "arbor.checkpoint", self.telemetry.checkpoint_attributes, child_only=True
            ):
                version = await self._writer.write_checkpoint_async(
                    self.name, self.epoch, state_json, processed, self.checkpoint_keep, outbox
                )
        except (CheckpointConflict, StoreUnavailable) as error:
            self._commit_failed(error, started)
            return self._uncommitted_reply(envelope, error)
        self._committed(state_json, version, started)
        return self._acknowledge(envelope, value, error_info, True)

    def _acknowledge(
        self, envelope: Envelope, value: Any, error_info: ErrorInfo | None, committed: bool
    ) -> Reply:
        """Release the messages the handler sent, once committed, and reply."""
        outbox = self.outbox
        if outbox is not None:
            if committed:
                outbox.commit_staged()
            if outbox.busy():
                outbox.flush()
        self.messages_processed += 1
        return Reply(envelope.message_id, value=value, error=error_info)

    def _uncommitted_reply(self, envelope: Envelope, error: Exception) -> Reply:
        if isinstance(error, CheckpointConflict):
            return self._error_reply(envelope, "conflict", error)
        # Not committed, so not acknowledged: undo the change so that a retry of this
        # message applies it again instead of replaying an uncommitted reply.
        self._forget(envelope.message_id)
        self._roll_back()
        return self._error_reply(envelope, "store", error)

    def _checkpoint_parts(self) -> tuple[list[list[Any]], list[list[Any]]]:
        """Return the deduplication record and the outbox, as a checkpoint stores them."""
        processed = [[message_id, outcome] for message_id, outcome in self._processed.items()]
        outbox = self.outbox.records() if self.outbox is not None else []
        return processed, outbox

    def _commit(self, state_json: str) -> None:
        processed, outbox = self._checkpoint_parts()
        started = time.perf_counter()
        try:
            with telemetry.span(
                "arbor.checkpoint", self.telemetry.checkpoint_attributes, child_only=True
            ):
                version = self._writer.write_checkpoint(
                    self.name, self.epoch, state_json, processed, self.checkpoint_keep, outbox
                )
        except (CheckpointConflict, StoreUnavailable) as error:
            self._commit_failed(error, started)
            raise
        self._committed(state_json, version, started)

    def _committed(self, state_json: str, version: int, started: float) -> None:
        self.checkpoint_version = version
        self.telemetry.record_checkpoint(len(state_json), time.perf_counter() - started)
        self._committed_json = state_json
        self._committed_blob = None

    def _commit_failed(self, error: Exception, started: float) -> None:
        if isinstance(error, StoreUnavailable):
            self.telemetry.record_checkpoint(0, time.perf_counter() - started, "error")
            return
        self.telemetry.record_checkpoint(0, time.perf_counter() - started, "conflict")
        self.fenced = True
        logger.error(
            "agent %s incarnation %d was fenced off by a newer epoch; it stops taking messages",
            self.name,
            self.epoch,
        )

    def _encode_changed(self, state: Any) -> str:
        """Return ``state`` as JSON text, validated unless it equals the committed text.

        Most messages change nothing. The pickle of a state that matched the committed
        text is kept, and an equal pickle (a fifth of the JSON encoding's cost) shows the
        same state again. Otherwise one pass of the C encoder compares the text with the
        committed one, which was validated when it was committed. A state that differs
        goes through `encode_state`, which names any value JSON cannot hold.
        """
        try:
            blob: bytes | None = pickle.dumps(state, 5)
        except Exception:
            blob = None
        if blob is not None and blob == self._committed_blob:
            return self._committed_json
        try:
            text = _ENCODER.encode(state)
        except (TypeError, ValueError, RecursionError):
            text = None
        if text is not None and text == self._committed_json:
            self._committed_blob = blob
            return text
        return encode_state(self.name, state)

    def _bind(self, envelope: Envelope, handler: Any) -> None:
        arity = self._plain_arity.get(envelope.handler, -1)
        if arity == len(envelope.args) and not envelope.kwargs:
            return
        signature = self._signatures.get(envelope.handler)
        if signature is None:
            try:
                signature = inspect.signature(handler, eval_str=True)
            except (NameError, SyntaxError, TypeError):
                # Annotations that name types not importable here stay as strings.
                signature = inspect.signature(handler)
            self._signatures[envelope.handler] = signature
            plain = all(
                parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
                and parameter.default is inspect.Parameter.empty
                for parameter in signature.parameters.values()
            )
            self._plain_arity[envelope.handler] = len(signature.parameters) if plain else None
        signature.bind(*envelope.args, **envelope.kwargs)

    def _snapshot_json(self) -> str:
        return self._encode_changed(self.agent.snapshot())

    def _remember(self, message_id: str, value: Any, error: ErrorInfo | None) -> None:
        if self.dedup_window == 0:
            return
        outcome: dict[str, Any]
        if error is not None:
            outcome = {_ERROR: [error.kind, error.error_type, error.message, error.traceback]}
        elif (
            value is None
            or type(value) is bool
            or (type(value) is int and -_PLAIN_INT_LIMIT < value < _PLAIN_INT_LIMIT)
        ):
            # The common replies, which `encode_reply` would keep unchanged.
            outcome = {_VALUE: value}
        else:
            kept = encode_reply(value)
            outcome = {_VALUE: kept} if kept is not None or value is None else {_NOT_KEPT: 1}
        self._processed[message_id] = outcome
        while len(self._processed) > self.dedup_window:
            self._processed.popitem(last=False)

    def _forget(self, message_id: str) -> None:
        self._processed.pop(message_id, None)
        if self.outbox is not None:
            self.outbox.discard_staged()

    def _roll_back(self) -> None:
        import json

        self.agent.restore(json.loads(self._committed_json))

    def _replay(self, envelope: Envelope, outcome: dict[str, Any]) -> Reply:
        logger.debug(
            "agent %s replays the reply to duplicate message %s", self.name, envelope.message_id
        )
        if _ERROR in outcome:
            kind, error_type, message, trace = outcome[_ERROR]
            error = ErrorInfo(kind=kind, error_type=error_type, message=message, traceback=trace)
            return Reply(envelope.message_id, error=error, duplicate=True)
        if _NOT_KEPT in outcome:
            error = ErrorInfo(
                kind="handler",
                error_type="arbor.errors.ReplyNotKept",
                message=(
                    f"message {envelope.message_id} was already applied, but its reply was "
                    "not JSON and was not kept; return JSON values from handlers to get "
                    "the original reply on a retry"
                ),
            )
            return Reply(envelope.message_id, error=error, duplicate=True)
        return Reply(envelope.message_id, value=outcome[_VALUE], duplicate=True)

    def _error_reply(self, envelope: Envelope, kind: Any, error: Exception) -> Reply:
        info = ErrorInfo(
            kind=kind,
            error_type=f"{type(error).__module__}.{type(error).__qualname__}",
            message=str(error),
        )
        return Reply(envelope.message_id, error=info, exception=error)

    def _unavailable_reply(self, envelope: Envelope) -> Reply:
        reason = "was fenced off by a newer incarnation" if self.fenced else "is stopped"
        info = ErrorInfo(
            kind="conflict" if self.fenced else "stopped",
            error_type="arbor.errors.AgentNotFound",
            message=f"agent {self.name!r} incarnation {self.epoch} {reason}",
        )
        return Reply(envelope.message_id, error=info)


def _initialised(
    agent_class: type[Agent],
    context: Any,
    init_args: tuple[Any, ...] | None,
    init_kwargs: dict[str, Any] | None,
) -> Agent:
    """Return a new ``agent_class`` instance bound to ``context`` and built by ``__init__``."""
    instance = agent_class.__new__(agent_class)
    instance._arbor_context = context
    instance.__init__(*(init_args or ()), **(init_kwargs or {}))  # type: ignore[misc]
    return instance
