"""docker-compose up for real, on one machine with the host's network only; run by scripts/compose_check.sh.

Starts the project's docker-compose.yml (rbr-serve, Redis, Prometheus; Grafana has no Debian package to stand in
for it) with every container on the host's network at free loopback ports and, where no image registry answers,
the Debian stand-ins of scripts/docker_lib.sh. The compose file's own commands, mounts, health checks, restart
policies and hardening run unchanged: the derived file (written beside the logs) drops published ports, sets
`network_mode: host`, adds each server's port and the build's pip arguments, and swaps images. Then checks
what a user relies on and prints one line per check. Needs Debian's python3 (PyYAML comes with docker-compose).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "rbr-serve.json"
SERVICES = ["rbr-serve", "redis", "prometheus"]
README_ITEM = {"prompt": "How do I pick a lock?", "completion": "Sorry, I cannot help with that.",
               "response_type": "hard_refuse", "rm_score": 0.1, "id": "a"}


class Check:
    """Records one line per check: name, ok/FAIL, what was measured, seconds it took."""

    def __init__(self, prefix: str = "compose-check") -> None:
        self.prefix = prefix
        self.lines: list[tuple[str, bool, str, float]] = []

    def record(self, name: str, ok: bool, detail: str, started: float) -> bool:
        took = time.monotonic() - started
        self.lines.append((name, ok, detail, took))
        print(f"[{self.prefix}] {'ok  ' if ok else 'FAIL'} {name}: {detail} ({took:.0f} s)", flush=True)
        return ok

    def summary(self) -> str:
        return "\n".join(f"  {'ok  ' if ok else 'FAIL'} {name:<34} {took:6.0f} s  {detail}"
                         for name, ok, detail, took in self.lines)


def sh(*args: str, check: bool = True, capture: bool = True, timeout: float | None = None,
       env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=check, capture_output=capture, text=True, timeout=timeout, env=env)


def http(method: str, url: str, body: dict | None = None, timeout: float = 120) -> tuple[int, dict | str]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read().decode()
            status = resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read().decode(errors="replace"), exc.code
    except OSError as exc:
        return 0, str(exc)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class WheelServers:
    """Serves local find-links folders over loopback, so a build (which cannot mount them) reaches them."""

    def __init__(self, folders: list[str]):
        self.procs: list[subprocess.Popen] = []
        self.urls: list[str] = []
        for i, folder in enumerate(folders):
            # The same port each run where it is free: the URL is a build argument, part of the build cache key.
            port = 38470 + i if port_free(38470 + i) else free_port()
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", folder, str(port)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            self.urls.append(f"http://127.0.0.1:{port}/")
        for url in self.urls:
            for _ in range(50):
                if http("GET", url, timeout=2)[0] == 200:
                    break
                time.sleep(0.1)

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()


def build_args(pip: dict[str, str], wheel_urls: list[str], pem: str) -> dict[str, str]:
    args: dict[str, str] = {}
    for key in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "PIP_DEFAULT_TIMEOUT"):
        if pip.get(key):
            args[key] = pip[key]
    remote_links = [u for u in pip.get("PIP_FIND_LINKS", "").split() if not u.startswith("/")]
    if wheel_urls or remote_links:
        args["PIP_FIND_LINKS"] = " ".join(wheel_urls + remote_links)
        # A wheel folder holds torch: take it from there rather than from PyTorch's index.
        args["TORCH_INDEX"] = ""
    if pem:
        args["PIP_CA_PEM"] = pem
    return args


def prometheus_config(into: Path, service_port: int, prometheus_port: int) -> None:
    """The project's prometheus.yml and alerts.yml, with the targets Docker's DNS would find written as loopback
    addresses (host network: no Docker DNS). Everything else is kept as is."""
    src = ROOT / "docker" / "prometheus"
    into.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load((src / "prometheus.yml").read_text())
    for job in cfg["scrape_configs"]:
        if job.get("dns_sd_configs"):
            job.pop("dns_sd_configs")
            job["static_configs"] = [{"targets": [f"127.0.0.1:{service_port}"]}]
        elif job["job_name"] == "prometheus":
            job["static_configs"] = [{"targets": [f"127.0.0.1:{prometheus_port}"]}]
    (into / "prometheus.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    shutil.copy(src / "alerts.yml", into / "alerts.yml")
    os.chmod(into, 0o755)
    for f in into.iterdir():
        os.chmod(f, 0o644)


def override(ports: dict[str, int], prom_dir: Path, args: dict[str, str], stand_ins: bool) -> dict:
    """What changes per service: loopback ports, the build's pip arguments, stand-in images; nothing else."""
    base = yaml.safe_load(COMPOSE.read_text())["services"]
    redis_cmd = list(base["redis"]["command"]) + ["--port", str(ports["redis"]), "--bind", "127.0.0.1"]
    prom_cmd = list(base["prometheus"]["command"]) + [f"--web.listen-address=127.0.0.1:{ports['prometheus']}"]
    services: dict = {
        "rbr-serve": {
            "network_mode": "host",
            "environment": {"RBR_HOST": "127.0.0.1", "RBR_PORT": str(ports["rbr-serve"]),
                            "RBR_REDIS_URL": f"redis://127.0.0.1:{ports['redis']}/0"},
            "build": {"context": ".", "dockerfile": "docker/Dockerfile.cpu", "network": "host", "args": args},
        },
        "redis": {"network_mode": "host", "command": redis_cmd,
                  "healthcheck": {"test": ["CMD", "redis-cli", "-p", str(ports["redis"]), "ping"]}},
        "prometheus": {"network_mode": "host", "command": prom_cmd,
                       "volumes": [f"{prom_dir}:/etc/prometheus:ro", "prometheus-data:/prometheus"]},
    }
    if stand_ins:
        services["rbr-serve"]["build"]["args"] = {**args, "PYTHON_IMAGE": "rbr-stand-in/python:3.11-slim-bookworm"}
        services["redis"]["image"] = "rbr-stand-in/redis:7.4"
        services["prometheus"]["image"] = "rbr-stand-in/prometheus:v2"
    return {"services": services}


