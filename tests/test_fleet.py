"""Two real `rbr serve` replicas (RBR_ENGINE=remote, no heads) on one real vLLM server and one real Redis: the cache
is shared across replicas, and a client given both URLs answers every request, with the same rewards, while one
replica is killed (issue #22, items 2 and 3)."""

from __future__ import annotations

import json
import logging
import re
import subprocess

import pytest
from fleet_procs import ServeReplica, metric_value
from helpers import SERVED_NAME, VLLMServer, unique
from redis_server import RedisServer
from tolerances import ENGINE_FP32_TOL

from rbr_client import RewardClient

PROMPT = [{"role": "user", "content": "Could you suggest a name for my new sourdough starter?"}]


class Fleet:
    def __init__(self, redis: RedisServer, vllm: VLLMServer, replicas: list[ServeReplica]):
        self.redis, self.vllm, self.replicas = redis, vllm, replicas

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    def flush_cache(self) -> None:
        subprocess.run(["redis-cli", "-p", str(self.redis.port), "FLUSHALL"], check=True, capture_output=True)


@pytest.fixture(scope="module")
def fleet(grader_model_path, tmp_path_factory):
    work = tmp_path_factory.mktemp("fleet")
    redis = RedisServer().start()
    vllm = VLLMServer(grader_model_path, work / "vllm.log")
    replicas: list[ServeReplica] = []
    try:
        vllm.wait_ready(900)
        # RBR_REMOTE_TIMEOUT_S: on a loaded CPU (the suite beside CPU hogs) one 32-prompt batch outlived the 60 s
        # default, and the 503 it caused moved requests for the wrong reason.
        env = {"RBR_ENGINE": "remote", "RBR_REMOTE_TIMEOUT_S": "900", "RBR_REMOTE_URL": vllm.url,
               "RBR_REMOTE_MODEL": SERVED_NAME,
               "RBR_GRADER_MODEL": str(grader_model_path), "RBR_HEADS": "none", "RBR_REDIS_URL": redis.url,
               "RBR_LOG_LEVEL": "warning"}
        replicas = [ServeReplica(env, work / f"rbr-serve-{i}.log") for i in range(2)]
        for r in replicas:
            r.wait_ready()
        yield Fleet(redis, vllm, replicas)
    finally:
        for r in replicas:
            r.stop()
        vllm.stop()
        redis.stop()


def items(n: int, tag: str) -> list[dict]:
    return [{"prompt": PROMPT, "completion": unique(f"{tag} {i}: how about Clint Yeastwood?"),
             "response_type": "comply", "rm_score": 0.0} for i in range(n)]


def reward_tol(features: dict[str, float], response_type: str = "comply") -> float:
    """How far two float32 gradings of the same item may put its reward: each P(yes) moves by ENGINE_FP32_TOL, a
    class probability (a product over the propositions) by at most the sum of theirs, and the reward is their
    weighted sum."""
    from rbr_model.reward import Weights, default_weights_path

    weights = Weights.load(default_weights_path()).weights[response_type]
    n_props = sum(1 for k in features if not k.startswith("class:"))
    return ENGINE_FP32_TOL * n_props * sum(abs(w) for w in weights.values())


def test_a_completion_graded_by_one_replica_is_a_cache_hit_on_the_other(fleet):
    a, b = fleet.replicas
    batch = items(3, "shared-cache")
    hits_b = metric_value(b.url, "rbr_cache_requests_total", result="hit")
    prompts_b = metric_value(b.url, "rbr_engine_prompts_total")
    with RewardClient(a.url, max_retries=0) as ca, RewardClient(b.url, max_retries=0) as cb:
        first = ca.rewards(batch, return_features=True)
        second = cb.rewards(batch, return_features=True)
    assert [r.cached for r in first] == [False] * 3  # graded by a ...
    assert [r.cached for r in second] == [True] * 3  # ... and read back by b from the shared Redis
    assert [r.reward for r in second] == [r.reward for r in first]  # the very numbers a stored
    assert [r.features for r in second] == [r.features for r in first]
    assert metric_value(b.url, "rbr_cache_requests_total", result="hit") - hits_b == 3
    assert metric_value(b.url, "rbr_engine_prompts_total") == prompts_b  # b sent nothing to the grader


def test_client_with_both_urls_answers_every_request_while_a_replica_is_killed(fleet, caplog):
    a, b = fleet.replicas
    batch = items(12, "failover")
    with RewardClient(fleet.urls, max_retries=4, backoff_base=0.05, chunk_size=1) as rc:
        reference = rc.rewards(batch, return_features=True)  # both replicas up, six items each
    fleet.flush_cache()  # the run below grades again rather than reading what the reference stored

    answered = []
    try:
        with caplog.at_level(logging.WARNING, logger="rbr.client"), \
                RewardClient(fleet.urls, max_retries=4, backoff_base=0.05, chunk_size=1) as rc:
            for i, item in enumerate(batch):
                if i == 3:
                    b.kill()  # SIGKILL, as a crash: b's port now refuses connections
                answered += rc.rewards([item], return_features=True)
        moved = [m.group(1) for r in caplog.records if (m := re.search(r"on (http://\S+)$", r.getMessage()))]
        assert moved and set(moved) == {a.url}, [r.getMessage() for r in caplog.records]
        assert len(answered) == len(batch)
        assert not any(r.cached for r in answered)  # graded again, not read from the cache
        for got, ref in zip(answered, reference, strict=True):
            assert got.reward == pytest.approx(ref.reward, abs=reward_tol(ref.features)), json.dumps(
                {"got": got.features, "ref": ref.features})
    finally:
        b.start()  # the module's fleet keeps two replicas for any test after this one
        b.wait_ready()
