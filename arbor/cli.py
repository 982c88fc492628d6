"""The ``arbor`` command: run a local cluster, inspect agents, and run the demo."""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone

from rich.console import Console
from rich.table import Table

# Importing arbor before Ray keeps a local cluster on 127.0.0.1 (see arbor/__init__.py).
import arbor
from arbor.config import get_settings, redact_url
from arbor.errors import ArborError, ClusterUnavailable
from arbor.names import validate_namespace
from arbor.persistence import AuditEntry, CheckpointStore, absolute_database_url, open_store
from arbor.persistence.audit import DECISIONS, format_time

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
        "--ray-port", type=int, default=0, help="GCS port of a new cluster (0: a free port)"
    )
    up.add_argument("--host", default="127.0.0.1", help="address the HTTP gateway listens on")
    up.add_argument("--port", type=int, default=8000, help="TCP port of the HTTP gateway")
    up.add_argument("--tls-cert", default=None, help="PEM certificate file; serves HTTPS")
    up.add_argument("--tls-key", default=None, help="PEM private key file of --tls-cert")
    up.add_argument("--no-gateway", action="store_true", help="start no HTTP gateway (Ray Serve)")
    up.add_argument(
        "--num-cpus", type=int, default=None, help="CPUs the new head node offers to Ray"
    )
    up.add_argument(
        "--dashboard-port", type=int, default=DEFAULT_DASHBOARD_PORT, help="Ray dashboard port"
    )
    up.set_defaults(run=_up)

    down = commands.add_parser(
        "down",
        help="stop the Ray cluster that the other commands join (ARBOR_RAY_ADDRESS, else the "
        "latest local one), and no other; agent state stays in the store",
    )
    down.set_defaults(run=_down)

    status = commands.add_parser("status", help="show the cluster, the registry and agent counts")
    status.set_defaults(run=_status)

    lease = commands.add_parser(
        "lease",
        help="show which Ray cluster has the cluster lease and runs the agents",
        description="Show the cluster lease. Only the holder's registry recreates agents; "
        "a new cluster takes the lease when its registry first starts. --claim moves the "
        "agents to the cluster this command connects to, for a rollback.",
    )
    lease.add_argument(
        "--claim",
        action="store_true",
        help="take the lease for this cluster; the holder stops its agents and this "
        "cluster restores them from their checkpoints",
    )
    lease.set_defaults(run=_lease)

    metrics_command = commands.add_parser(
        "metrics",
        help="print key numbers from the cluster's metrics: agents, message rate, "
        "handling time, recoveries",
    )
    metrics_command.add_argument(
        "--interval",
        type=float,
        default=3.0,
        help="seconds between the two readings the message rate comes from (default: 3)",
    )
    metrics_command.set_defaults(run=_metrics)

    agents = commands.add_parser("agents", help="list agents as a table")
    agents.add_argument(
        "--status",
        default=None,
        choices=["starting", "running", "stopped", "failed"],
        help="only agents with this status",
    )
    agents.add_argument(
        "--namespace",
        default=None,
        help="only agents in this namespace (default ARBOR_NAMESPACE, else 'default'); "
        "'*' lists every namespace",
    )
    agents.add_argument(
        "--url",
        default=None,
        help="list through the HTTP gateway at this URL with ARBOR_API_KEY, not through Ray",
    )
    agents.set_defaults(run=_agents)

    ask = commands.add_parser(
        "ask",
        help="send a message through the HTTP gateway and print the reply as JSON",
        formatter_class=formatter,
    )
    ask.add_argument("name", help="agent name")
    ask.add_argument("handler", help="handler (public method) name")
    ask.add_argument(
        "args", nargs="*", help="arguments, each parsed as JSON, else taken as a string"
    )
    ask.add_argument("--timeout", type=float, default=None, help="seconds to wait for the reply")
    _add_url_argument(ask)
    ask.set_defaults(run=_ask)

    watch = commands.add_parser(
        "watch",
        help="print the events of an asynchronous command until it ends",
        formatter_class=formatter,
    )
    watch.add_argument("execution_id", help="the id that POST /v1/commands returned")
    _add_url_argument(watch)
    watch.set_defaults(run=_watch)
    _add_keys_parser(commands, formatter)

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
    _add_audit_parser(commands, formatter)
    return parser


