"""The ``arbor`` command: run a local cluster, inspect agents, and run the demo."""

from __future__ import annotations

import argparse
import collections
import logging
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

# Importing arbor before Ray keeps a local cluster on 127.0.0.1 (see arbor/__init__.py).
import arbor
from arbor.config import get_settings, redact_url
from arbor.errors import ArborError, ClusterUnavailable
from arbor.persistence import absolute_database_url

# Ray's own default port is often taken by Redis, so `arbor up` starts on a free one.
DEFAULT_DASHBOARD_PORT = 8265


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``arbor`` command line; returns the process exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    # Retries and recoveries are logged as warnings. The command line shows only the
    # outcome unless --verbose is set.
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.ERROR,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Piped output keeps whole table rows instead of wrapping them at 80 columns.
    console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 1000)
    try:
        code: int = args.run(args, console)
        return code
    except (ArborError, FileNotFoundError) as error:
        message = " ".join(str(error).split())
        print(f"arbor: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "arbor: interrupted; agent state is checkpointed, so running the same command "
            "again resumes",
            file=sys.stderr,
        )
        return 130


def _parser() -> argparse.ArgumentParser:
    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="arbor", description="Durable, long-lived agents on Ray.", formatter_class=formatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log retries and recoveries")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    up = commands.add_parser(
        "up",
        help="start or join a local Ray cluster and the registry",
        formatter_class=formatter,
    )
    up.add_argument(
        "--port", type=int, default=0, help="GCS port of a new cluster (0: a free port)"
    )
    up.add_argument(
        "--num-cpus", type=int, default=None, help="CPUs the new head node offers to Ray"
    )
    up.add_argument(
        "--dashboard-port", type=int, default=DEFAULT_DASHBOARD_PORT, help="Ray dashboard port"
    )
    up.set_defaults(run=_up)

    down = commands.add_parser(
        "down",
        help="stop every Ray process on this machine (ray stop); agent state stays in the store",
    )
    down.set_defaults(run=_down)

    status = commands.add_parser("status", help="show the cluster, the registry and agent counts")
    status.set_defaults(run=_status)

    agents = commands.add_parser("agents", help="list agents as a table")
    agents.add_argument(
        "--status",
        default=None,
        choices=["starting", "running", "stopped", "failed"],
        help="only agents with this status",
    )
    agents.set_defaults(run=_agents)

    demo = commands.add_parser(
        "demo",
        help="analyze a Python source tree with a coordinator and analyzer agents",
        formatter_class=formatter,
    )
    demo.add_argument(
        "--source", default=None, help="folder to analyze (default: the Python standard library)"
    )
    demo.add_argument("--workers", type=count, default=4, help="number of analyzer agents")
    demo.add_argument(
        "--batch-size", type=count, default=25, help="files per message to an analyzer"
    )
    demo.add_argument(
        "--kill-one", action="store_true", help="SIGKILL one analyzer's process mid-run"
    )
    demo.add_argument("--output", default="arbor-report.json", help="path of the JSON report")
    demo.add_argument(
        "--fresh", action="store_true", help="discard an interrupted run instead of resuming it"
    )
    demo.set_defaults(run=_demo)
    return parser


def count(text: str) -> int:
    """Parse a whole number of 1 or more; argparse names this function in its errors."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; pass a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is invalid; pass a whole number of 1 or more")
    return value


def _connect_existing() -> None:
    address = get_settings().ray_address
    try:
        arbor.init(address=address or "auto")
    except ClusterUnavailable:
        if address:
            raise
        raise ClusterUnavailable("no Ray cluster is running; start one with `arbor up`") from None


def _up(args: argparse.Namespace, console: Console) -> int:
    try:
        _connect_existing()
        console.print(
            "joined the running Ray cluster; --port and --num-cpus apply only to a new one"
        )
    except ClusterUnavailable:
        _start_head(args)
        _connect_existing()
        console.print("started a local Ray cluster on 127.0.0.1")
    import ray

    console.print(f"Ray address:  {ray.get_runtime_context().gcs_address}")
    dashboard = ray._private.worker.get_dashboard_url()
    console.print(f"dashboard:    http://{dashboard}" if dashboard else "dashboard:    not running")
    console.print(f"store:        {redact_url(get_settings().database_url)}")
    console.print("registry and reconciler are running; stop everything with `arbor down`")
    return 0


def _start_head(args: argparse.Namespace) -> None:
    ray_command = shutil.which("ray") or os.path.join(os.path.dirname(sys.executable), "ray")
    port = args.port or _free_port()
    command = [
        ray_command,
        "start",
        "--head",
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={args.dashboard_port}",
        "--disable-usage-stats",
    ]
    if args.num_cpus is not None:
        command.append(f"--num-cpus={args.num_cpus}")
    from arbor.client import RETRY_TIMER_MS

    environment = {"RAY_core_worker_internal_heartbeat_ms": RETRY_TIMER_MS, **os.environ}
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=environment)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise ClusterUnavailable(f"`ray start` failed: {lines[-1] if lines else 'no output'}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _down(args: argparse.Namespace, console: Console) -> int:
    ray_command = shutil.which("ray") or os.path.join(os.path.dirname(sys.executable), "ray")
    result = subprocess.run([ray_command, "stop"], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        raise ArborError(f"`ray stop` failed: {lines[-1] if lines else 'no output'}")
    console.print(
        "stopped the local Ray cluster; agent state stays in "
        f"{redact_url(absolute_database_url(get_settings().database_url))} and `arbor up` "
        "brings the agents back"
    )
    return 0


def _status(args: argparse.Namespace, console: Console) -> int:
    import ray

    from arbor.client import ensure_registry

    _connect_existing()
    nodes = [node for node in ray.nodes() if node["Alive"]]
    registry = ray.get(ensure_registry().ping.remote(), timeout=30)
    counts = collections.Counter(info.status for info in arbor.list_agents())
    console.print(
        f"Ray address:  {ray.get_runtime_context().gcs_address} ({len(nodes)} nodes alive)"
    )
    console.print(
        f"registry:     pid {registry['pid']}, {registry['reconciler_passes']} reconciler passes"
    )
    console.print(f"store:        {registry['database_url']}")
    summary = ", ".join(f"{count} {status}" for status, count in sorted(counts.items())) or "none"
    console.print(f"agents:       {summary}")
    return 0


def _agents(args: argparse.Namespace, console: Console) -> int:
    _connect_existing()
    table = Table()
    for column in (
        "name",
        "type",
        "status",
        "node",
        "incarnation",
        "checkpoint",
        "last checkpoint",
        "actor",
    ):
        table.add_column(column)
    for info in arbor.list_agents(args.status):
        table.add_row(
            info.name,
            info.type,
            info.status,
            (info.node_id or "-")[:12],
            str(info.incarnation),
            str(info.checkpoint_version),
            info.checkpointed_at.strftime("%Y-%m-%d %H:%M:%S") if info.checkpointed_at else "-",
            # A claimed warm actor has a Ray name of its own; "=" means the agent's name.
            "=" if info.actor == info.name else info.actor,
        )
    console.print(table)
    return 0


def _demo(args: argparse.Namespace, console: Console) -> int:
    from arbor.demo.runner import DemoOptions, run_demo

    options = DemoOptions(
        source=args.source,
        workers=args.workers,
        batch_size=args.batch_size,
        kill_one=args.kill_one,
        output=args.output,
        fresh=args.fresh,
    )
    arbor.init()
    try:
        run_demo(options, console)
    finally:
        arbor.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
