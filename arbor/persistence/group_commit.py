"""Group commit: the checkpoints of many agents in one process share a transaction.

An agent with ``durability="batched"`` hands its checkpoint to the process's
`GroupCommitter` and waits. The committer's thread collects the checkpoints that arrive
within ``ARBOR_BATCH_WINDOW_S`` of the first one and commits them in one transaction, so
a busy host pays one database round trip and one WAL flush for many agents. Each agent
still replies only after its own checkpoint committed, so nothing acknowledged is lost.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from typing import Any

from arbor.persistence.base import CheckpointStore, CheckpointWrite

logger = logging.getLogger(__name__)

# The maximum number of checkpoints in one transaction; more wait for the next one.
MAX_GROUP = 512

# Threads that commit groups. With two, one group collects while the other commits, so
# writers that arrive during a commit do not wait for it to end before their window opens.
COMMIT_THREADS = 2


class GroupCommitter:
    """Commits the checkpoints handed to it from any thread in shared transactions.

    It has `write_checkpoint` with the store's arguments, results and errors, so a cell
    uses either one the same way.
    """

    def __init__(self, store: CheckpointStore, window_s: float) -> None:
        self._store = store
        self._window_s = window_s
        self._queue: list[tuple[CheckpointWrite, concurrent.futures.Future[Any]]] = []
        self._condition = threading.Condition()
        # Transactions and checkpoints committed so far, for tests and benchmarks.
        self.groups = 0
        self.writes = 0
        self._counter_lock = threading.Lock()
        for index in range(COMMIT_THREADS):
            threading.Thread(
                target=self._run, name=f"arbor-group-commit-{index}", daemon=True
            ).start()

    def write_checkpoint(
        self,
        name: str,
        epoch: int,
        state_json: str,
        processed: list[list[Any]],
        keep: int,
        outbox: list[list[Any]] | None = None,
    ) -> int:
        """Commit a checkpoint with the next group and return its version once committed.

        Raises:
            CheckpointConflict: a newer epoch exists, so the writer is a stale incarnation.
            StoreUnavailable: the group's transaction failed through every retry.
        """
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        write = CheckpointWrite(name, epoch, state_json, processed, keep, outbox)
        with self._condition:
            self._queue.append((write, future))
            self._condition.notify()
        result = future.result()
        if isinstance(result, Exception):
            raise result
        version: int = result
        return version

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._queue:
                    self._condition.wait()
            # Give the other agents of the process the window to join this group.
            time.sleep(self._window_s)
            with self._condition:
                group, self._queue = self._queue[:MAX_GROUP], self._queue[MAX_GROUP:]
            if group:
                self._commit(group)

    def _commit(self, group: list[tuple[CheckpointWrite, concurrent.futures.Future[Any]]]) -> None:
        try:
            results = self._store.write_checkpoints([write for write, _ in group])
        except Exception as error:
            logger.error(
                "group commit of %d checkpoints failed: %s: %s",
                len(group),
                type(error).__name__,
                error,
            )
            for _, future in group:
                future.set_exception(error)
            return
        with self._counter_lock:
            self.groups += 1
            self.writes += len(group)
        for (_, future), result in zip(group, results, strict=True):
            future.set_result(result)


_committers: dict[int, GroupCommitter] = {}
_committers_lock = threading.Lock()


def group_committer(store: CheckpointStore, window_s: float) -> GroupCommitter:
    """Return the process's committer for ``store``, starting it on first use."""
    with _committers_lock:
        committer = _committers.get(id(store))
        if committer is None:
            committer = _committers[id(store)] = GroupCommitter(store, window_s)
        return committer
