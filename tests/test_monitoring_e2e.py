"""Monitoring end to end, against the real service: `rbr serve` with the CPU vLLM engine and the embedded model,
a real redis-server and a real Prometheus, all on loopback, started once for this module.

- Every metric name an alert rule or a dashboard panel uses is in the service's live /metrics output (engine
  `vllm:` series included).
- Prometheus, running the project's prometheus.yml and alerts.yml (targets pointed at the loopback ports, a 1 s
  scrape interval), scrapes rbr_ series from the service after a few reward requests, and loads every alert rule
  with its `for:`. Evaluated after that scrape, no rule fires, and a rule whose inputs do not depend on the machine
  keeping up with a time budget (TIME_BUDGET_SERIES) is inactive; on a loaded machine the others may be pending.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from deploy_support import (
    ALERTS_YML,
    PROMETHEUS_YML,
    ROOT,
    exposed_names,
    need_tool,
    used_metric_names,
)
from helpers import free_port
from redis_server import RedisServer

pytestmark = [pytest.mark.engine, pytest.mark.redis]

# CPU engines + model load on 2 cores; under scripts/stress_test.sh (2 CPU hogs) start-up once passed 420 s
READY_TIMEOUT_S = float(os.environ.get("RBR_TEST_READY_TIMEOUT_S", "900"))
SCRAPE_INTERVAL_S = EVALUATION_INTERVAL_S = 1  # the test's prometheus.yml: scrape_timeout = scrape_interval
SCRAPE_WAIT_S = 60  # for a successful scrape after the requests, then for a rule evaluation after that scrape
REWARD_ITEM = {"prompt": "hi", "completion": "Hello!", "response_type": "comply", "rm_score": 0.5}


def http(method: str, url: str, body: dict | None = None, timeout: float = 60) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def project_env() -> dict[str, str]:
    """This environment with scripts/env.sh applied (the CPU engine's variables) and no inherited RBR_* settings."""
    out = subprocess.run(["bash", "-c", 'source scripts/env.sh && python3 -c "import json, os; '
                          'print(json.dumps(dict(os.environ)))"'], cwd=ROOT, capture_output=True, text=True, check=True)
    env = json.loads(out.stdout)
    return {k: v for k, v in env.items() if not k.startswith("RBR_")}


class Proc:
    """A background process, leader of its own process group, whose output goes to a log file."""

    def __init__(self, name: str, args: list[str], log: Path, env: dict[str, str] | None = None):
        self.name, self.log = name, log
        self._fh = log.open("wb")
        self.proc = subprocess.Popen(args, stdout=self._fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                     start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace_s: float = 30) -> None:
        """SIGTERM to the process group it leads (vLLM's engine processes included), SIGKILL after grace_s."""
        if self.alive():
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait(10)
        self._signal(signal.SIGKILL)  # children that outlived their parent
        self._fh.close()

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)