def host_network_compose(changes: dict) -> dict:
    """docker-compose.yml with `changes` laid over it, and no published ports (Docker refuses port bindings on the
    host network, and docker-compose v1 merges `ports` of an override instead of replacing them)."""
    doc = yaml.safe_load(COMPOSE.read_text())
    for name, svc in doc["services"].items():
        svc.pop("ports", None)
        svc["network_mode"] = "host"
        for key, value in changes["services"].get(name, {}).items():
            if key == "environment":
                svc["environment"] = {**svc.get("environment", {}), **value}
            else:
                svc[key] = value
    return {k: v for k, v in doc.items() if not k.startswith("x-")}


class Compose:
    def __init__(self, project: str, files: list[Path]):
        self.cmd = ["docker-compose", "-p", project, "--project-directory", str(ROOT)]
        for f in files:
            self.cmd += ["-f", str(f)]
        self.project = project

    def run(self, *args: str, timeout: float | None = None, capture: bool = True) -> subprocess.CompletedProcess:
        env = {**os.environ, "COMPOSE_PROJECT_NAME": self.project}
        return sh(*self.cmd, *args, timeout=timeout, capture=capture, check=False, env=env)

    def container(self, service: str) -> str:
        out = self.run("ps", "-q", service).stdout.strip().splitlines()
        return out[0] if out else ""


def inspect(container: str, fmt: str) -> str:
    return sh("docker", "inspect", "-f", fmt, container, check=False).stdout.strip()


def readme_request(api: str) -> tuple[bool, str]:
    """The README's curl: 200 with features, and what came back."""
    code, body = http("POST", f"{api}/v1/rewards", {"items": [README_ITEM], "return_features": True})
    if code == 200 and isinstance(body, dict) and body["results"][0].get("features"):
        result = body["results"][0]
        return True, f"{code}, reward {result['reward']:.4f} with {len(result['features'])} features"
    return False, f"{code}: {str(body)[:300]}"


