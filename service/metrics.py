"""Prometheus metrics: prefix `rbr_`, base units, counters for events, histograms for durations and sizes.

Each app gets its own registry so several apps (tests) never collide; `/metrics` also re-exports the
engine's `vllm:` series where the engine runs in this process.
"""

from __future__ import annotations

from prometheus_client import REGISTRY as GLOBAL_REGISTRY
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
REWARD_BUCKETS = (-10, -5, -3, -2, -1, -0.5, -0.25, 0, 0.25, 0.5, 1, 2, 3, 5, 10)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("rbr_requests_total", "HTTP requests by route and status code.",
                                ["route", "code"], registry=r)
        self.request_duration = Histogram("rbr_request_duration_seconds", "HTTP request latency by route.",
                                          ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.items = Counter("rbr_items_total", "Items scored, by response type (none: RM only).",
                             ["response_type"], registry=r)
        self.request_items = Histogram("rbr_request_items", "Items per reward request.", buckets=SIZE_BUCKETS,
                                       registry=r)
        self.judgments = Counter("rbr_judgments_total", "Proposition judgments sent to the grader engine.",
                                 registry=r)
        self.engine_prompts = Counter(
            "rbr_engine_prompts_total", "Distinct grading prompts sent to the engine (after in-flight deduplication).",
            registry=r)
        self._engine_prompts_seen: tuple[int, int] = (0, 0)  # (id of grader, its count already exported)
        self.cache_requests = Counter("rbr_cache_requests_total", "Feature cache lookups by result.",
                                      ["result"], registry=r)  # hit, miss, error
        self.cache_errors = Counter("rbr_cache_errors_total", "Feature cache operations that failed, by operation.",
                                    ["operation"], registry=r)
        self.cache_available = Gauge("rbr_cache_available", "1 when the feature cache backend answers, else 0.",
                                     registry=r)
        self.grading_batch_size = Histogram("rbr_grading_batch_size", "Judgments per grading call to the engine.",
                                            buckets=SIZE_BUCKETS, registry=r)
        self.grading_duration = Histogram("rbr_grading_duration_seconds", "Latency of one grading call.",
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.stage_duration = Histogram("rbr_stage_duration_seconds", "Time per pipeline stage of a request.",
                                        ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.inflight_judgments = Gauge("rbr_inflight_judgments", "Judgments admitted and not yet answered.",
                                        registry=r)
        self.inflight_requests = Gauge("rbr_inflight_requests", "Reward requests being processed.", registry=r)
        self.rewards = Histogram("rbr_reward", "Total rewards returned, by response type.", ["response_type"],
                                 buckets=REWARD_BUCKETS, registry=r)
        self.errors = Counter("rbr_errors_total", "Error responses by error type.", ["type"], registry=r)
        self.rejected = Counter("rbr_rejected_total", "Requests refused for overload (429).", registry=r)
        self.ready = Gauge("rbr_ready", "1 when engine, policy and weights are loaded.", registry=r)
        self.engine_up = Gauge("rbr_engine_up", "1 when the grader engine answers health checks.", registry=r)
        self.reloads = Counter("rbr_reloads_total", "Policy/weights reloads by result.", ["result"], registry=r)

    def sync_grader(self, grader: object) -> None:
        """Export the grader's own count of engine prompts (it lives in the pure library, which has no metrics)."""
        count = int(getattr(grader, "engine_requests", 0))
        seen_id, seen = self._engine_prompts_seen
        if seen_id != id(grader):
            seen = 0
        if count > seen:
            self.engine_prompts.inc(count - seen)
        self._engine_prompts_seen = (id(grader), max(count, seen))

    def render(self, include_engine: bool = True) -> bytes:
        """Our series, then vLLM's (it registers them on the global registry when logging stats)."""
        out = generate_latest(self.registry)
        if include_engine:
            engine = generate_latest(GLOBAL_REGISTRY).decode()
            lines = _vllm_families(engine)
            if lines:
                out += lines.encode()
        return out


def _vllm_families(text: str) -> str:
    """Keep only the `vllm:` families of a Prometheus text exposition (with their HELP/TYPE lines)."""
    keep, out = False, []
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            keep = line.split(" ", 3)[2].startswith("vllm:")
        elif line.startswith("#"):
            continue
        if keep:
            out.append(line)
    return "\n".join(out) + ("\n" if out else "")
