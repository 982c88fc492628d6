"""Alert rules and Grafana dashboards in k8s/monitoring, checked with promtool and metrics.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from arbor.observability import metrics
from tests.promql_names import (
    DASHBOARDS,
    MONITORING,
    RULES_FILE,
    dashboard_queries,
    grafana_to_promql,
    metric_names,
)

RUNBOOKS = MONITORING.parent.parent / "docs" / "runbooks.md"
RULE_TESTS = sorted((MONITORING / "tests").glob("*.yaml"))
EXPECTED_ALERTS = {
    "ArborAgentCrashRateHigh",
    "ArborSpawnFailures",
    "ArborCapabilityDenialRateHigh",
    "ArborProcessRecoverySlow",
    "ArborNodeRecoverySlow",
    "ArborCheckpointErrors",
    "ArborNodeLost",
}

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not found; install Debian's prometheus package (apt-get install prometheus)",
)


def alert_rules() -> list[dict[str, object]]:
    document = yaml.safe_load(RULES_FILE.read_text())
    return [rule for group in document["groups"] for rule in group["rules"] if "alert" in rule]


def runbook_anchors() -> set[str]:
    anchors = set()
    for line in RUNBOOKS.read_text().splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip().lower()
            anchor = re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")
            anchors.add(anchor)
    return anchors


def run_promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


# --- alert rules --------------------------------------------------------------------------


@needs_promtool
def test_rules_file_passes_promtool_check() -> None:
    result = run_promtool("check", "rules", str(RULES_FILE))

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


@needs_promtool
@pytest.mark.parametrize("test_file", RULE_TESTS, ids=lambda path: path.name)
def test_rule_unit_tests_pass(test_file: Path) -> None:
    result = run_promtool("test", "rules", test_file.name, cwd=test_file.parent)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_rules_cover_every_required_alert() -> None:
    names = [rule["alert"] for rule in alert_rules()]

    assert set(names) == EXPECTED_ALERTS
    assert len(names) == len(set(names))


def test_every_alert_has_severity_and_runbook() -> None:
    anchors = runbook_anchors()
    for rule in alert_rules():
        labels = rule["labels"]
        annotations = rule["annotations"]
        assert isinstance(labels, dict) and isinstance(annotations, dict)
        assert labels["severity"] in {"warning", "critical"}, rule["alert"]
        link = annotations["runbook_url"]
        assert link.startswith("docs/runbooks.md#"), rule["alert"]
        assert link.split("#", 1)[1] in anchors, f"{rule['alert']}: no heading for {link}"
        assert annotations["summary"], rule["alert"]


def test_every_alert_fires_in_a_unit_test() -> None:
    fired = set()
    for test_file in RULE_TESTS:
        document = yaml.safe_load(test_file.read_text())
        for case in document["tests"]:
            for check in case.get("alert_rule_test", []):
                if check.get("exp_alerts"):
                    fired.add(check["alertname"])

    assert fired == EXPECTED_ALERTS


def test_rules_query_only_defined_metrics() -> None:
    exported = metrics.exported_series_names()
    for rule in alert_rules():
        names = metric_names(str(rule["expr"]))
        assert names, rule["alert"]
        assert names <= exported, f"{rule['alert']}: unknown {sorted(names - exported)}"


# --- dashboards ---------------------------------------------------------------------------


def test_four_dashboards_with_unique_uids() -> None:
    uids = [json.loads(path.read_text())["uid"] for path in DASHBOARDS]

    assert len(DASHBOARDS) == 4
    assert len(set(uids)) == 4


def test_dashboard_panels_query_defined_metrics() -> None:
    exported = metrics.exported_series_names()
    checked = 0
    for path in DASHBOARDS:
        panels = json.loads(path.read_text())["panels"]
        assert panels, path.name
        for panel in panels:
            assert panel.get("targets"), f"{path.name} panel {panel['title']!r} has no query"
        for where, expr in dashboard_queries(path):
            names = metric_names(expr)
            assert names, f"{where}: no metric in {expr!r}"
            assert names <= exported, f"{where}: unknown {sorted(names - exported)}"
            checked += 1

    assert checked >= 20


def test_every_metric_family_is_on_a_dashboard() -> None:
    used: set[str] = set()
    for path in DASHBOARDS:
        for _, expr in dashboard_queries(path):
            used |= metric_names(expr)

    for spec in metrics.METRICS:
        base = metrics.exported_name(spec.name)
        assert any(name == base or name.startswith(f"{base}_") for name in used), spec.name


@needs_promtool
def test_dashboard_expressions_parse(tmp_path: Path) -> None:
    rules = []
    for path in DASHBOARDS:
        for index, (_, expr) in enumerate(dashboard_queries(path)):
            record = f"arbor_check:{path.stem.replace('-', '_')}_{index}"
            rules.append({"record": record, "expr": grafana_to_promql(expr)})
    rules_file = tmp_path / "dashboard-expressions.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))

    result = run_promtool("check", "rules", str(rules_file))

    assert result.returncode == 0, result.stdout + result.stderr


# --- the expression parser these tests rely on -------------------------------------------


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("sum(ray_arbor_agents_active)", {"ray_arbor_agents_active"}),
        (
            'histogram_quantile(0.99, sum by (le, agent_type) (rate(x_bucket{a="b"}[5m])))',
            {"x_bucket"},
        ),
        ("sum(a) > 0 unless sum(b offset 10m)", {"a", "b"}),
        (
            'rate(c_total{status=~"401|403",route!="/x"}[$__rate_interval]) / on (route) d',
            {"c_total", "d"},
        ),
        ("label_values_here * 60", {"label_values_here"}),
        ("1 + 2e3", set()),
    ],
)
def test_metric_name_parser(expr: str, expected: set[str]) -> None:
    assert metric_names(expr) == expected
