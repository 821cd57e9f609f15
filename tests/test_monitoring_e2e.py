"""Monitoring end to end, against the real service: `rbr serve` with the CPU vLLM engine and the embedded model,
a real redis-server and a real Prometheus, all on loopback, started once for this module.

- Every metric name an alert rule or a dashboard panel uses is in the service's live /metrics output (engine
  `vllm:` series included).
- Prometheus, running the project's prometheus.yml and alerts.yml (targets pointed at the loopback ports, a 1 s
  scrape interval), scrapes rbr_ series from the service after a few reward requests, and loads every alert rule.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from deploy_support import (
    ALERTS_YML,
    PROMETHEUS_YML,
    ROOT,
    alert_exprs,
    exposed_names,
    need_tool,
    used_metric_names,
)
from helpers import free_port
from redis_server import RedisServer

pytestmark = [pytest.mark.engine, pytest.mark.redis]

READY_TIMEOUT_S = float(os.environ.get("RBR_TEST_READY_TIMEOUT_S", "420"))  # CPU engine + model load on 2 cores
SCRAPE_TIMEOUT_S = 60
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
    cfg["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    for job in cfg["scrape_configs"]:
        job.pop("dns_sd_configs", None)
        job.pop("static_configs", None)
        job["scrape_interval"] = "1s"
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


def prom_query(prom: str, query: str) -> list[dict]:
    status, body = http("GET", f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": query}), timeout=5)
    if status != 200:
        return []
    return json.loads(body)["data"]["result"]


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


def test_prometheus_scrapes_rbr_series_from_the_service(stack):
    base, prom = stack["base"], stack["prometheus"]
    for i in range(3):
        item = dict(REWARD_ITEM, completion=f"Hello! ({i})")
        status, body = http("POST", f"{base}/v1/rewards", {"items": [item, REWARD_ITEM]})
        assert status == 200, body[:500]
        assert len(json.loads(body)["results"]) == 2

    query = 'sum(rbr_requests_total{job="rbr-serve",route="/v1/rewards",code="200"})'
    deadline = time.monotonic() + SCRAPE_TIMEOUT_S
    result: list[dict] = []
    while time.monotonic() < deadline:
        result = prom_query(prom, query)
        if result and float(result[0]["value"][1]) >= 3:
            break
        time.sleep(1)
    else:
        targets = http("GET", f"{prom}/api/v1/targets")[1][:2000]
        pytest.fail(f"Prometheus has no {query} >= 3 after {SCRAPE_TIMEOUT_S} s (last {result}); targets: {targets!r}"
                    f"\nprometheus log:\n{tail(stack['logs'] / 'prometheus.log')}")

    up = prom_query(prom, 'up{job="rbr-serve"}')
    assert up and up[0]["value"][1] == "1"
    # Series from each part of the pipeline reached Prometheus, the engine's included.
    for q in ['rbr_cache_requests_total{job="rbr-serve"}', 'rbr_reward_bucket{job="rbr-serve"}',
              'rbr_ready{job="rbr-serve"}', 'vllm:kv_cache_usage_perc{job="rbr-serve"}']:
        assert prom_query(prom, q), f"Prometheus has no series for {q}"

    # The project's alert rules loaded into this Prometheus, and none fires against a healthy service
    # (pending is fine: RbrServeEngineDown's window may still hold the start-up).
    status, body = http("GET", f"{prom}/api/v1/rules", timeout=5)
    assert status == 200
    rules = {r["name"]: r for g in json.loads(body)["data"]["groups"] for r in g["rules"]}
    assert set(alert_exprs()) <= set(rules)
    for name in ("RbrServeHighErrorRate", "RbrServeNotReady", "RbrServeTargetDown", "RbrServeCacheUnavailable"):
        assert rules[name]["health"] == "ok" and rules[name]["state"] == "inactive", rules[name]


if __name__ == "__main__":  # pragma: no cover - `python tests/test_monitoring_e2e.py` runs just this module
    sys.exit(pytest.main([__file__, "-v"]))
