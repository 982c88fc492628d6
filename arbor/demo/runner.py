"""Drives the demo from the command line: start or resume a run, show progress, print the report."""

from __future__ import annotations

import json
import os
import signal
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import arbor
from arbor.demo.agents import COORDINATOR, Coordinator, analyzer_name

# Seconds between progress polls of the coordinator.
POLL_INTERVAL_S = 0.2


@dataclass
class DemoOptions:
    """Options of one demo run."""

    source: str | None = None
    workers: int = 4
    batch_size: int = 25
    kill_one: bool = False
    output: str = "arbor-report.json"
    fresh: bool = False
    keep: bool = False


@dataclass
class DemoResult:
    """The outcome of one demo run, for the caller and for tests."""

    report: dict[str, Any]
    resumed: bool
    killed_pid: int | None
    elapsed_s: float


def default_source() -> str:
    """Return the running Python's standard library directory."""
    return sysconfig.get_paths()["stdlib"]


def run_demo(
    options: DemoOptions,
    console: Console | None = None,
    on_progress: Callable[[dict[str, int]], None] | None = None,
) -> DemoResult:
    """Run (or resume) the analysis on a connected Arbor and return its report.

    Args:
        options: the run's options.
        console: where progress and the report go; a quiet console if None.
        on_progress: called with each progress poll, before the next one.

    Raises:
        ArborError: a run with other options is in progress and ``fresh`` is not set.
    """
    console = console or Console(quiet=True)
    source = os.path.abspath(options.source or default_source())
    if not os.path.isdir(source):
        raise arbor.ArborError(
            f"--source {source!r} is not a directory; pass a folder of .py files"
        )
    started = time.monotonic()

    coordinator, resumed = _start_or_resume(options, source, console)
    progress = coordinator.ask("start")
    killed_pid = _follow(coordinator, progress, options, console, on_progress)
    report: dict[str, Any] = coordinator.ask("report")

    with open(options.output, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
        handle.write("\n")
    if not options.keep:
        purge_demo_agents(options.workers)
    elapsed = time.monotonic() - started
    print_report(report, console)
    console.print(f"report written to {options.output} in {elapsed:.1f} s")
    return DemoResult(report=report, resumed=resumed, killed_pid=killed_pid, elapsed_s=elapsed)


def purge_demo_agents(workers: int) -> None:
    """Stop the demo's agents and delete their state, so the next run starts over."""
    wanted = {COORDINATOR, *(analyzer_name(index) for index in range(workers))}
    for info in arbor.list_agents():
        # Analyzers of an earlier run with more workers go too.
        if info.name in wanted or info.name.startswith("demo/analyzer-"):
            arbor.stop(info.name, purge=True)


def print_report(report: dict[str, Any], console: Console) -> None:
    """Print the totals, the ten most complex functions and the failed files as tables."""
    totals = Table(title=f"Source tree {report['source']}")
    for key in report["totals"]:
        totals.add_column(key, justify="right")
    totals.add_row(*(f"{value:,}" for value in report["totals"].values()))
    console.print(totals)

    top = Table(title="Most complex functions (cyclomatic complexity)")
    top.add_column("complexity", justify="right")
    top.add_column("function")
    top.add_column("file:line")
    for path, qualname, complexity, lineno in report["top_functions"]:
        top.add_row(str(complexity), qualname, f"{path}:{lineno}")
    console.print(top)

    if report["failed"]:
        failed = Table(title=f"Files that failed to parse ({len(report['failed'])})")
        failed.add_column("file")
        failed.add_column("error")
        for path, error in report["failed"]:
            failed.add_row(path, error)
        console.print(failed)


def _start_or_resume(
    options: DemoOptions, source: str, console: Console
) -> tuple[arbor.AgentRef, bool]:
    statuses = {info.name: info.status for info in arbor.list_agents()}
    if COORDINATOR in statuses and (options.fresh or statuses[COORDINATOR] != "running"):
        purge_demo_agents(options.workers)
    elif COORDINATOR in statuses:
        coordinator = arbor.get(COORDINATOR)
        config = coordinator.ask("config")
        requested = {
            "source": source,
            "workers": options.workers,
            "batch_size": options.batch_size,
        }
        if config != requested:
            raise arbor.ArborError(
                f"an interrupted demo run with {config} is in the store; rerun with those "
                "options to resume it, or pass --fresh to discard it"
            )
        done = coordinator.ask("progress")
        console.print(
            f"resuming the interrupted run from its checkpoints: {done['batches_done']} of "
            f"{done['batches']} batches already done"
        )
        return coordinator, True
    coordinator = arbor.spawn(
        Coordinator,
        COORDINATOR,
        # It spawns and messages its analyzers, and hands each the right to reply.
        capabilities=[{"pattern": "arbor://agent/*/demo/**", "depth": 1}],
        source=source,
        workers=options.workers,
        batch_size=options.batch_size,
    )
    return coordinator, False


def _follow(
    coordinator: arbor.AgentRef,
    progress: dict[str, int],
    options: DemoOptions,
    console: Console,
    on_progress: Callable[[dict[str, int]], None] | None,
) -> int | None:
    killed_pid = None
    columns = (
        TextColumn("analyzing"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("files"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("files", total=progress["files"], completed=progress["files_done"])
        while progress["batches_done"] < progress["batches"]:
            if options.kill_one and killed_pid is None:
                # Right after dispatch, so the analyzer dies with batches still queued.
                killed_pid = _kill_analyzer(console)
            if on_progress is not None:
                on_progress(progress)
            time.sleep(POLL_INTERVAL_S)
            progress = coordinator.ask("progress")
            bar.update(task, completed=progress["files_done"])
    return killed_pid


def _kill_analyzer(console: Console) -> int:
    victim = arbor.get(analyzer_name(0))
    pid = int(victim.info()["pid"])
    os.kill(pid, signal.SIGKILL)
    console.print(f"--kill-one: sent SIGKILL to {analyzer_name(0)} (pid {pid}) mid-run")
    return pid