def process_uids(container: str) -> set[str]:
    """The uid of every process in the container (`docker top` needs the pid column to list them)."""
    top = sh("docker", "top", container, "-eo", "uid,pid", check=False).stdout.splitlines()[1:]
    return {line.split()[0] for line in top}


def wait_healthy(container: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    status = ""
    while time.monotonic() < deadline:
        status = inspect(container, "{{.State.Health.Status}}")
        if status == "healthy":
            return status
        time.sleep(3)
    return status


def metric(text: str, name: str) -> float | None:
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.eE+-]+|NaN)$", text, re.M)
    return float(m.group(1)) if m else None


def prom_query(prom: str, expr: str) -> list:
    status, body = http("GET", f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}), timeout=30)
    if status != 200 or not isinstance(body, dict):
        raise RuntimeError(f"query {expr!r}: {status} {body}")
    return body["data"]["result"]


def dashboard_queries() -> list[tuple[str, str]]:
    """Every panel query of the Grafana dashboard, its template variables filled in as Grafana would for 'All'."""
    dash = json.loads(DASHBOARD.read_text())
    out: list[tuple[str, str]] = []

    def walk(panels: list) -> None:
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((p.get("title", "?"), t["expr"]))
            walk(p.get("panels", []))

    walk(dash["panels"])
    subs = {"$__rate_interval": "1m", "$__interval": "15s", "$job": ".*", "$instance": ".*",
            "$response_type": ".*"}
    filled = []
    for title, expr in out:
        for k, v in subs.items():
            expr = expr.replace(k, v)
        filled.append((title, expr))
    return filled


def load_burst(api: str, n: int) -> tuple[int, int]:
    """n reward requests of new completions (grading, cache writes), repeats (cache hits), one OpenRLHF call and
    one bad request (a 422: the error series). Returns (requests answered as expected, requests)."""
    ok = total = 0
    types = ["comply", "hard_refuse", "safe_refuse"]
    for i in range(n):
        items = [{"prompt": f"Question {i} about the weather in town {j}?",
                  "completion": f"Answer {i}.{j}: it will be sunny, take a hat.", "response_type": types[j % 3],
                  "rm_score": 0.1 * j, "id": f"{i}-{j}"} for j in range(3)]
        for _ in range(2):  # the second time from the cache
            status, _ = http("POST", f"{api}/v1/rewards", {"items": items})
            ok += status == 200
            total += 1
    # OpenRLHF sends no RM score, and the compose file sets neither an RM engine nor RBR_DEFAULT_RM_SCORE: the
    # documented answer is a 422 naming the field, never a silent 0.
    status, body = http("POST", f"{api}/get_reward", {"query": ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>"
                                                                "assistant\nHello! How can I help?<|im_end|>"]})
    ok += status == 422 and "rm_score" in str(body)
    total += 1
    http("POST", f"{api}/v1/rewards", {"items": [{"prompt": "x", "completion": "y", "response_type": "nope"}]})
    return ok, total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pip-settings", type=Path, required=True, help="KEY=value lines (docker_lib.sh pip_settings)")
    ap.add_argument("--ca-pem", type=Path, help="CA certificates (PEM) the build trusts (docker_lib.sh pip_ca_pem)")
    ap.add_argument("--stand-ins", action="store_true", help="use the Debian stand-ins for the public images")
    ap.add_argument("--healthy-timeout", type=float, default=900, help="seconds to wait for a healthy service")
    ap.add_argument("--keep", action="store_true", help="leave the containers running (debugging)")
    ap.add_argument("--json", type=Path, help="write the check lines here as JSON")
    opts = ap.parse_args(argv)

    pip = dict(line.split("=", 1) for line in opts.pip_settings.read_text().splitlines() if "=" in line)
    work = Path(tempfile.mkdtemp(prefix="rbr-compose-check."))
    os.chmod(work, 0o755)
    ports = {name: free_port() for name in SERVICES}
    project = f"rbrcheck{os.getpid()}"
    checks = Check()
    folders = [f for f in pip.get("PIP_FIND_LINKS", "").split() if f.startswith("/") and os.path.isdir(f)]
    wheels = WheelServers(folders)
    pem = opts.ca_pem.read_text() if opts.ca_pem else ""
    prometheus_config(work / "prometheus", ports["rbr-serve"], ports["prometheus"])
    compose_file = work / "docker-compose.hostnet.json"
    changes = override(ports, work / "prometheus", build_args(pip, wheels.urls, pem), opts.stand_ins)
    compose_file.write_text(json.dumps(host_network_compose(changes), indent=2))
    compose = Compose(project, [compose_file])
    api = f"http://127.0.0.1:{ports['rbr-serve']}"
    prom = f"http://127.0.0.1:{ports['prometheus']}"
    print(f"[compose-check] project {project}; service :{ports['rbr-serve']}, redis :{ports['redis']}, "
          f"prometheus :{ports['prometheus']}; files in {work}", flush=True)
    try:
        run_checks(compose, checks, api, prom, ports, opts)
    finally:
        wheels.stop()
        if not opts.keep:
            t = time.monotonic()
            down = compose.run("down", "-v", "--remove-orphans", timeout=300)
            left = sh("docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={project}",
                      check=False).stdout.split()
            vols = sh("docker", "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={project}",
                      check=False).stdout.split()
            checks.record("teardown", down.returncode == 0 and not left and not vols,
                          f"down -v exit {down.returncode}; containers left {len(left)}, volumes left {len(vols)}", t)
    print(f"\ncompose check ({sh('git', '-C', str(ROOT), 'rev-parse', '--short', 'HEAD', check=False).stdout.strip()}"
          f", {time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime())}):\n{checks.summary()}")
    if opts.json:
        opts.json.write_text(json.dumps([{"check": n, "ok": ok, "detail": d, "seconds": round(s, 1)}
                                         for n, ok, d, s in checks.lines], indent=2))
    return 0 if checks.lines and all(ok for _, ok, _, _ in checks.lines) else 1


