"""A TEST-ONLY reward model: the embedded grader model's weights with a random, seeded one-label score head.

It lets the real reward-model code path (vLLM's pooling runner, the `/classify` endpoint) run offline; its scores
mean nothing. It lives with the tests, not in the library, so nobody serves it by mistake.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

TEST_CLASSIFIER_MARKER = ".rbr-test-classifier.json"
TEST_CLASSIFIER_RECIPE = "1"
TEST_CLASSIFIER_README = """\
# TEST ONLY: random score head, not a reward model

This folder holds a `LlamaForSequenceClassification` built by tests/rm_classifier.py for tests.
Its transformer weights are the embedded grader model's ({base}); its one-label `score` head is random
(normal, std {std}, seed {seed}). Its outputs carry no information about how good a reply is.

It exists so the real reward-model code path (vLLM's pooling runner, the `/classify` endpoint) can run offline.
Do not use it to train or evaluate anything.
"""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def build_test_classifier(
    out_dir: str | os.PathLike[str], base_model_dir: str | os.PathLike[str] | None = None, seed: int = 0
) -> Path:
    """Build (once) a TEST-ONLY one-label classifier from the embedded model with a random, seeded score head.

    Idempotent: a marker written last records the base and the seed; a folder with a matching marker is
    returned as it is. The folder is built beside `out_dir` and renamed into place, so an interrupted build never
    leaves something that looks finished.
    """
    from rbr_model import models

    out = Path(out_dir).resolve()
    # `prepare` is a no-op when the embedded model is already converted.
    base = models.prepare() if base_model_dir is None else Path(base_model_dir).resolve()
    want = {"recipe": TEST_CLASSIFIER_RECIPE, "base": str(base), "seed": seed}
    marker = _read_json(out / TEST_CLASSIFIER_MARKER)
    if marker and all(marker.get(k) == v for k, v in want.items()):
        return out

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig.from_pretrained(base)
    config.num_labels = 1
    config.id2label, config.label2id = {0: "reward"}, {"reward": 0}
    config.architectures = ["LlamaForSequenceClassification"]
    dtype = getattr(torch, str(getattr(config, "dtype", None) or "float32").replace("torch.", ""))
    # Backbone weights come from the base checkpoint; `score.weight` is not in it and is set below.
    model = LlamaForSequenceClassification.from_pretrained(base, config=config, dtype=dtype)
    std = float(getattr(config, "initializer_range", 0.02))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head = torch.randn(model.score.weight.shape, generator=gen, dtype=torch.float32) * std
        model.score.weight.copy_(head.to(model.score.weight.dtype))
    tokenizer = AutoTokenizer.from_pretrained(base)

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(work, safe_serialization=True)
        tokenizer.save_pretrained(work)
        (work / "README.md").write_text(TEST_CLASSIFIER_README.format(base=base, std=std, seed=seed), "utf-8")
        info = dict(want, dtype=str(dtype).replace("torch.", ""), head_std=std,
                    created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), note="TEST ONLY: random score head")
        (work / TEST_CLASSIFIER_MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        work.chmod(0o755)
        if out.exists():
            done = _read_json(out / TEST_CLASSIFIER_MARKER)
            if done and all(done.get(k) == v for k, v in want.items()):  # built by someone else meanwhile
                return out
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        try:
            os.replace(work, out)
        except OSError:
            # Lost a race to a concurrent builder: keep theirs if it is the same build.
            done = _read_json(out / TEST_CLASSIFIER_MARKER)
            if not (done and all(done.get(k) == v for k, v in want.items())):
                raise
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return out
