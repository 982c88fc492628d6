"""The demo job: its report equals a single-process analysis, with or without a crash."""

from __future__ import annotations

import email
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import arbor
from arbor.demo.analysis import analyze_file, list_python_files
from arbor.demo.runner import DemoOptions, run_demo


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The standard library's email package plus one file that does not parse."""
    root = tmp_path_factory.mktemp("source") / "tree"
    shutil.copytree(
        os.path.dirname(email.__file__), root, ignore=shutil.ignore_patterns("__pycache__")
    )
    (root / "broken.py").write_text("def broken(:\n    pass\n", encoding="utf-8")
    return str(root)


@pytest.fixture(scope="module", autouse=True)
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # The demo's home is the embedded default store, so these tests use SQLite.
    url = f"sqlite:///{tmp_path_factory.mktemp('store')}/arbor.db"
    arbor.init(database_url=url, num_cpus=2, object_store_memory=100 * 1024**2)
    yield url
    arbor.shutdown()


def expected_report(source: str) -> dict[str, object]:
    """Compute the report in this process, without agents, straight from the files."""
    results = [analyze_file(source, path) for path in list_python_files(source)]
    functions = [
        [result["path"], name, complexity, lineno]
        for result in results
        for name, complexity, lineno in result["complexities"]  # type: ignore[attr-defined]
    ]
    functions.sort(key=lambda entry: (-entry[2], entry[0], entry[3], entry[1]))
    return {
        "source": source,
        "totals": {
            "files": len(results),
            "lines": sum(result["lines"] for result in results),  # type: ignore[misc]
            "functions": sum(result["functions"] for result in results),  # type: ignore[misc]
            "classes": sum(result["classes"] for result in results),  # type: ignore[misc]
            "imports": sum(result["imports"] for result in results),  # type: ignore[misc]
        },
        "top_functions": functions[:10],
        "failed": sorted(
            [result["path"], result["error"]] for result in results if result["error"]
        ),
    }


def test_demo_report_matches_single_process(source: str, tmp_path: Path) -> None:
    options = DemoOptions(source=source, workers=3, batch_size=3, output=str(tmp_path / "r.json"))
    result = run_demo(options)
    assert result.report == expected_report(source)
    assert result.report["failed"] == [["broken.py", result.report["failed"][0][1]]]
    assert (tmp_path / "r.json").exists()


def test_demo_with_killed_analyzer_gives_same_report(source: str, tmp_path: Path) -> None:
    options = DemoOptions(
        source=source, workers=3, batch_size=2, kill_one=True, output=str(tmp_path / "r.json")
    )
    result = run_demo(options)
    assert result.killed_pid is not None
    assert result.report == expected_report(source)


def test_demo_purges_its_agents_when_done(source: str, tmp_path: Path) -> None:
    run_demo(DemoOptions(source=source, workers=2, output=str(tmp_path / "r.json")))
    assert [info.name for info in arbor.list_agents() if info.name.startswith("demo/")] == []


def test_demo_rejects_missing_source(tmp_path: Path) -> None:
    with pytest.raises(arbor.ArborError, match="not a directory"):
        run_demo(DemoOptions(source=str(tmp_path / "nowhere"), output=str(tmp_path / "r.json")))


def test_interrupted_demo_resumes_in_new_cluster(source: str, tmp_path: Path, cluster: str) -> None:
    options = DemoOptions(source=source, workers=2, batch_size=1, output=str(tmp_path / "r.json"))

    def interrupt(progress: dict[str, int]) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_demo(options, on_progress=interrupt)
    arbor.shutdown()

    arbor.init(database_url=cluster, num_cpus=2, object_store_memory=100 * 1024**2)
    result = run_demo(options)

    assert result.resumed is True
    assert result.report == expected_report(source)
