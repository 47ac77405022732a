"""Reading trained weights for passes (gates, sink logits): .npz or .safetensors."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from attn_opt.core.errors import UserError, first_line


@functools.lru_cache(maxsize=8)
def load_weights(path: str) -> dict[str, np.ndarray]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"no such weights file: {path}")
    if p.suffix == ".npz":  # headers checked before any data is read (core/npz.py)
        from attn_opt.core import npz

        return npz.load(str(p), f"weights {path}")
    try:
        if p.suffix == ".safetensors":  # the library bounds every tensor by the file; the file by the limit
            from attn_opt.core import limits

            limits.refuse_past(f"weights {path}", 2 * p.stat().st_size, "give a smaller file")
            from safetensors.numpy import load_file

            return load_file(str(p))
    except Exception as e:
        raise UserError(f"cannot read weights {path} ({first_line(e)})") from None
    raise UserError(f"weights must be .npz or .safetensors, not {p.suffix or 'no suffix'}: {path}")
