"""The arbor command line, run as a user runs it: in a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ARBOR = [sys.executable, "-m", "arbor.cli"]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_arbor(
    *args: str, env: dict[str, str], timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ARBOR, *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout
    )


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("arbor: error:")]


def test_status_without_cluster_prints_one_error_line(tmp_path: Path) -> None:
    env = {
        "ARBOR_RAY_ADDRESS": f"127.0.0.1:{closed_port()}",
        "ARBOR_DATABASE_URL": f"sqlite:///{tmp_path}/arbor.db",
    }
    result = run_arbor("status", env=env)
    assert result.returncode == 1
    assert len(error_lines(result)) == 1
    assert "no Ray cluster at" in error_lines(result)[0]
    assert "arbor up" in error_lines(result)[0]


def test_up_with_unreachable_address_starts_nothing(tmp_path: Path) -> None:
    port = closed_port()
    env = {
        "ARBOR_RAY_ADDRESS": f"127.0.0.1:{port}",
        "ARBOR_DATABASE_URL": f"sqlite:///{tmp_path}/arbor.db",
    }
    result = run_arbor("up", "--no-gateway", env=env)
    assert result.returncode == 1
    assert len(error_lines(result)) == 1
    assert f"no Ray cluster at '127.0.0.1:{port}'" in error_lines(result)[0]
    assert "started a local Ray cluster" not in result.stdout


def test_unreachable_database_error_redacts_password() -> None:
    env = {
        "ARBOR_DATABASE_URL": f"postgresql://arbor:s3cret@127.0.0.1:{closed_port()}/arbor",
        "ARBOR_DB_RETRY_ATTEMPTS": "2",
    }
    result = run_arbor("agents", env=env)
    assert result.returncode == 1
    assert "s3cret" not in result.stderr + result.stdout
    assert len(error_lines(result)) == 1
    assert "postgresql://arbor:***@127.0.0.1" in error_lines(result)[0]


def test_unsupported_database_scheme_is_named(tmp_path: Path) -> None:
    result = run_arbor("agents", env={"ARBOR_DATABASE_URL": "mysql://localhost/arbor"})
    assert result.returncode == 1
    assert "'mysql' is not supported" in error_lines(result)[0]


def test_demo_rejects_zero_workers() -> None:
    result = run_arbor("demo", "--workers", "0", env={})
    assert result.returncode == 2
    assert "0 is invalid" in result.stderr


@pytest.mark.slow
def test_up_agents_status_down(tmp_path: Path) -> None:
    env = {
        "ARBOR_DATABASE_URL": f"sqlite:///{tmp_path}/arbor.db",
        "RAY_ADDRESS": "",
        "ARBOR_RAY_ADDRESS": "",
    }
    dashboard_port = str(closed_port())
    gateway_port = str(closed_port())
    up = run_arbor(
        "up", "--num-cpus", "1", "--dashboard-port", dashboard_port, "--port", gateway_port, env=env
    )
    try:
        assert up.returncode == 0, up.stderr
        assert "Ray address:  127.0.0.1:" in up.stdout
        assert f"http://127.0.0.1:{dashboard_port}" in up.stdout
        assert f"gateway:      http://127.0.0.1:{gateway_port}" in up.stdout
        with urllib.request.urlopen(
            f"http://127.0.0.1:{gateway_port}/healthz", timeout=30
        ) as reply:
            assert reply.status == 200

        spawn = subprocess.run(
            [
                sys.executable,
                "-c",
                "import arbor; from tests.agents import Counter; arbor.init(address='auto'); "
                "print(arbor.spawn(Counter, 'cli/idle', placement='hosted', "
                "passivate_idle_s=0.2).ask('add', 1)); "
                "print(arbor.spawn(Counter, 'cli/counter', start=4).ask('add', 1))",
            ],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert spawn.stdout.strip().splitlines()[-1] == "5", spawn.stderr

        agents = run_arbor("agents", env=env)
        assert agents.returncode == 0, agents.stderr
        assert "cli/counter" in agents.stdout
        assert "tests.agents:Counter" in agents.stdout
        assert "running" in agents.stdout
        deadline = time.monotonic() + 30
        while "passivated" not in agents.stdout and time.monotonic() < deadline:
            time.sleep(0.5)
            agents = run_arbor("agents", env=env)
        assert "passivated" in agents.stdout, agents.stdout

        status = run_arbor("status", env=env)
        assert status.returncode == 0, status.stderr
        assert "2 running" in status.stdout
        assert "lease:        held by this cluster" in status.stdout

        lease = run_arbor("lease", env=env)
        assert lease.returncode == 0, lease.stderr
        assert "This cluster runs the agents." in lease.stdout
        claimed = run_arbor("lease", "--claim", env=env)
        assert claimed.returncode == 0, claimed.stderr
        assert "generation 1," in claimed.stdout
    finally:
        down = run_arbor("down", env=env)
    assert down.returncode == 0, down.stderr
    assert "agent state stays in" in down.stdout
    assert "Ray address:  127.0.0.1:" in up.stdout
    ray_port = int(up.stdout.split("Ray address:  127.0.0.1:")[1].split()[0])
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", ray_port), timeout=5).close()


def test_down_leaves_other_clusters_running(tmp_path: Path) -> None:
    """`arbor down` stops the cluster it joins, not a private cluster of another process."""
    import ray

    env = {
        "ARBOR_DATABASE_URL": f"sqlite:///{tmp_path}/arbor.db",
        "RAY_ADDRESS": "",
        "ARBOR_RAY_ADDRESS": "",
    }
    up = run_arbor(
        "up", "--num-cpus", "1", "--no-gateway", "--dashboard-port", str(closed_port()), env=env
    )
    assert up.returncode == 0, up.stderr
    address = up.stdout.split("Ray address:  ")[1].split()[0]
    # Joining by address, not as the latest cluster, needs RAY_AUTH_MODE=token.
    env.update(ARBOR_RAY_ADDRESS=address, RAY_AUTH_MODE="token")
    try:
        ray.init(
            address="local",
            num_cpus=1,
            object_store_memory=100 * 1024**2,
            include_dashboard=False,
        )
        down = run_arbor("down", env=env)
        assert down.returncode == 0, down.stderr
        assert f"stopped the Ray cluster at {address}" in down.stdout

        @ray.remote
        def still_running() -> int:
            return 7

        assert ray.get(still_running.remote(), timeout=60) == 7
    finally:
        ray.shutdown()
        run_arbor("down", env=env)


def test_down_without_cluster_stops_nothing(tmp_path: Path) -> None:
    env = {
        "ARBOR_DATABASE_URL": f"sqlite:///{tmp_path}/arbor.db",
        "ARBOR_RAY_ADDRESS": f"127.0.0.1:{closed_port()}",
    }
    down = run_arbor("down", env=env)
    assert down.returncode == 0, down.stderr
    assert "nothing to stop" in down.stdout
