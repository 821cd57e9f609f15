"""The client package stands alone: it imports nothing heavy, its wheel needs only httpx, and it installs into a
clean virtual environment without vLLM, FastAPI, numpy or matplotlib."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("vllm", "torch", "fastapi", "starlette", "numpy", "matplotlib", "pydantic", "redis", "rbr_model", "service")
CHECK = ("import sys, rbr_client, rbr_client.trl, rbr_client.verl; "
         f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")


def test_client_imports_nothing_heavy():
    out = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.fixture(scope="module")
def client_wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    source = shutil.copytree(ROOT / "rbr_client", out / "src", ignore=shutil.ignore_patterns("__pycache__", "build",
                                                                                             "*.egg-info"))
    # Built from a copy: an in-tree build leaves build/ and *.egg-info inside the package folder.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(source)], check=True, capture_output=True, text=True)
    (wheel,) = out.glob("rbr_client-*.whl")
    return wheel


def test_client_wheel_holds_the_package_and_needs_only_httpx(client_wheel):
    with zipfile.ZipFile(client_wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"rbr_client"}
    assert {f"rbr_client/{m}.py" for m in ("__init__", "_wire", "client", "trl", "verl")} <= set(names)
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert requires == ["httpx>=0.27"]


def test_client_installs_alone_in_a_clean_venv(client_wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    pip = subprocess.run([str(python), "-m", "pip", "install", "-q", str(client_wheel)], capture_output=True, text=True)
    if pip.returncode != 0 and ("No matching distribution" in pip.stderr or "NewConnectionError" in pip.stderr):
        pytest.skip(f"no package index reachable for httpx: {pip.stderr.strip()[-300:]}")
    assert pip.returncode == 0, pip.stderr
    out = subprocess.run([str(python), "-c", CHECK], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                            check=True).stdout.lower()
    assert not [p for p in ("vllm", "fastapi", "numpy", "matplotlib", "torch") if f"\n{p}==" in f"\n{listed}"]
