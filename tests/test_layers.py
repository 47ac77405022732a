"""The import rule of ARCHITECTURE.md, read from the source: backends and patterns never
import passes; the engine imports passes only in the pipeline (to parse and check a chain)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imports(path: Path) -> set[str]:
    """Every attn_opt module a file imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("attn_opt"):
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("attn_opt")}
    return out


def files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("folder", ["backends", "patterns"])
def test_backends_and_patterns_never_import_passes(folder):
    bad = {str(f.relative_to(ROOT)): sorted(m for m in imports(f) if m.startswith("attn_opt.passes"))
           for f in files(folder)}
    assert not {k: v for k, v in bad.items() if v}
    assert files(folder)  # the rule was checked on something


def test_patterns_import_only_patterns_and_the_engine():
    allowed = ("attn_opt.patterns", "attn_opt.rewriter")
    bad = {str(f.relative_to(ROOT)): sorted(m for m in imports(f) if not m.startswith(allowed))
           for f in files("patterns")}
    assert not {k: v for k, v in bad.items() if v}


def test_the_engine_reaches_passes_only_through_the_pipeline():
    users = sorted(str(f.relative_to(ROOT)) for f in files("rewriter")
                   if any(m.startswith("attn_opt.passes") or m == "attn_opt.passes" for m in imports(f))
                   or "from attn_opt import passes" in f.read_text())
    assert users == ["rewriter/pipeline.py"]


def test_backends_import_only_patterns_the_engine_and_themselves():
    allowed = ("attn_opt.patterns", "attn_opt.rewriter", "attn_opt.backends")
    bad = {str(f.relative_to(ROOT)): sorted(m for m in imports(f) if not m.startswith(allowed))
           for f in files("backends")}
    assert not {k: v for k, v in bad.items() if v}
