"""Session fixtures: every test model is built and exported once per run, and exports
are cached on disk (keyed by the zoo's source and the torch/transformers versions), so a
second run skips the exporters entirely."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

# Triton kernels run on the CPU through Triton's interpreter; it must be chosen before
# triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

CACHE = Path(os.environ.get("ATTN_OPT_CACHE", Path.home() / ".cache" / "attn-opt"))
TESTS = Path(__file__).parent


def _key() -> str:
    import torch
    import transformers

    from attn_opt.tools import zoo

    h = hashlib.sha256()
    for f in (Path(zoo.__file__), TESTS / "variants.py"):
        h.update(f.read_bytes())
    h.update(f"{torch.__version__}|{transformers.__version__}".encode())
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    d = CACHE / _key()
    d.mkdir(parents=True, exist_ok=True)
    return d


def _cached(path: Path, build) -> Path:
    if not path.exists():
        tmp = path.with_suffix(".tmp.onnx")
        build(tmp)
        os.replace(tmp, path)
    return path


@pytest.fixture(scope="session")
def zoo_onnx(cache_dir):
    """zoo_onnx(name, exporter) -> path of the exported model (cached)."""
    from attn_opt.tools import zoo

    def get(name: str, exporter: str) -> Path:
        zm = zoo.MODELS[name]
        if exporter in zm.unsupported:
            pytest.skip(zm.unsupported[exporter])
        return _cached(cache_dir / f"zoo-{name}-{exporter}.onnx", lambda p: zoo.export_onnx(name, exporter, p))

    return get


@pytest.fixture(scope="session")
def variant_onnx(cache_dir):
    """variant_onnx(name, exporter) -> path of the exported hand-written variant (cached)."""
    from attn_opt.tools import zoo
    from variants import BY_NAME

    def get(name: str, exporter: str) -> Path:
        v = BY_NAME[name]
        if exporter in v.skip:
            pytest.skip(v.skip[exporter])
        names = tuple(f"in{i}" for i in range(len(v.inputs())))
        return _cached(cache_dir / f"variant-{name}-{exporter}.onnx",
                       lambda p: zoo.export_module(v.make().eval(), v.inputs(), names, exporter, p, dynamic=False))

    return get
