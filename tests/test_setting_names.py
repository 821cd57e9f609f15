"""Every `RBR_*` variable the documentation or a command's text tells users to set is one something reads.

A name is real when it is a field of the service's settings (`RBR_<FIELD>`), or when code, a script or a deploy
file reads it: `${NAME`/`$NAME` in shell and compose files, `os.environ`/`getenv`/typer's `envvar=` in Python.
A documented name that nothing reads is a setting users set in vain (`RBR_HEADS_PATH` was one).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAME = re.compile(r"\bRBR_[A-Z][A-Z0-9_]*[A-Z0-9]\b")
DOCS = [ROOT / "README.md", ROOT / "docker" / "README.md", ROOT / "k8s" / "README.md",
        *sorted((ROOT / "docs").glob("**/*.md"))]
# What commands print: help texts and messages of the `rbr` commands and the service's command line.
COMMAND_TEXT = [*sorted((ROOT / "rbr_model" / "cli").glob("*.py")), ROOT / "service" / "cli.py"]
READERS_SHELL = [*sorted((ROOT / "scripts").glob("*.sh")), *sorted((ROOT / "benchmarks").glob("*.sh")),
                 *sorted((ROOT / "docker").glob("*.sh")), ROOT / "docker-compose.yml",
                 *sorted((ROOT / "docker").glob("Dockerfile.*")),
                 *[p for p in sorted((ROOT / "k8s").glob("**/*.yaml"))]]
PY_READ = re.compile(r"(?:environ(?:\.get|\.setdefault|\.pop)?\(?\[?|getenv\(|envvar=)\s*[\"'](RBR_[A-Z0-9_]+)")
READERS_PY = [p for d in ("rbr_model", "service", "rbr_client", "benchmarks", "examples", "scripts", "tests")
              for p in sorted((ROOT / d).glob("**/*.py")) if p.name != Path(__file__).name]


def setting_names() -> set[str]:
    from service.settings import Settings

    return {f"RBR_{name.upper()}" for name in Settings.model_fields}


def names_read() -> set[str]:
    found: set[str] = set()
    for path in READERS_SHELL:
        text = path.read_text(errors="replace")
        found |= set(re.findall(r"\$\{?(RBR_[A-Z0-9_]+)", text))
        # Kubernetes manifests and Dockerfiles set variables for the service by name (`name: RBR_X`, `ENV RBR_X=`):
        # those are settings, so they count only through setting_names(), not here.
    for path in READERS_PY:
        text = path.read_text(errors="replace")
        found |= set(PY_READ.findall(text))
    return found


def mentioned() -> dict[str, list[str]]:
    where: dict[str, list[str]] = {}
    for path in DOCS + COMMAND_TEXT:
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for name in NAME.findall(line):
                where.setdefault(name, []).append(f"{path.relative_to(ROOT)}:{n}")
    return where


def test_the_scan_sees_settings_and_readers():
    """The scan itself works: known settings and known script variables are found (guards against an empty scan
    making the real test pass vacuously)."""
    assert {"RBR_ENGINE", "RBR_HEADS", "RBR_REDIS_URL"} <= setting_names()
    assert {"RBR_SETUP_DEVICE", "RBR_VENV", "RBR_MODELS_DIR"} <= names_read()
    assert len(mentioned()) >= 20


def test_every_documented_rbr_variable_is_read_by_something():
    known = setting_names() | names_read()
    unknown = {name: places for name, places in mentioned().items() if name not in known}
    if unknown:
        pytest.fail("RBR_* names in the docs or command texts that no setting, script or code reads:\n"
                    + "\n".join(f"  {name}: {', '.join(places[:4])}" for name, places in sorted(unknown.items())))