def _add_audit_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    formatter: type[argparse.HelpFormatter],
) -> None:
    audit = commands.add_parser(
        "audit",
        help="list audit log entries (`arbor audit verify` checks the hash chain)",
        description="List audit log entries, oldest first, read directly from the store "
        "(no Ray cluster needed). `arbor audit verify` checks the hash chain instead.",
        formatter_class=formatter,
    )
    audit.add_argument(
        "--database-url", default=None, help="store to read (default: ARBOR_DATABASE_URL)"
    )
    audit.add_argument("--principal", default=None, help="only entries by this principal")
    audit.add_argument("--action", default=None, help="only entries with this action, e.g. grant")
    audit.add_argument(
        "--resource", default=None, help="only entries whose resource starts with this text"
    )
    audit.add_argument(
        "--decision", default=None, choices=list(DECISIONS), help="only entries with this decision"
    )
    audit.add_argument(
        "--since",
        type=time_bound,
        default=None,
        help="only entries at or after this time: ISO 8601 (UTC unless it names an offset) "
        "or an age such as 30m, 12h or 7d",
    )
    audit.add_argument(
        "--until", type=time_bound, default=None, help="only entries before this time, as --since"
    )
    audit.add_argument(
        "--after-seq", type=int, default=None, help="only entries after this seq, to page"
    )
    audit.add_argument("--limit", type=count, default=100, help="maximum entries to print")
    audit.add_argument("--json", action="store_true", help="print a JSON array, not a table")
    audit.set_defaults(run=_audit_list)

    audit_commands = audit.add_subparsers()
    verify = audit_commands.add_parser(
        "verify",
        help="check the audit hash chain and name the first bad row (exit status 1)",
        description="Check every audit row against its hash and its predecessor. Exit status "
        "0: the chain holds. 1: a row was edited, deleted or reordered, and the first bad "
        "row's seq is printed.",
        formatter_class=formatter,
    )
    # SUPPRESS keeps a value given before `verify` (arbor audit --json verify).
    verify.add_argument(
        "--database-url",
        default=argparse.SUPPRESS,
        help="store to read (default: ARBOR_DATABASE_URL)",
    )
    verify.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print the result as JSON"
    )
    verify.set_defaults(run=_audit_verify)


def _add_url_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=None,
        help="gateway URL (default: ARBOR_URL, else http://127.0.0.1:8000); the key comes "
        "from ARBOR_API_KEY",
    )
    parser.add_argument(
        "--ca-cert", default=None, help="CA bundle file that verifies an HTTPS gateway"
    )


def _add_keys_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    formatter: type[argparse.HelpFormatter],
) -> None:
    keys = commands.add_parser(
        "keys",
        help="create, list and revoke API keys of the HTTP gateway",
        description="Manage API keys in the store (no Ray cluster needed). Grant a key "
        "capabilities with arbor.grant('key:<id>', pattern).",
        formatter_class=formatter,
    )
    keys.add_argument(
        "--database-url", default=None, help="store to use (default: ARBOR_DATABASE_URL)"
    )
    keys_commands = keys.add_subparsers(required=True, metavar="ACTION")
    create = keys_commands.add_parser(
        "create", help="create a key and print its secret, shown only this once"
    )
    create.add_argument("name", help="a label for people, such as ci-deploy")
    create.set_defaults(run=_keys_create)
    listing = keys_commands.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--all", action="store_true", help="include revoked keys")
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    listing.set_defaults(run=_keys_list)
    revoke = keys_commands.add_parser("revoke", help="revoke a key; it stops working within 1 s")
    revoke.add_argument("key_id", help="the key id, as `arbor keys list` shows it")
    revoke.set_defaults(run=_keys_revoke)


