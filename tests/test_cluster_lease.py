"""Two Ray clusters on one database: only the holder of the cluster lease runs the agents.

A RayService upgrade runs the old and the new cluster side by side until the new one is
ready. The old ("blue") cluster runs in a child process driven over stdin and stdout; this
process starts the new ("green") one. Green takes the lease when its registry first starts,
blue stops its agents and recreates none, so the agents' epochs stay put while both
clusters are up. Then blue claims the lease back, as a rollback would. The test runs once
per placement: both clusters spawn with it by default.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import arbor
from arbor.persistence import open_store
from tests.agents import Counter
from tests.conftest import PLACEMENTS

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = {"num_cpus": 2, "object_store_memory": 100 * 1024**2}
NAMES = ["lease/0", "lease/1"]
# Fast reconciler passes in both clusters, so a stand-down shows within a second or two.
RECONCILE_INTERVAL_S = "0.3"


def blue(database_url: str) -> None:
    """Run the old cluster and print one JSON line per command read from stdin."""
    arbor.init(database_url=database_url, **CLUSTER)
    try:
        for name in NAMES:
            arbor.spawn(Counter, name)
            arbor.get(name).ask("append", "blue-1")
        print(json.dumps({"lease": arbor.cluster_lease()}), flush=True)
        for line in sys.stdin:
            command = line.strip()
            if command == "exit":
                break
            print(json.dumps(_blue_command(command)), flush=True)
    finally:
        arbor.shutdown()


def _blue_command(command: str) -> dict[str, Any]:
    if command == "lease":
        return {"lease": arbor.cluster_lease()}
    if command == "spawn":
        try:
            arbor.spawn(Counter, "lease/blue-only")
        except arbor.ClusterLeaseLost as error:
            return {"error": type(error).__name__, "message": str(error)}
        return {"error": None}
    if command == "claim":
        return {"lease": arbor.claim_cluster_lease()}
    if command == "poke":
        # The old cluster still gets traffic during an upgrade; none of it may reach an agent.
        outcomes = {}
        for name in NAMES:
            try:
                outcomes[name] = arbor.get(name).ask("append", "blue-late", timeout=1)
            except Exception as error:
                outcomes[name] = type(error).__name__
        return outcomes
    if command == "items":
        return {name: arbor.get(name).ask("items", timeout=60) for name in NAMES}
    raise ValueError(f"unknown command {command!r}")


class Blue:
    """The child process that runs the old cluster."""

    def __init__(self, database_url: str) -> None:
        environment = {
            **os.environ,
            "RAY_ENABLE_AUTO_CONNECT": "0",
            "ARBOR_RECONCILE_INTERVAL_S": RECONCILE_INTERVAL_S,
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.test_cluster_lease", database_url],
            cwd=ROOT,
            env=environment,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.started = self.read()

    def read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        while True:
            line = self.process.stdout.readline()
            assert line, f"the blue cluster's process ended with code {self.process.poll()}"
            # Ray copies worker log lines to the driver's stdout, so skip lines that are not JSON.
            if line.startswith("{"):
                result: dict[str, Any] = json.loads(line)
                return result

    def run(self, command: str) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.write("exit\n")
            self.process.stdin.flush()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()


def epochs(database_url: str) -> dict[str, int]:
    store = open_store(database_url, migrate=False)
    try:
        return {name: store.get_agent(name).epoch for name in NAMES}  # type: ignore[union-attr]
    finally:
        store.close()


def wait_until(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.slow
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_only_the_lease_holder_runs_agents(
    placement: str, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The blue process inherits the variable, so both clusters spawn with the placement.
    monkeypatch.setenv("ARBOR_DEFAULT_PLACEMENT", placement)
    old = Blue(pg_url)
    try:
        blue_id = old.started["lease"]["cluster_id"]
        assert old.started["lease"]["holder"] == blue_id
        assert old.started["lease"]["held"] is True

        monkeypatch.setenv("ARBOR_RECONCILE_INTERVAL_S", RECONCILE_INTERVAL_S)
        arbor.init(database_url=pg_url, **CLUSTER)
        try:
            green = arbor.cluster_lease()
            assert green["cluster_id"] != blue_id
            assert green["held"] is True
            assert green["generation"] == old.started["lease"]["generation"] + 1

            # Green's reconciler brings the agents over with their state.
            for name in NAMES:
                assert arbor.get(name).ask("append", "green-1", timeout=90) == 2
            placements = {info.name: info.placement for info in arbor.list_agents()}
            assert placements == {name: placement for name in NAMES}
            seen_by_blue = old.run("lease")["lease"]
            assert seen_by_blue["held"] is False
            assert seen_by_blue["holder"] == green["cluster_id"]
            refused = old.run("spawn")
            assert refused["error"] == "ClusterLeaseLost"
            assert green["cluster_id"] in refused["message"]
            assert "arbor lease --claim" in refused["message"]

            # Both clusters stay up and receive requests, yet no blue incarnation starts again.
            settled = epochs(pg_url)
            for round_number in range(10):
                for name in NAMES:
                    arbor.get(name).ask("append", f"green-more-{round_number}", timeout=30)
                if round_number % 5 == 0:
                    poked = old.run("poke")
                    assert set(poked.values()) == {"ClusterLeaseLost"}, poked
            assert epochs(pg_url) == settled

            # Rollback: blue claims the lease back, and green stops its agents.
            claimed = old.run("claim")["lease"]
            assert claimed["held"] is True
            assert claimed["generation"] == green["generation"] + 1
            items = old.run("items")
            expected = ["blue-1", "green-1"] + [f"green-more-{n}" for n in range(10)]
            assert items == {name: expected for name in NAMES}
            lease = wait_until(
                lambda: (lease := arbor.cluster_lease()) and not lease["held"] and lease,
                30,
                "green to see that it lost the lease",
            )
            assert lease["holder"] == blue_id
            with pytest.raises(arbor.ClusterLeaseLost):
                arbor.spawn(Counter, "lease/green-only")
        finally:
            arbor.shutdown()
    finally:
        old.close()
    assert old.process.returncode == 0


if __name__ == "__main__":
    blue(sys.argv[1])