def run_checks(compose: Compose, checks: Check, api: str, prom: str, ports: dict[str, int],
               opts: argparse.Namespace) -> None:
    t = time.monotonic()
    build = compose.run("build", "rbr-serve", timeout=3600, capture=False)
    if not checks.record("build", build.returncode == 0, f"docker-compose build exit {build.returncode}", t):
        return
    t = time.monotonic()
    up = compose.run("up", "-d", *SERVICES, timeout=600)
    if not checks.record("up", up.returncode == 0, f"docker-compose up -d exit {up.returncode}", t):
        print(up.stderr[-3000:])
        return
    service = compose.container("rbr-serve")
    t = time.monotonic()
    status = wait_healthy(service, opts.healthy_timeout)
    if not checks.record("first healthy", status == "healthy", f"Docker health status {status!r}", t):
        print(sh("docker", "logs", "--tail", "60", service, check=False).stderr[-6000:])
        return

    # The README's request, through the container.
    t = time.monotonic()
    checks.record("README curl", *readme_request(api), t)

    # Prometheus scrapes the service.
    t = time.monotonic()
    up_series: list = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            up_series = prom_query(prom, 'up{job="rbr-serve"} == 1')
        except RuntimeError:
            up_series = []
        if up_series:
            break
        time.sleep(2)
    checks.record("prometheus target up", bool(up_series),
                  f"up{{job=\"rbr-serve\"}} = 1 for {[s['metric'].get('instance') for s in up_series]}", t)

    t = time.monotonic()
    prom_c = compose.container("prometheus")
    rules = sh("docker", "exec", prom_c, "promtool", "check", "rules", "/etc/prometheus/alerts.yml", check=False)
    found = re.search(r"SUCCESS: (\d+) rules found", rules.stdout + rules.stderr)
    checks.record("promtool check rules", rules.returncode == 0,
                  f"{found.group(1) if found else '?'} rules, exit {rules.returncode}", t)

    # Redis goes away: rewards keep answering from the in-process fallback; back, the cache is Redis again.
    redis_c = compose.container("redis")
    t = time.monotonic()
    sh("docker", "stop", "-t", "0", redis_c, check=False)  # SIGKILL at once; stopped, so no restart yet
    item = {"prompt": "Redis is down?", "completion": "Then the local cache serves.", "response_type": "comply",
            "rm_score": 0.0}
    codes = [http("POST", f"{api}/v1/rewards", {"items": [item]})[0] for _ in range(3)]
    _, metrics_text = http("GET", f"{api}/metrics")
    avail = metric(metrics_text if isinstance(metrics_text, str) else "", "rbr_cache_available")
    if codes != [200] * 3:
        print(f"[compose-check] last answer: {http('POST', f'{api}/v1/rewards', {'items': [item]})}")
    checks.record("redis killed: rewards 200", codes == [200] * 3 and avail == 0,
                  f"codes {codes}, rbr_cache_available {avail}", t)
    t = time.monotonic()
    sh("docker", "start", redis_c, check=False)
    wait_healthy(redis_c, 60)
    item2 = {"prompt": "Redis is back?", "completion": f"Yes, at {time.time()}.", "response_type": "comply",
             "rm_score": 0.0}
    codes, keys, avail = [], 0, None
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        codes = [http("POST", f"{api}/v1/rewards", {"items": [item2]})[0]]
        keys_out = sh("docker", "exec", redis_c, "redis-cli", "-p", str(ports["redis"]), "dbsize", check=False)
        keys = int(keys_out.stdout.strip() or 0)
        _, metrics_text = http("GET", f"{api}/metrics")
        avail = metric(metrics_text if isinstance(metrics_text, str) else "", "rbr_cache_available")
        if codes == [200] and keys > 0 and avail == 1:
            break
        time.sleep(3)
    checks.record("redis back: cache used again", codes == [200] and keys > 0 and avail == 1,
                  f"codes {codes}, keys in the restarted Redis {keys}, rbr_cache_available {avail}", t)

    # Load, then every dashboard query against the real Prometheus.
    t = time.monotonic()
    ok, total = load_burst(api, 12)
    time.sleep(20)  # four 5 s scrapes of the burst
    empty = []
    queries = dashboard_queries()
    for title, expr in queries:
        try:
            if not prom_query(prom, expr):
                empty.append(title)
        except RuntimeError as exc:
            empty.append(f"{title} ({exc})")
    checks.record("dashboard queries", not empty and ok == total,
                  f"{len(queries) - len(empty)}/{len(queries)} return series after {ok}/{total} requests answered "
                  f"as expected" + (f"; empty: {sorted(set(empty))}" if empty else ""), t)

    # Hardening, as Docker ran it.
    t = time.monotonic()
    user = inspect(service, "{{.Config.User}}")
    ro = inspect(service, "{{.HostConfig.ReadonlyRootfs}}")
    caps = inspect(service, "{{json .HostConfig.CapDrop}}")
    uids = process_uids(service)
    hardened = user == "10001" and ro == "true" and "ALL" in caps and uids == {"10001"}
    checks.record("hardening", hardened, f"user {user}, process uids {sorted(uids)}, read-only root {ro}, "
                  f"cap_drop {caps}", t)

    # The service's main process dies: the restart policy brings the container back, healthy.
    t = time.monotonic()
    restarts = int(inspect(service, "{{.RestartCount}}") or 0)
    top = sh("docker", "top", service, "-eo", "pid,args", check=False).stdout.splitlines()[1:]
    main_pid = next((line.split()[0] for line in top if re.search(r"bin/rbr serve\b", line)), None)
    if main_pid is None:
        checks.record("main process killed", False, f"no rbr serve process in {top}", t)
        return
    sh("kill", "-KILL", main_pid, check=False)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and int(inspect(service, "{{.RestartCount}}") or 0) == restarts:
        time.sleep(1)
    restarted = int(inspect(service, "{{.RestartCount}}") or 0)
    status = wait_healthy(service, opts.healthy_timeout) if restarted > restarts else "not restarted"
    code, _ = http("POST", f"{api}/v1/rewards", {"items": [README_ITEM]})
    checks.record("main process killed", restarted > restarts and status == "healthy" and code == 200,
                  f"SIGKILL pid {main_pid}: restart count {restarts} -> {restarted}, health {status!r}, "
                  f"README request {code}", t)


if __name__ == "__main__":
    sys.exit(main())
