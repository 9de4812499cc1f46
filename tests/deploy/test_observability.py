"""The operators' rules and dashboard (deploy/observability) against the real metrics.

`promtool` checks the rule files and runs their unit tests. Then every metric
name the rules, their tests and the dashboard read must be one the services
export (read off prometheus_client's registry after importing every module that
defines metrics) or a recording rule: an alert on a misspelt or renamed metric
never fires, and nothing else would notice.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

REPO_ROOT = Path(__file__).resolve().parents[2]
OBSERVABILITY = REPO_ROOT / "deploy" / "observability"
RULE_FILES = sorted((OBSERVABILITY / "prometheus").glob("*.rules.yml"))
RULE_TESTS = sorted((OBSERVABILITY / "prometheus" / "tests").glob("*.test.yml"))
DASHBOARDS = sorted((OBSERVABILITY / "grafana").glob("*.json"))
# Series Prometheus makes itself for every scrape target.
SYNTHETIC = frozenset({"up"})
# The series each metric type puts on /metrics.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "unknown": ("",),
}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        reason = "promtool is not installed (Debian: apt-get install prometheus)"
        if os.environ.get("CI"):
            # CI installs it (.ci/run); a skip there would hide rules nobody checked.
            pytest.fail(f"{reason} — CI must install it", pytrace=False)
        pytest.skip(reason)
    return found


def test_the_files_exist() -> None:
    assert RULE_FILES and RULE_TESTS and DASHBOARDS


def test_promtool_checks_the_rules() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", *map(str, RULE_FILES)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass() -> None:
    result = subprocess.run(
        [promtool(), "test", "rules", *map(str, RULE_TESTS)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_silent() -> None:
    firing: set[str] = set()
    silent: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    alerts = {rule["alert"] for rule in _rules() if "alert" in rule}
    assert alerts - firing == set(), "alerts never tested firing"
    assert alerts - silent == set(), "alerts never tested silent"


# --- the metric names the code exports ---


def _metric_modules() -> Iterator[str]:
    """Every module that defines metrics, found in the source: new ones are included."""
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    for package, folder in pyproject["tool"]["setuptools"]["package-dir"].items():
        for source in sorted((REPO_ROOT / folder).glob("*.py")):
            if re.search(
                r"^(from prometheus_client\b|import prometheus_client)", source.read_text(), re.M
            ):
                yield f"{package}.{source.stem}"


@pytest.fixture(scope="module")
def exported() -> frozenset[str]:
    modules = list(_metric_modules())
    assert "agentplex.runtime.metrics" in modules
    for module in modules:
        importlib.import_module(module)
    names = set(SYNTHETIC)
    for family in REGISTRY.collect():
        base = family.name.removesuffix("_total") if family.type == "counter" else family.name
        names.update(base + suffix for suffix in SUFFIXES[family.type])
    return frozenset(names)


def test_the_known_metrics_are_seen(exported: frozenset[str]) -> None:
    # Guards the collection above: a histogram's and a counter's series are there.
    assert {
        "grpc_server_handled_total",
        "grpc_server_handling_seconds_bucket",
        "agentplex_tasks_total",
        "agentplex_task_queue_oldest_pending_seconds",
        "agentplex_task_dead_letters",
    } <= exported
    assert "agentplex_tasks" not in exported


# --- metric names in PromQL ---

_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "offset",
        "inf",
        "nan",
    }
)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (Grafana's $variables allowed)."""
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'', '""', expr)  # strings
    text = re.sub(r"\$\{[^}]*\}|\$\w+", "1", text)  # Grafana variables
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges and subqueries
    # Label lists: `by (a, b)`, `on (a)`, `group_left (a)` …
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\boffset\s+\S+", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?", text):
        if match[2] is None and match[1].lower() not in _KEYWORDS:
            names.add(match[1])
    return names


def test_metric_names_reads_promql() -> None:
    expr = (
        'sum by (agent, le) (rate(x_bucket{agent=~"$agent", le!="1"}[5m])) / on (agent) '
        "group_left (kind) y:recorded:rate5m offset 1h > bool 0.5 and z unless "
        "histogram_quantile(0.95, w[$__rate_interval]) or vector(1) * 1e3"
    )
    assert metric_names(expr) == {"x_bucket", "y:recorded:rate5m", "z", "w"}


def _rules() -> Iterator[dict[str, Any]]:
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            yield from group["rules"]


def unknown_names(rules: list[dict[str, Any]], exported: frozenset[str]) -> dict[str, set[str]]:
    """For each rule, the names it reads that are neither exported nor recorded."""
    recorded = {rule["record"] for rule in rules if "record" in rule}
    unknown = {}
    for rule in rules:
        missing = metric_names(rule["expr"]) - exported - recorded
        if missing:
            unknown[rule.get("record") or rule["alert"]] = missing
    return unknown


def test_rules_read_only_exported_metrics(exported: frozenset[str]) -> None:
    rules = list(_rules())
    assert unknown_names(rules, exported) == {}
    # Recording rules read the services' metrics, never a name Prometheus makes up.
    for rule in rules:
        if "record" in rule:
            assert metric_names(rule["expr"]) - SYNTHETIC, rule["record"]


def test_a_rule_on_a_missing_metric_is_caught(exported: frozenset[str]) -> None:
    rules = [
        *_rules(),
        {"alert": "Misspelt", "expr": "rate(agentplex_task_total[5m]) > 0"},
        {"record": "agentplex:nothing:rate5m", "expr": "sum(rate(agentplex_nothing_total[5m]))"},
    ]
    assert unknown_names(rules, exported) == {
        "Misspelt": {"agentplex_task_total"},
        "agentplex:nothing:rate5m": {"agentplex_nothing_total"},
    }


def test_rule_tests_feed_exported_series(exported: frozenset[str]) -> None:
    # Input series under other names would test the rules against metrics nobody sends.
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for series in case["input_series"]:
                name = series["series"].partition("{")[0].strip()
                assert name in exported, f"{path.name}: {name} is not exported"


# --- the dashboard ---


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


@pytest.fixture(scope="module", params=DASHBOARDS, ids=lambda p: p.name)
def dashboard(request: pytest.FixtureRequest) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(Path(request.param).read_text())
    return loaded


def test_dashboard_picks_its_prometheus(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] >= 39
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    source = variables["datasource"]
    assert source["type"] == "datasource" and source["query"] == "prometheus"
    for panel in _panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    ids = [panel["id"] for panel in _panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids are unique"


def test_dashboard_reads_recorded_or_exported_metrics(
    dashboard: dict[str, Any], exported: frozenset[str]
) -> None:
    recorded = {rule["record"] for rule in _rules() if "record" in rule}
    known = exported | recorded
    expressions = [
        (panel["title"], target["expr"])
        for panel in _panels(dashboard)
        for target in panel.get("targets", [])
    ]
    expressions += [
        (f"${v['name']}", v["query"]["query"])
        for v in dashboard["templating"]["list"]
        if v["type"] == "query"
    ]
    for title, expr in expressions:
        query = re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", expr)
        names = metric_names(query)
        assert names, f"{title}: reads no metric"
        assert names <= known, f"{title}: {sorted(names - known)} neither exported nor recorded"
    # The recording rules exist for the dashboard and the alerts: none goes unused.
    read = set().union(*(metric_names(e) for _, e in expressions))
    read |= set().union(*(metric_names(r["expr"]) for r in _rules() if "alert" in r))
    assert recorded - read == set(), "recording rules nothing reads"
