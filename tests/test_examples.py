"""The runnable examples run as a user would run them, each in its own local cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_lifecycle_example_runs_every_hook() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "examples.lifecycle"],
        cwd=ROOT,
        env={**os.environ, "ARBOR_LOG_LEVEL": "ERROR"},
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "spawned docs:journal in namespace docs" in lines
    (final,) = [line for line in lines if line.startswith("final state: ")]
    state = json.loads(final.removeprefix("final state: ").replace("'", '"'))
    assert state["lines"] == ["first", "second"]
    assert state["hooks"] == ["recovered after crash", "recovered after timeout", "stopped"]
    assert "ran longer than its 1 s limit" in result.stdout
    assert "cannot import" not in result.stderr