def count(text: str) -> int:
    """Parse a whole number of 1 or more; argparse names this function in its errors."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; pass a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is invalid; pass a whole number of 1 or more")
    return value


_AGE = re.compile(r"(\d+)([smhd])")
_AGE_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def time_bound(text: str) -> datetime:
    """Parse an ISO 8601 time (UTC when it has no offset) or an age such as ``30m``."""
    age = _AGE.fullmatch(text.strip())
    if age:
        delta = timedelta(**{_AGE_UNITS[age.group(2)]: int(age.group(1))})
        return datetime.now(timezone.utc) - delta
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is invalid; pass an ISO 8601 time such as 2025-01-31T12:00:00Z or an age "
            "such as 30m, 12h or 7d"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _connect_existing() -> None:
    from ray._private.utils import read_ray_address

    from arbor.client import probe_address

    address = get_settings().ray_address
    try:
        latest = read_ray_address()
        if not address and latest:
            # Ray's "auto" retries the latest `ray start` cluster for over 100 s when its
            # processes were killed, so a closed port ends the attempt here.
            probe_address(latest)
        arbor.init(address=address or "auto")
    except ClusterUnavailable:
        if address:
            raise
        raise ClusterUnavailable("no Ray cluster is running; start one with `arbor up`") from None


def _up(args: argparse.Namespace, console: Console) -> int:
    try:
        _connect_existing()
        console.print(
            "joined the running Ray cluster; --ray-port and --num-cpus apply only to a new one"
        )
    except ClusterUnavailable:
        if get_settings().ray_address:
            # An explicit address that cannot be joined is an error, not a cue to start
            # another cluster on what may be the same port.
            raise
        _start_head(args)
        _connect_existing()
        console.print("started a local Ray cluster on 127.0.0.1")
    import ray

    console.print(f"Ray address:  {ray.get_runtime_context().gcs_address}")
    dashboard = ray._private.worker.get_dashboard_url()
    console.print(f"dashboard:    http://{dashboard}" if dashboard else "dashboard:    not running")
    console.print(f"store:        {redact_url(get_settings().database_url)}")
    if not args.no_gateway:
        from arbor.gateway import deploy

        try:
            url = deploy(args.host, args.port, tls_cert=args.tls_cert, tls_key=args.tls_key)
        except ArborError:
            raise
        except Exception as error:
            # Serve raises its own errors, for example when another Serve instance is
            # starting in the same cluster. One line with the cause is enough here.
            lines = str(error).strip().splitlines() or [""]
            raise ArborError(
                f"the gateway could not be deployed: {type(error).__name__}: {lines[-1]}; "
                "retry `arbor up`, or pass --no-gateway"
            ) from error
        console.print(f"gateway:      {url} (API keys: `arbor keys create NAME`)")
    console.print("registry and reconciler are running; stop everything with `arbor down`")
    return 0


def _start_head(args: argparse.Namespace) -> None:
    ray_command = shutil.which("ray") or os.path.join(os.path.dirname(sys.executable), "ray")
    port = args.ray_port or _free_port()
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
        lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        # Ray names the conflicting port or file a few lines above its last line.
        detail = " | ".join(line.strip() for line in lines[-3:]) or "no output"
        raise ClusterUnavailable(f"`ray start` failed: {detail}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _down(args: argparse.Namespace, console: Console) -> int:
    import ray
    from ray._common.utils import reset_ray_address
    from ray._private.utils import read_ray_address

    try:
        _connect_existing()
    except ClusterUnavailable as error:
        console.print(f"nothing to stop: {error}")
        return 0
    address = ray.get_runtime_context().gcs_address
    # Each node's sockets live in its session directory, which appears in the command
    # lines of that node's Ray processes. `ray stop` would stop every cluster here.
    sessions = {
        os.path.dirname(os.path.dirname(node["ObjectStoreSocketName"])) for node in ray.nodes()
    }
    arbor.shutdown()
    stopped = _stop_processes(sessions, address)
    if read_ray_address() == address:
        # As `ray stop` does, so that the next "auto" address finds no stopped cluster.
        reset_ray_address()
    console.print(
        f"stopped the Ray cluster at {address} ({stopped} processes); agent state stays in "
        f"{redact_url(absolute_database_url(get_settings().database_url))} and `arbor up` "
        "brings the agents back"
    )
    return 0


def _stop_processes(sessions: set[str], address: str, grace_s: float = 10.0) -> int:
    """End this machine's processes of the Ray cluster at ``address``; returns their number.

    A process belongs to the cluster when its command line names one of its ``sessions``
    directories or its address (the Ray client server), or when such a process started it
    (workers and agents, which rename themselves ``ray::...``).
    """
    import psutil

    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["cmdline"]):
        command = " ".join(process.info["cmdline"] or [])
        if process.pid != os.getpid() and (
            any(session in command for session in sessions) or f"--address={address}" in command
        ):
            found[process.pid] = process
    for process in list(found.values()):
        with contextlib.suppress(psutil.Error):
            for child in process.children(recursive=True):
                found.setdefault(child.pid, child)
    for process in found.values():
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(list(found.values()), timeout=grace_s)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    return len(found)


def _status(args: argparse.Namespace, console: Console) -> int:
    import ray

    from arbor.client import ensure_registry

    _connect_existing()
    nodes = [node for node in ray.nodes() if node["Alive"]]
    registry = ray.get(ensure_registry().ping.remote(), timeout=30)
    counts = collections.Counter(info.status for info in arbor.list_agents(namespace="*"))
    console.print(
        f"Ray address:  {ray.get_runtime_context().gcs_address} ({len(nodes)} nodes alive)"
    )
    console.print(
        f"registry:     pid {registry['pid']}, {registry['reconciler_passes']} reconciler passes"
    )
    console.print(f"store:        {registry['database_url']}")
    lease = arbor.cluster_lease()
    held = "held by this cluster" if lease["held"] else f"held by cluster {lease['holder']}"
    console.print(f"lease:        {held} (this cluster is {lease['cluster_id']})")
    summary = ", ".join(f"{count} {status}" for status, count in sorted(counts.items())) or "none"
    console.print(f"agents:       {summary}")
    return 0


def _lease(args: argparse.Namespace, console: Console) -> int:
    _connect_existing()
    lease = arbor.claim_cluster_lease() if args.claim else arbor.cluster_lease()
    console.print(f"this cluster: {lease['cluster_id']}")
    if lease["holder"] is None:
        console.print("holder:       none yet; this cluster's registry takes it on its next start")
        return 0
    console.print(
        f"holder:       {lease['holder']} (generation {lease['generation']}, "
        f"claimed {lease['claimed_at']})"
    )
    if lease["held"]:
        console.print("This cluster runs the agents.")
        return 0
    console.print(
        "Another cluster runs the agents; this one recreates none. Run `arbor lease --claim` "
        "to move them here."
    )
    return 1


def _metrics(args: argparse.Namespace, console: Console) -> int:
    import time

    import ray

    from arbor.observability import summary

    if not args.interval > 0:
        console.print(f"--interval {args.interval} is invalid; pass a number of seconds > 0")
        return 2
    _connect_existing()
    counts = collections.Counter(info.status for info in arbor.list_agents(namespace="*"))
    urls = [
        f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        for node in ray.nodes()
        if node["Alive"] and node.get("MetricsExportPort")
    ]
    first = summary.read_exports(urls)
    time.sleep(args.interval)
    second = summary.read_exports(urls)
    recent = summary.difference(second, first)
    for error in second.errors:
        console.print(f"metrics export not read: {error}")

    def milliseconds(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.2f} ms"

    messages = summary.MESSAGE_HISTOGRAM
    recoveries = summary.RECOVERY_HISTOGRAM
    table = Table(show_header=False)
    agents = ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))
    table.add_row("agents", agents or "none")
    table.add_row(
        f"messages per second (last {args.interval:g} s)",
        f"{recent.counts.get(messages, 0.0) / args.interval:.1f}",
    )
    table.add_row("messages handled", f"{second.counts.get(messages, 0.0):.0f}")
    by_status = ", ".join(f"{value:.0f} {key}" for key, value in sorted(second.by_status.items()))
    table.add_row("  by outcome", by_status or "-")
    for label, q in (("p50", 0.5), ("p99", 0.99)):
        table.add_row(
            f"handling time {label} (all time / last {args.interval:g} s)",
            f"{milliseconds(summary.quantile(second.buckets.get(messages, {}), q))} / "
            f"{milliseconds(summary.quantile(recent.buckets.get(messages, {}), q))}",
        )
    table.add_row("restarts", f"{second.totals.get(summary.RESTARTS, 0.0):.0f}")
    table.add_row(
        "recovery time p50 / p99",
        f"{milliseconds(summary.quantile(second.buckets.get(recoveries, {}), 0.5))} / "
        f"{milliseconds(summary.quantile(second.buckets.get(recoveries, {}), 0.99))}",
    )
    table.add_row("capability denials", f"{second.totals.get(summary.DENIALS, 0.0):.0f}")
    console.print(table)
    return 0


def _agents(args: argparse.Namespace, console: Console) -> int:
    if args.namespace not in (None, "*"):
        try:
            validate_namespace(args.namespace)
        except arbor.InvalidArguments as error:
            console.print(f"--namespace: {error}")
            return 2
    if args.url is not None:
        wanted = args.namespace or arbor.current_namespace()
        infos = _gateway_client(args).list_agents(args.status, namespace=wanted)
    else:
        _connect_existing()
        infos = arbor.list_agents(args.status, namespace=args.namespace)
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
    for info in infos:
        # A claimed warm actor has a Ray name of its own; "=" means the agent's name. The
        # gateway does not report actor names, shown as "-".
        actor = info.actor
        if not info.actor:
            actor = "-"
        elif info.actor == info.name:
            actor = "="
        table.add_row(
            info.name,
            info.type,
            f"{info.status}, passivated" if info.passivated else info.status,
            (info.node_id or "-")[:12],
            str(info.incarnation),
            str(info.checkpoint_version),
            info.checkpointed_at.strftime("%Y-%m-%d %H:%M:%S") if info.checkpointed_at else "-",
            actor,
        )
    console.print(table, markup=False)
    return 0


def _gateway_client(args: argparse.Namespace) -> arbor.http_client.GatewayClient:
    verify: bool | str = args.ca_cert if getattr(args, "ca_cert", None) else True
    return arbor.connect(args.url, verify=verify)


def _ask(args: argparse.Namespace, console: Console) -> int:
    values = [_json_or_text(text) for text in args.args]
    reply = _gateway_client(args).get(args.name).ask(args.handler, *values, timeout=args.timeout)
    print(json.dumps(reply))
    return 0


def _json_or_text(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _watch(args: argparse.Namespace, console: Console) -> int:
    final = None
    for event in _gateway_client(args).watch(args.execution_id):
        print(f"{event.id} {event.event} {json.dumps(event.data)}", flush=True)
        final = event.event
    return 0 if final == "succeeded" else 1


def _keys_create(args: argparse.Namespace, console: Console) -> int:
    from arbor.gateway.keys import create_api_key

    # Unlike the read-only commands, creating a key may create the store.
    store = open_store(absolute_database_url(args.database_url or get_settings().database_url))
    try:
        created = create_api_key(store, args.name)
    finally:
        store.close()
    print(f"id:        {created.record.id}")
    print(f"principal: {created.record.principal}")
    print(f"key:       {created.key}")
    print(
        "The key is shown only now; keep it secret. Grant capabilities with "
        f"arbor.grant({created.record.principal!r}, 'arbor://agent/ask/...')."
    )
    return 0


def _keys_list(args: argparse.Namespace, console: Console) -> int:
    store = _open_audit_store(args)
    try:
        records = store.list_api_keys(include_revoked=args.all)
    finally:
        store.close()
    rows = [
        {
            "id": record.id,
            "principal": record.principal,
            "name": record.name,
            "created_at": format_time(record.created_at),
            "revoked_at": format_time(record.revoked_at) if record.revoked_at else None,
        }
        for record in records
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table()
    for column in ("id", "principal", "name", "created (UTC)", "revoked (UTC)"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            str(row["id"]),
            str(row["principal"]),
            str(row["name"]),
            str(row["created_at"]),
            str(row["revoked_at"] or "-"),
        )
    console.print(table, markup=False)
    return 0


def _keys_revoke(args: argparse.Namespace, console: Console) -> int:
    store = _open_audit_store(args)
    try:
        revoked = store.revoke_api_key(args.key_id)
    finally:
        store.close()
    if not revoked:
        raise ArborError(
            f"no valid API key has id {args.key_id!r}; `arbor keys list --all` shows the ids"
        )
    console.print(f"revoked API key {args.key_id}; its capabilities stay until revoked")
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


def _open_audit_store(args: argparse.Namespace) -> CheckpointStore:
    url = args.database_url or get_settings().database_url
    # Opening a SQLite URL creates the file, which would turn a mistyped path into an empty
    # log that verifies.
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///") :]
        if path and not os.path.exists(path):
            raise ArborError(
                f"no SQLite store at {os.path.abspath(path)}; check ARBOR_DATABASE_URL or "
                "--database-url"
            )
    return open_store(url)


def _audit_list(args: argparse.Namespace, console: Console) -> int:
    store = _open_audit_store(args)
    try:
        entries = store.list_audit(
            principal=args.principal,
            action=args.action,
            resource_prefix=args.resource,
            since=args.since,
            until=args.until,
            decision=args.decision,
            limit=args.limit,
            after_seq=args.after_seq,
        )
    finally:
        store.close()
    if args.json:
        print(json.dumps([_audit_json(entry) for entry in entries], indent=2))
        return 0
    if not entries:
        console.print("no audit entries match")
        return 0
    table = Table()
    for column in (
        "seq",
        "at (UTC)",
        "principal",
        "action",
        "resource",
        "decision",
        "trace",
        "detail",
    ):
        table.add_column(column)
    for entry in entries:
        table.add_row(
            str(entry.seq),
            entry.at.strftime("%Y-%m-%d %H:%M:%S") if entry.at else "-",
            entry.principal,
            entry.action,
            entry.resource,
            entry.decision,
            entry.trace_id or "-",
            json.dumps(entry.detail, sort_keys=True) if entry.detail else "-",
        )
    # Principals and URIs are data, so markup=False keeps rich from reading [tags] in them.
    console.print(table, markup=False)
    return 0


def _audit_verify(args: argparse.Namespace, console: Console) -> int:
    store = _open_audit_store(args)
    try:
        result = store.verify_audit()
    finally:
        store.close()
    if getattr(args, "json", False):
        print(json.dumps(dataclasses.asdict(result), indent=2))
    elif result.ok:
        head = f"; head seq {result.head_seq}, hash {result.head_hash}" if result.head_seq else ""
        console.print(f"audit chain intact: {result.checked} rows checked{head}", markup=False)
    else:
        intact = f"seq {result.head_seq}" if result.head_seq else "none"
        console.print(
            f"audit chain broken at seq {result.bad_seq} ({result.problem}): {result.reason}. "
            f"Last intact row: {intact}.",
            markup=False,
        )
    return 0 if result.ok else 1


def _audit_json(entry: AuditEntry) -> dict[str, object]:
    document = dataclasses.asdict(entry)
    document["at"] = format_time(entry.at) if entry.at else None
    return document


if __name__ == "__main__":
    sys.exit(main())
