"""No import runs upward: every import in rbr_model/, service/ and rbr_client/ against the layer list of
docs/architecture.md, read from the doc itself so the map and the code cannot drift apart."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import rbr_model

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("rbr_model", "service", "rbr_client")


def read_layers(doc: str) -> dict[str, int]:
    """`{module prefix: layer}` from the numbered list under `## Layers`."""
    section = doc.split("\n## Layers\n", 1)[1].split("\n## ", 1)[0]
    layers, current = {}, None
    for line in section.splitlines():
        m = re.match(r"(\d+)\. ", line)
        if m:
            current = int(m.group(1))
        elif not line.startswith("   "):  # an indented line continues the item above it
            current = None
        if current is not None:
            layers |= dict.fromkeys(re.findall(r"`([\w.]+)`", line), current)
    return layers


def layer_of(module: str, layers: dict[str, int]) -> int | None:
    hits = [n for n in layers if module == n or module.startswith(n + ".")]
    return layers[max(hits, key=len)] if hits else None


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import of ours, lazy ones included; `from pkg import mod` names the module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                if is_module(sub):
                    found.append((node.lineno, sub))
                elif node.module == "rbr_model" and alias.name in rbr_model._EXPORTS:
                    found.append((node.lineno, rbr_model._EXPORTS[alias.name]))
                else:
                    found.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: relative import; the layer check reads absolute ones")
    return [(line, name) for line, name in found if name.split(".")[0] in PACKAGES]


def upward_imports(layers: dict[str, int], root: Path = ROOT) -> list[str]:
    problems = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            here = module_name(path, root)
            mine = layer_of(here, layers)
            for line, target in imports_of(path):
                theirs = layer_of(target, layers)
                where = f"{path.relative_to(root)}:{line}: {here} -> {target}"
                if mine is None or theirs is None:
                    problems.append(f"{where} (not in the layer list)")
                elif theirs > mine:
                    problems.append(f"{where} (layer {mine} imports layer {theirs})")
    return list(dict.fromkeys(problems))  # `from m import a, b` is one import


def test_no_import_runs_upward():
    layers = read_layers((ROOT / "docs" / "architecture.md").read_text(encoding="utf-8"))
    assert len(layers) > 20 and max(layers.values()) >= 8
    assert upward_imports(layers) == []


def test_every_module_has_a_layer():
    layers = read_layers((ROOT / "docs" / "architecture.md").read_text(encoding="utf-8"))
    roots = {"rbr_model", "service"}  # the packages' own __init__, outside the layers
    missing = [module_name(p) for package in PACKAGES for p in (ROOT / package).rglob("*.py")
               if module_name(p) not in roots and layer_of(module_name(p), layers) is None]
    assert missing == []


def test_the_check_sees_an_upward_import(tmp_path):
    """The arrow this layout removed (heads' inputs -> the grading prompts) is reported; the fixed one is not."""
    layers = read_layers((ROOT / "docs" / "architecture.md").read_text(encoding="utf-8"))
    heads = tmp_path / "rbr_model" / "heads"
    heads.mkdir(parents=True)
    (heads / "inputs.py").write_text("def f():\n    from rbr_model.grading.prompts import PromptError\n")
    (heads / "model.py").write_text("from rbr_model import errors, Policy\n")
    assert upward_imports(layers, tmp_path) == [
        "rbr_model/heads/inputs.py:2: rbr_model.heads.inputs -> rbr_model.grading.prompts (layer 3 imports layer 4)"]
