"""Lifecycle hooks in one run: on_start, on_recover, on_stop and a handler time limit.

Run it from the project folder with `.venv/bin/python -m examples.lifecycle`. It starts a
local Ray cluster on 127.0.0.1, works in the namespace ``docs``, and keeps state in a
SQLite file in a new temporary folder.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time

import arbor


class Journal(arbor.Agent):
    """An agent that appends lines to its state and records each lifecycle hook that ran."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.hooks: list[str] = []

    def on_start(self) -> None:
        # Runs in every incarnation, after __init__ or after a restore. Set-up the
        # checkpoint does not hold, such as a client, belongs here.
        self.opened_at = time.time()

    def on_recover(self, reason: str) -> None:
        self.hooks.append(f"recovered after {reason}")

    def on_stop(self) -> None:
        # Changes made here are in the final checkpoint.
        self.hooks.append("stopped")

    def write(self, line: str) -> int:
        self.lines.append(line)
        return len(self.lines)

    @arbor.handler(timeout=1.0)
    def stall(self) -> None:
        # Past its time limit, the caller gets AskTimeout and the process restarts
        # from the last checkpoint, dropping this change.
        self.lines.append("never kept")
        time.sleep(60)

    def report(self) -> dict[str, list[str]]:
        return {"lines": self.lines, "hooks": self.hooks}


def main() -> dict[str, list[str]]:
    """Run the walk-through and return the journal's final state."""
    folder = tempfile.mkdtemp(prefix="arbor-example-")
    arbor.init(
        database_url=f"sqlite:///{folder}/arbor.db",
        num_cpus=2,
        object_store_memory=100 * 1024**2,
        namespace="docs",
    )
    try:
        journal = arbor.spawn(Journal, "journal")
        print(f"spawned {journal.name} in namespace {arbor.current_namespace()}")
        journal.ask("write", "first")

        os.kill(journal.info()["pid"], signal.SIGKILL)
        print("after a crash:", journal.ask("report", timeout=60))

        try:
            journal.ask("stall")
        except arbor.AskTimeout as error:
            print("time limit:", error)
        journal.ask("write", "second", timeout=60)

        arbor.stop("journal")
        (checkpoint, *_) = arbor.list_checkpoints("journal")
        print(f"stopped at checkpoint version {checkpoint.version}")
        state = _final_state(journal.name)
        print("final state:", state)
        return state
    finally:
        arbor.shutdown()


def _final_state(name: str) -> dict[str, list[str]]:
    from arbor.persistence import open_store

    store = open_store(os.environ["ARBOR_DATABASE_URL"], migrate=False)
    try:
        checkpoint = store.load_checkpoint(name)
    finally:
        store.close()
    assert checkpoint is not None
    return {"lines": checkpoint.state["lines"], "hooks": checkpoint.state["hooks"]}


if __name__ == "__main__":
    # Run the copy imported by module path, so that Journal's type is
    # examples.lifecycle:Journal, which the cluster's processes can import.
    from examples.lifecycle import main as run

    run()