def prometheus_config(service_port: int, prom_port: int, workdir: Path) -> Path:
    """docker/prometheus/prometheus.yml with its targets on loopback and 1 s intervals; alerts.yml beside it."""
    cfg = yaml.safe_load(PROMETHEUS_YML.read_text())
    every = f"{SCRAPE_INTERVAL_S}s"
    cfg["global"].update(scrape_interval=every, scrape_timeout=every, evaluation_interval=f"{EVALUATION_INTERVAL_S}s")
    for job in cfg["scrape_configs"]:
        job.pop("dns_sd_configs", None)
        job.pop("static_configs", None)
        job["scrape_interval"] = every
        port = service_port if job["job_name"] == "rbr-serve" else prom_port
        job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    shutil.copy(ALERTS_YML, workdir / ALERTS_YML.name)
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """redis-server, rbr serve (ready) and Prometheus scraping it; yields their URLs."""
    rbr = need_tool("rbr")
    prometheus = need_tool("prometheus")
    need_tool("redis-server")
    if not (ROOT / "service" / "app.py").exists():
        pytest.skip("service/app.py is not there yet")
    work = tmp_path_factory.mktemp("monitoring")
    procs: list[Proc] = []
    redis = RedisServer().start()
    try:
        port = free_port()
        env = project_env() | {"RBR_HOST": "127.0.0.1", "RBR_PORT": str(port), "RBR_REDIS_URL": redis.url,
                               "RBR_LOG_LEVEL": "info"}
        service = Proc("rbr serve", [rbr, "serve"], work / "rbr-serve.log", env=env)
        procs.append(service)
        base = f"http://127.0.0.1:{port}"

        prom_port = free_port()
        config = prometheus_config(port, prom_port, work)
        procs.append(Proc("prometheus", [prometheus, f"--config.file={config}", f"--storage.tsdb.path={work / 'tsdb'}",
                                         f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
                          work / "prometheus.log"))

        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            status, body = http("GET", f"{base}/readyz", timeout=5)
            if status == 200:
                break
            if status == 503 and b"engine_unavailable" in body:  # the engine failed to start: no point waiting
                pytest.fail(f"rbr serve's engine failed to start: {body[:500]!r}\n{tail(service.log)}")
            if not service.alive():
                pytest.fail(f"rbr serve exited ({service.proc.returncode}) before ready:\n{tail(service.log)}")
            if time.monotonic() > deadline:
                pytest.fail(f"rbr serve not ready after {READY_TIMEOUT_S:.0f} s (last /readyz {status} {body[:300]!r})"
                            f":\n{tail(service.log)}")
            time.sleep(1)
        yield {"base": base, "prometheus": f"http://127.0.0.1:{prom_port}", "logs": work, "procs": procs}
    finally:
        for p in reversed(procs):
            p.stop()
        redis.stop()


def prom_query(prom: str, query: str, at: float | None = None) -> list[dict]:
    """An instant query's result vector, evaluated now or at `at` (Unix seconds); [] when Prometheus refuses it."""
    params = {"query": query} | ({"time": repr(at)} if at is not None else {})
    status, body = http("GET", f"{prom}/api/v1/query?" + urllib.parse.urlencode(params), timeout=10)
    if status != 200:
        return []
    return json.loads(body)["data"]["result"]


def prom_api(prom: str, path: str) -> dict:
    status, body = http("GET", f"{prom}/api/v1/{path}", timeout=10)
    assert status == 200, f"Prometheus /api/v1/{path}: {status} {body[:500]!r}"
    return json.loads(body)["data"]


def unix(rfc3339: str) -> float:
    """Prometheus's timestamps (RFC 3339, nanoseconds; year 1 for never) as Unix seconds."""
    return datetime.fromisoformat(rfc3339).timestamp()


def seconds(duration: str) -> float:
    """A Prometheus duration ("2m", "1h30m", "500ms") in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+)(ms|[smhdwy])", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a Prometheus duration: {duration!r}"
    return sum(int(n) * units[u] for n, u in parts)


_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}


def selected_series(expr: str) -> set[str]:
    """Every series name a PromQL expression selects (`up` included; functions, keywords, labels left out)."""
    expr = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = re.findall(r"(?<![\w:.])([A-Za-z_:][\w:]*)(?![\w:]|\s*\()", expr)
    return {n for n in names if n not in _KEYWORDS}


# Series whose value on a healthy service still depends on the machine keeping up with a time budget. Under load
# an alert over one of them may be pending: for example a Redis round trip over RBR_REDIS_TIMEOUT_S (50 ms) makes
# the service count a cache error and report rbr_cache_available 0 until its next Redis operation succeeds, which
# in this module never comes; that is what the rules' `for:` windows are there to ride out.
TIME_BUDGET_SERIES = {
    "up": "a scrape of /metrics that runs past scrape_timeout gives up 0",
    "rbr_cache_available": "a Redis operation past RBR_REDIS_TIMEOUT_S sets it to 0 until one succeeds",
    "rbr_cache_errors_total": "a Redis operation past RBR_REDIS_TIMEOUT_S counts as an error",
    "rbr_request_duration_seconds_bucket": "a loaded machine answers slowly",
}


def alert_rules() -> dict[str, dict]:
    """alerts.yml's alerting rules by name: expr, `for:` in seconds, and the time-budget series they read."""
    doc = yaml.safe_load(ALERTS_YML.read_text())
    out = {}
    for rule in (r for g in doc["groups"] for r in g["rules"] if "alert" in r):
        budget = sorted(selected_series(rule["expr"]) & TIME_BUDGET_SERIES.keys())
        out[rule["alert"]] = {"expr": rule["expr"], "for_s": seconds(rule.get("for", "0s")), "budget": budget}
    return out


def monitoring_report(prom: str, rules: list[dict], at: float | None) -> str:
    """Every rule's state (and its expression's value at `at`, the scrape the test checked) and every target's
    last scrape, for failure messages."""
    when = "-" if at is None else datetime.fromtimestamp(at, UTC).isoformat()
    lines = [f"rules (state at their last evaluation; value: the expression at {when}, the checked scrape):"]
    for r in rules:
        value = "-" if at is None else [
            ({k: v for k, v in s["metric"].items() if k not in ("job", "instance")}, s["value"][1])
            for s in prom_query(prom, r["query"], at)]
        lines.append(f"  {r['name']}: state={r.get('state')} health={r.get('health')} for={r.get('duration')}s "
                     f"lastEvaluation={r.get('lastEvaluation')} lastError={r.get('lastError')!r} "
                     f"alerts={[(a['state'], a.get('activeAt'), a.get('value')) for a in r.get('alerts', [])]} "
                     f"value={value}")
    status, body = http("GET", f"{prom}/api/v1/targets", timeout=10)
    lines.append("targets (last scrape):")
    if status != 200:
        lines.append(f"  /api/v1/targets: {status} {body[:300]!r}")
    else:
        for t in json.loads(body)["data"]["activeTargets"]:
            lines.append(f"  {t['labels'].get('job')} {t['scrapeUrl']}: health={t['health']} "
                         f"lastScrape={t['lastScrape']} lastScrapeDuration={t['lastScrapeDuration']} "
                         f"lastError={t['lastError']!r}")
    return "\n".join(lines)


def test_every_alert_and_dashboard_metric_is_exposed(stack):
    # One scored request first, so labelled series have samples too (not required: TYPE lines count).
    status, body = http("POST", f"{stack['base']}/v1/rewards", {"items": [REWARD_ITEM]})
    assert status == 200, body[:500]
    status, body = http("GET", f"{stack['base']}/metrics")
    assert status == 200
    names = exposed_names(body.decode())
    used = used_metric_names()
    missing = {n: sorted(w) for n, w in used.items() if n not in names}
    assert not missing, (
        "metric names used by alerts or dashboard panels that /metrics does not expose: "
        f"{json.dumps(missing, indent=1)}"
        f"\nexposed rbr_/vllm: names: {sorted(n for n in names if n.startswith(('rbr_', 'vllm:')))}"
    )
    assert any(n.startswith("vllm:") for n in used), "the dashboard shows engine series"


def served_rewards(base: str) -> float:
    """rbr_requests_total{route="/v1/rewards",code="200"} as the service itself exports it."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body = http("GET", f"{base}/metrics")
    assert status == 200
    return sum(s.value for fam in text_string_to_metric_families(body.decode()) for s in fam.samples
               if s.name == "rbr_requests_total" and s.labels == {"route": "/v1/rewards", "code": "200"})


def test_prometheus_scrapes_rbr_series_from_the_service(stack):
    base, prom = stack["base"], stack["prometheus"]
    for i in range(3):
        item = dict(REWARD_ITEM, completion=f"Hello! ({i})")
        status, body = http("POST", f"{base}/v1/rewards", {"items": [item, REWARD_ITEM]})
        assert status == 200, body[:500]
        assert len(json.loads(body)["results"]) == 2
    served = served_rewards(base)
    assert served >= 3

    # A scrape that succeeded after those requests: the time of its samples (`at`). Every query below is evaluated
    # at `at`, so they all read that one scrape (a later one may time out under load and leave only `up` 0).
    query = 'sum(rbr_requests_total{job="rbr-serve",route="/v1/rewards",code="200"})'
    latest_ok = 'timestamp(up{job="rbr-serve"}) and up{job="rbr-serve"} == 1'
    at, seen, deadline = None, None, time.monotonic() + SCRAPE_WAIT_S
    while time.monotonic() < deadline:
        ok = prom_query(prom, latest_ok)
        if ok:
            seen = prom_query(prom, query, float(ok[0]["value"][1]))
            if seen and float(seen[0]["value"][1]) >= served:
                at = float(ok[0]["value"][1])
                break
        time.sleep(SCRAPE_INTERVAL_S)
    checked_by = time.time()  # the scrape at `at` was in Prometheus's storage by now
    if at is None:
        rules = [r for g in prom_api(prom, "rules")["groups"] for r in g["rules"]]
        pytest.fail(f"no successful scrape of rbr-serve with {query} >= {served} (the service's own count) within "
                    f"{SCRAPE_WAIT_S} s (last seen: {seen})\n{monitoring_report(prom, rules, None)}"
                    f"\nprometheus log:\n{tail(stack['logs'] / 'prometheus.log')}")

    # Series from each part of the pipeline reached Prometheus, the engine's included.
    for q in ['rbr_cache_requests_total{job="rbr-serve"}', 'rbr_reward_bucket{job="rbr-serve"}',
              'rbr_ready{job="rbr-serve"}', 'vllm:kv_cache_usage_perc{job="rbr-serve"}']:
        assert prom_query(prom, q, at), f"Prometheus has no series for {q} in the scrape at {at}"

    # The project's alert rules loaded into this Prometheus, each with its `for:`; wait for an evaluation that
    # started after the checked scrape was stored, so the states below reflect the service after the requests.
    expected = alert_rules()
    deadline = time.monotonic() + SCRAPE_WAIT_S
    while True:
        rules = [r for g in prom_api(prom, "rules")["groups"] for r in g["rules"] if r["type"] == "alerting"]
        if {r["name"] for r in rules} >= expected.keys() and all(
                unix(r["lastEvaluation"]) > checked_by for r in rules) or time.monotonic() > deadline:
            break
        time.sleep(EVALUATION_INTERVAL_S)
    report = monitoring_report(prom, rules, at)
    loaded = {r["name"]: r for r in rules}
    assert loaded.keys() == expected.keys(), f"alerts.yml has {sorted(expected)}\n{report}"
    for name, want in expected.items():
        rule = loaded[name]
        assert rule["duration"] == want["for_s"], f"{name}: for {rule['duration']} s, alerts.yml says {want}"
        assert unix(rule["lastEvaluation"]) > checked_by, (
            f"{name}: not evaluated within {SCRAPE_WAIT_S} s after the scrape at {at}\n{report}")
        assert rule["health"] == "ok" and not rule.get("lastError"), f"{name} does not evaluate\n{report}"

    # What a healthy service allows (every request above answered 200, ready before them, engine up, the only
    # client): a rule whose expression reads no time-budget series (TIME_BUDGET_SERIES) is inactive. A rule that
    # reads one may be pending on a loaded machine; firing needs its expression true at every evaluation for its
    # `for:`, which nothing here holds for. (promtool's alerts_test.yml tests each rule's logic.)
    strict = [n for n, w in expected.items() if not w["budget"]]
    assert strict, "every alert reads a time-budget series: the inactive check below would check nothing"
    for name in strict:
        assert loaded[name]["state"] == "inactive", f"{name} is {loaded[name]['state']} against a healthy service" \
            f" (it reads no time-budget series)\n{report}"
    for name, want in expected.items():
        assert loaded[name]["state"] != "firing", (
            f"{name} fires (for: {want['for_s']:.0f} s; time-budget series {want['budget']}: "
            f"{[TIME_BUDGET_SERIES[s] for s in want['budget']]})\n{report}")


if __name__ == "__main__":  # pragma: no cover - `python tests/test_monitoring_e2e.py` runs just this module
    sys.exit(pytest.main([__file__, "-v"]))
