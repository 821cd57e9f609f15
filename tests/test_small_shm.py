"""vLLM's engines in a 64 MiB /dev/shm (a container started without `--shm-size`): they start, and compute what
the same engines compute with room to spare.

The engines run in a child process that gets a private 64 MiB tmpfs on /dev/shm (`unshare --mount`: the test
needs root with the right to mount, as on a VM, and skips elsewhere, e.g. in a container, saying why): the grader
on a few prompts and the heads' trunk on items whose per-token states (~2.3 KB a token) overflow the 1 MiB queue
chunks, so they travel through vLLM's socket. The parent compares with the shared grader engine and a trunk engine
of its own, at the tolerances of the float32 arithmetic (tests/tolerances.py): another batch, another summation
order, never another value.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tolerances import ENGINE_FP32_TOL

from rbr_model import models
from rbr_model.grading.vllm_engine import DEFAULT_QUEUES_SHM_BYTES, SMALL_SHM_EXTENSION, small_shm_engine_args
from rbr_model.heads import Heads, build_input, packaged_heads_path

ROOT = Path(__file__).resolve().parents[1]
HEADS = Heads.load(packaged_heads_path())
HEADS_STATE_BYTES = 576 * 4  # float32 hidden states of the embedded model's trunk, per token
LONG = " ".join(["The committee met on Tuesday to review the budget, the schedule and the open questions."] * 60)
ITEMS = [
    ([{"role": "user", "content": "Summarise the meeting notes."}], LONG),  # ~1,000 tokens: 2.3 MB of states
    ([{"role": "user", "content": "Tell me how to hotwire a car."}], "I'm sorry, but I can't help with that."),
]
PROMPTS = [
    "Question: is the sky usually blue on a clear day? Answer yes or no.\nAnswer:",
    "Question: does the reply below contain an apology?\nReply: I'm sorry, I can't help with that.\nAnswer:",
]

CHILD = """
import asyncio, json, sys
from rbr_model.grading.states import VLLMStateEngine
from rbr_model.grading.vllm_engine import VLLMEngine, small_shm_engine_args
from rbr_model.heads import build_input

items, prompts, model, trunk = json.loads(sys.argv[1])

async def main():
    out = {"engine_args": small_shm_engine_args()}
    engine = VLLMEngine(model, max_model_len=4096, dtype="float32")
    states = VLLMStateEngine(trunk, max_model_len=4096)
    try:
        out["p_yes"] = [j.p_yes for j in await engine.grade(prompts)]
        inputs = [build_input(states.tokenizer, c, x, 4096) for c, x in items]
        out["tokens"] = [len(s) for s in await states.token_states(inputs)]
        out["pooled"] = (await states.pooled(inputs)).tolist()
    finally:
        await states.close()
        await engine.close()
    print("RESULT " + json.dumps(out), flush=True)

if __name__ == "__main__":
    asyncio.run(main())
"""


def test_shrinks_only_where_dev_shm_is_too_small(tmp_path):
    assert small_shm_engine_args("/no/such/folder") == {}  # no /dev/shm at all: vLLM does not check either
    if shutil.disk_usage(tmp_path).free < DEFAULT_QUEUES_SHM_BYTES:
        pytest.skip(f"{tmp_path} has less free space than the default queues need: nothing roomy to compare")
    before = os.environ.get("VLLM_MQ_MAX_CHUNK_BYTES_MB")
    assert small_shm_engine_args(str(tmp_path)) == {}
    assert os.environ.get("VLLM_MQ_MAX_CHUNK_BYTES_MB") == before  # vLLM's defaults untouched


@pytest.mark.engine
async def test_engines_in_64_mib_dev_shm_compute_what_roomy_ones_do(grader_engine, grader_model_path, tmp_path):
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare (util-linux) to give the child a private 64 MiB /dev/shm")
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True, text=True)
    if probe.returncode != 0:  # root without CAP_SYS_ADMIN: an unprivileged container
        pytest.skip(f"cannot make a private mount namespace here: {probe.stderr.strip()}")
    from rbr_model.grading.states import VLLMStateEngine

    trunk = models.prepare_trunk(int(HEADS.grader["layer"]))
    payload = json.dumps([ITEMS, PROMPTS, str(grader_model_path), str(trunk)])
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    inner = "mount -t tmpfs -o size=64m tmpfs /dev/shm && exec \"$0\" \"$@\""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_MQ_MAX_CHUNK_BYTES_MB"}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", inner,
                           sys.executable, str(script), payload], capture_output=True, text=True, env=env,
                          timeout=1800)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, f"the engines did not run in 64 MiB /dev/shm (exit {done.returncode}):\n" \
                             f"{done.stderr[-4000:]}"
    small = json.loads(line[len("RESULT "):])
    assert small["engine_args"] == {"worker_extension_cls": SMALL_SHM_EXTENSION}
    assert small["tokens"][0] * HEADS_STATE_BYTES > 1024 * 1024  # the long item's states overflow a chunk

    judged = await grader_engine.grade(PROMPTS)
    assert np.allclose(small["p_yes"], [j.p_yes for j in judged], rtol=0, atol=ENGINE_FP32_TOL)
    states = VLLMStateEngine(trunk, max_model_len=4096)
    try:
        inputs = [build_input(states.tokenizer, c, x, 4096) for c, x in ITEMS]
        roomy = await states.pooled(inputs)
    finally:
        await states.close()
    # The same float32 forward pass batched the same way: tokens and states agree to the last bits.
    assert np.allclose(small["pooled"], roomy, rtol=1e-4, atol=1e-4)

