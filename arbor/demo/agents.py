"""The demo's agents: a coordinator that splits a source tree and analyzers that parse it."""

from __future__ import annotations

import contextlib
from typing import Any

import arbor
from arbor.demo.analysis import (
    analyze_file,
    empty_summary,
    list_python_files,
    merge_summaries,
    summarize,
)

COORDINATOR = "demo/coordinator"


def analyzer_name(index: int) -> str:
    """Return the agent name of analyzer ``index``."""
    return f"demo/analyzer-{index}"


class Analyzer(arbor.Agent):
    """Parses batches of files and sends each batch's summary to the coordinator."""

    def __init__(self) -> None:
        self.batches_done = 0
        self.files_done = 0

    def analyze(self, batch: int, root: str, files: list[str], reply_to: str) -> int:
        """Analyze one batch and report it; a redelivered batch is reported again, harmlessly."""
        summary = summarize([analyze_file(root, path) for path in files])
        self.context.get(reply_to).send("batch_done", batch, summary)
        self.batches_done += 1
        self.files_done += len(files)
        return batch


class Coordinator(arbor.Agent):
    """Splits the files among analyzers and merges their summaries into one report.

    Every field is checkpointed, so after a crash or an interrupted run the coordinator
    has the set of finished batches and dispatches only the rest.
    """

    def __init__(self, source: str, workers: int, batch_size: int = 25) -> None:
        if workers < 1:
            raise ValueError(f"workers={workers} is invalid; pass 1 or more")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} is invalid; pass 1 or more")
        files = list_python_files(source)
        self.source = source
        self.workers = workers
        self.batch_size = batch_size
        self.batches = [
            files[start : start + batch_size] for start in range(0, len(files), batch_size)
        ]
        self.done: dict[str, bool] = {}
        self.summary = empty_summary()

    def config(self) -> dict[str, Any]:
        """Return the options this run was started with."""
        return {"source": self.source, "workers": self.workers, "batch_size": self.batch_size}

    def start(self) -> dict[str, int]:
        """Spawn missing analyzers and dispatch every batch not done yet; safe to repeat."""
        for index in range(self.workers):
            # An analyzer that exists already, from an interrupted run, is reused.
            with contextlib.suppress(arbor.NameTaken):
                self.context.spawn(
                    Analyzer,
                    analyzer_name(index),
                    capabilities=[f"arbor://agent/send/{self.context.name}"],
                )
        for batch, files in enumerate(self.batches):
            if str(batch) not in self.done:
                analyzer = self.context.get(analyzer_name(batch % self.workers))
                analyzer.send("analyze", batch, self.source, files, self.context.name)
        return self.progress()

    def batch_done(self, batch: int, summary: dict[str, Any]) -> None:
        """Merge one batch's summary, once per batch however often it is reported."""
        if str(batch) in self.done:
            return
        self.summary = merge_summaries(self.summary, summary)
        self.done[str(batch)] = True

    def progress(self) -> dict[str, int]:
        """Return how many batches and files are done, out of how many."""
        files_done = sum(len(self.batches[int(batch)]) for batch in self.done)
        return {
            "batches_done": len(self.done),
            "batches": len(self.batches),
            "files_done": files_done,
            "files": sum(len(files) for files in self.batches),
        }

    def report(self) -> dict[str, Any]:
        """Return the report: totals, the most complex functions and the files that failed."""
        summary = self.summary
        return {
            "source": self.source,
            "totals": {
                key: summary[key] for key in ("files", "lines", "functions", "classes", "imports")
            },
            "top_functions": summary["top_functions"],
            "failed": summary["failed"],
        }
