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
    if p.suffix == ".npz":
        import zipfile

        if not zipfile.is_zipfile(p):
            raise UserError(f"cannot read weights {path}: not a .npz archive (write it with numpy.savez)")
    try:
        if p.suffix == ".npz":
            with np.load(p) as z:
                return {k: z[k] for k in z.files}
        if p.suffix == ".safetensors":
            from safetensors.numpy import load_file

            return load_file(str(p))
    except Exception as e:
        raise UserError(f"cannot read weights {path} ({first_line(e)})") from None
    raise UserError(f"weights must be .npz or .safetensors, not {p.suffix or 'no suffix'}: {path}")
