"""The grading-stack builder (rbr_model/stack.py): one reading of `auto` heads, what a stack owns and closes, and
how its engines' health reads for readiness and liveness. Remote engines pointed at closed ports: no vLLM starts.
"""

from __future__ import annotations

import httpx
import pytest
import yaml
from helpers import tiny_policy_dict
from redis_server import free_port

from rbr_model import models
from rbr_model.grading.states import RemoteStateEngine
from rbr_model.heads import Heads, HeadsError, packaged_heads_path
from rbr_model.policy import load_policy
from rbr_model.rm import RemoteRMEngine
from rbr_model.stack import StackSettings, build_stack, choose_heads

POLICY = load_policy(None)


def _dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def test_auto_heads_are_the_packaged_ones_only_where_they_fit(tmp_path):
    assert choose_heads(StackSettings(), POLICY).fingerprint == Heads.load(packaged_heads_path()).fingerprint
    # Auto never fails: another grader, a remote engine or another policy grade by prompt.
    assert choose_heads(StackSettings(grader_model="/models/judge"), POLICY) is None
    assert choose_heads(StackSettings(engine="remote", remote_url="http://judge"), POLICY) is None
    other = tmp_path / "tiny.yaml"
    other.write_text(yaml.safe_dump(tiny_policy_dict()))
    assert choose_heads(StackSettings(), load_policy(other)) is None
    assert choose_heads(StackSettings(heads="none"), POLICY) is None
    # A file must fit: one that does not is an error naming it.
    with pytest.raises(HeadsError, match="absent.npz"):
        choose_heads(StackSettings(heads=str(tmp_path / "absent.npz")), POLICY)


async def test_a_stack_closes_what_it_built_and_remote_engines_are_never_gone():
    if not models.is_prepared():
        pytest.skip("the embedded model is not prepared (run `rbr model prepare`): the grader's tokenizer")
    handed = RemoteRMEngine(_dead_url(), timeout=2.0)
    settings = StackSettings(engine="remote", remote_url=_dead_url(), remote_model="judge", heads="none",
                             grader_model=str(models.default_model_path()))
    stack = await build_stack(settings, POLICY, rm_engine=handed)
    assert stack.owned == [stack.engine] and stack.rm_engine is handed and stack.grader.engine is stack.engine
    # Servers that do not answer: not ready, named; but they may come back, so liveness stays up.
    assert await stack.unhealthy() == ["the grader engine", "the reward model engine"]
    assert await stack.gone() == []
    # Another grader on the same engines: grader-level settings only.
    other = stack.grader_with(grader_layout="conversation_first")
    assert other.engine is stack.engine and other.fingerprint != stack.grader.fingerprint
    with pytest.raises(ValueError, match="remote_url"):
        stack.grader_with(remote_url=_dead_url())
    await stack.close()
    assert not await stack.engine.health()  # closed
    assert not handed._closed and not handed._client.is_closed  # handed in: the caller's to close
    await handed.close()


async def test_a_remote_engine_closes_only_a_client_it_made():
    trunk = models.trunk_path(int(Heads.load(packaged_heads_path()).grader["layer"]))
    if not (trunk / "config.json").is_file():
        pytest.skip("the heads' trunk is not prepared (rbr model prepare)")
    client = httpx.AsyncClient(base_url=_dead_url())
    engine = RemoteStateEngine(str(client.base_url), trunk, client=client)
    await engine.close()
    assert not client.is_closed
    await client.aclose()
    own = RemoteStateEngine(_dead_url(), trunk)
    assert not await own.health() and not await own.gone()
    await own.close()
    assert own._client.is_closed
