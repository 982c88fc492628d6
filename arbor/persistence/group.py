"""Group commit: the checkpoint writes of many agents in one process, one transaction each batch.

Agents with ``durability="batched"`` hand their checkpoint to the process's
`GroupCommitter` and wait. A committer thread takes the writes that arrived, waits up to
the window for more, and commits them together with `CheckpointStore.write_encoded_checkpoints`.
A batch costs one commit (one flush of the write-ahead log) however many agents it holds,
and no agent's message is acknowledged before the batch with its checkpoint commits. Two
committer threads take turns, so one batch collects while the other commits.

The committer threads are the serial part, so each writer encodes its own checkpoint
before it queues it. A writer then waits on a plain lock, which the committer releases
once the outcome is set, so one release wakes one writer with no Event in between.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from arbor.errors import CheckpointConflict, StoreUnavailable
from arbor.persistence.base import (
    CheckpointStore,
    CheckpointWrite,
    EncodedCheckpoint,
    encode_checkpoint,
)

logger = logging.getLogger(__name__)


class _Pending:
    """One write waiting in the queue, and its outcome once the batch committed.

    A thread waits on ``done``. A coroutine waits on ``future`` instead, which the
    committer completes on the coroutine's loop, one call per batch and loop.
    """

    __slots__ = ("write", "done", "future", "version", "error")

    def __init__(self, write: EncodedCheckpoint, future: asyncio.Future[int] | None = None) -> None:
        self.write = write
        self.future = future
        self.done: threading.Lock | None = None
        if future is None:
            # Held from the start; the committer releases it after setting the outcome,
            # and the writer's acquire returns then.
            self.done = threading.Lock()
            self.done.acquire()
        self.version = 0
        self.error: BaseException | None = None


class GroupCommitter:
    """The committer of one process, which writes its agents' checkpoints in shared transactions.

    Args:
        store: the store that commits each batch.
        window_s: seconds the committer waits after a batch's first write for others to
            join it; 0 commits what has queued at once, so batches form only while a
            commit is in progress.
        max_batch: writes per transaction at most.
        threads: committer threads. With two, one batch collects while the other commits
            on another connection. An agent has one write in flight at most, so its
            checkpoints still commit in order.
    """

    def __init__(
        self, store: CheckpointStore, window_s: float, max_batch: int = 256, threads: int = 2
    ) -> None:
        self.store = store
        self.window_s = window_s
        self.max_batch = max_batch
        self.batches = 0
        self.writes = 0
        self._queue: list[_Pending] = []
        self._last_size = 0
        # Queued writes at which a committer that waits out the window takes its batch.
        self._batch_target = 1
        self._ready = threading.Condition()
        self._closed = False
        self._counts = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, name=f"arbor-group-commit-{index}", daemon=True)
            for index in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def write_checkpoint(
        self,
        name: str,
        epoch: int,
        state_json: str,
        processed: list[list[Any]],
        keep: int,
        outbox: list[list[Any]] | None = None,
    ) -> int:
        """Queue a checkpoint and wait until its batch commits; returns the new version.

        It takes the arguments of `CheckpointStore.write_checkpoint`.

        Raises:
            CheckpointConflict: a newer incarnation of the agent exists.
            StoreUnavailable: the batch could not be committed, or the committer is closed.
        """
        write = CheckpointWrite(name, epoch, state_json, processed, keep, outbox)
        pending = _Pending(encode_checkpoint(write))
        self._enqueue(pending)
        assert pending.done is not None
        pending.done.acquire()
        if pending.error is not None:
            raise pending.error
        return pending.version

    async def write_checkpoint_async(
        self,
        name: str,
        epoch: int,
        state_json: str,
        processed: list[list[Any]],
        keep: int,
        outbox: list[list[Any]] | None = None,
    ) -> int:
        """Queue a checkpoint and await its batch's commit, holding no thread meanwhile.

        It takes the arguments and raises the errors of `write_checkpoint`. The batch is
        written whether or not the caller still awaits it.
        """
        write = CheckpointWrite(name, epoch, state_json, processed, keep, outbox)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._enqueue(_Pending(encode_checkpoint(write), future))
        return await future

    def _enqueue(self, pending: _Pending) -> None:
        with self._ready:
            if self._closed:
                raise StoreUnavailable(
                    f"checkpoint of agent {pending.write.name!r} not written: the group "
                    "committer is closed"
                )
            self._queue.append(pending)
            # Wake a committer only for a first write or a full batch, not at every
            # arrival while one waits out the window.
            queued = len(self._queue)
            if queued == 1 or queued >= self._batch_target:
                self._ready.notify()

    def close(self) -> None:
        """Commit what is queued, then stop the committer thread."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        for thread in self._threads:
            thread.join()

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                return
            self._commit(batch)

    def _next_batch(self) -> list[_Pending]:
        """Wait for a first write, then for more. Returns an empty batch once closed and drained.

        The wait ends after the window, or as soon as as many writes queued as the last
        batch held: the writers that took part then have all come back, and waiting
        longer would only add latency.
        """
        with self._ready:
            while True:
                while not self._queue and not self._closed:
                    self._ready.wait()
                if not self._queue:
                    return []
                enough = min(self.max_batch, max(1, self._last_size))
                deadline = time.monotonic() + self.window_s
                self._batch_target = enough
                while len(self._queue) < enough and not self._closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._ready.wait(remaining)
                self._batch_target = 1
                if self._queue:
                    batch = self._queue[: self.max_batch]
                    del self._queue[: self.max_batch]
                    self._last_size = len(batch)
                    return batch
                # The other committer thread took these writes during the window; an
                # empty batch here would end this thread as if the committer had closed.

    def _commit(self, batch: list[_Pending]) -> None:
        try:
            results = self.store.write_encoded_checkpoints([pending.write for pending in batch])
        except Exception as error:
            # The store retried already; every write of the batch fails with the same cause.
            logger.error(
                "group commit of %d checkpoints failed: %s; their messages fail unacknowledged",
                len(batch),
                error,
            )
            failure = error if isinstance(error, StoreUnavailable) else StoreUnavailable(str(error))
            for pending in batch:
                pending.error = failure
            _report(batch)
            return
        with self._counts:
            self.batches += 1
            self.writes += len(batch)
        for pending, result in zip(batch, results, strict=True):
            if isinstance(result, CheckpointConflict):
                pending.error = result
            else:
                pending.version = result
        _report(batch)


def _report(batch: list[_Pending]) -> None:
    """Wake each waiting thread, and complete the futures with one call per event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Pending]] = {}
    for pending in batch:
        if pending.future is None:
            assert pending.done is not None
            pending.done.release()
        else:
            by_loop.setdefault(pending.future.get_loop(), []).append(pending)
    for loop, waiting in by_loop.items():
        try:
            loop.call_soon_threadsafe(_complete, waiting)
        except RuntimeError:
            # The loop is closed, so no coroutine awaits these futures any more.
            logger.debug("group commit: %d outcomes for a closed event loop", len(waiting))


def _complete(waiting: list[_Pending]) -> None:
    for pending in waiting:
        future = pending.future
        assert future is not None
        if future.done():
            continue
        if pending.error is not None:
            future.set_exception(pending.error)
        else:
            future.set_result(pending.version)
