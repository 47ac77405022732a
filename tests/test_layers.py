"""The import rule of ARCHITECTURE.md, read from the source: the layers are totally
ordered, core ← patterns ← {passes, backends} ← pipeline ← front, and a module imports
only from its own layer or the ones below it — imports inside functions included; passes
and backends never import each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "attn_opt"

# layer rank; passes and backends share a rank but may not import each other
LAYERS = {"core": 0, "patterns": 1, "passes": 2, "backends": 2, "pipeline": 3, "front": 4}


def layer_of(module: str) -> str:
    """attn_opt.<layer>.… -> its layer; the package's own modules and tools/ are the front."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "front"


def module_of(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports(source: str) -> set[str]:
    """Every attn_opt module a source file imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("attn_opt"):
            if node.module == "attn_opt":  # `from attn_opt import passes`
                out |= {f"attn_opt.{a.name}" for a in node.names}
            else:
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("attn_opt")}
    return out


FILES = sorted(PKG.rglob("*.py"))


def test_every_layer_has_modules():
    assert {layer_of(module_of(f)) for f in FILES} == set(LAYERS)


def upward(here: str, source: str) -> list[str]:
    """The imports of `source` (a module of layer `here`) that break the order."""
    bad = []
    for m in sorted(imports(source)):
        there = layer_of(m)
        if LAYERS[there] > LAYERS[here] or {here, there} == {"passes", "backends"}:
            bad.append(f"{m} ({there})")
    return bad


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_go_down_the_layers(path):
    here = layer_of(module_of(path))
    assert not upward(here, path.read_text()), f"{here} may not import these"


def test_the_rule_can_fail():
    """The checker sees an upward import inside a function, and passes ↔ backends."""
    assert upward("core", "def f():\n    from attn_opt.pipeline.run import run_passes\n")
    assert upward("backends", "from attn_opt import passes\n")
    assert not upward("pipeline", "import attn_opt.core.graph\nfrom attn_opt.passes import parse\n")
