"""`attn-opt generate`: a decoder step's greedy loop in ONNX Runtime, alone or against
another model on the same path (pipeline/onnx_decode.py)."""

from __future__ import annotations

import numpy as np

from attn_opt.core.errors import UserError


def _prompt(path: str) -> np.ndarray:
    from attn_opt.core.npz import load_npy

    ids = load_npy(path, f"--prompt-ids {path}")  # header checked before the data is read
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.size == 0 or ids.dtype.kind not in "iu":
        raise UserError(f"--prompt-ids {path}: expected integer token ids [B, T] or [T], got {ids.dtype} {ids.shape}")
    return ids.astype(np.int64)


def _step(path: str):
    """(model, its generation loop) of a decoder step, or a one-line error."""
    from attn_opt.core.ir import onnx as onnx_adapter
    from attn_opt.pipeline.onnx_decode import loop_of

    model = onnx_adapter.load(path)
    _, _, gv = onnx_adapter.load_view(model)
    loop = loop_of(gv, onnx_adapter.input_specs(gv))
    if loop is None:
        raise UserError(f"{path} is not a decoder step: no cache input (past) concatenated with new keys/values, "
                        "and no past_*/present_* pair of names")
    # the model as written runs: onnx's inferred shapes can be wrong inside If branches (Optimum's merged
    # decoder: a data-propagated Expand shape in the no-cache branch), and ORT refuses them
    return model, loop


def run(model: str, prompt_path: str, new_tokens: int, other: str | None = None) -> dict:
    from attn_opt.pipeline.onnx_decode import compare, generate

    prompt = _prompt(prompt_path)
    om, loop = _step(model)
    if other is None:
        g = generate(om, loop, prompt, new_tokens)
        cmp = None
    else:
        ob, loop_b = _step(other)
        r = compare(om, ob, loop, prompt, new_tokens, loop_b)
        g, gb = r["a"], r["b"]
        cmp = {"steps": r["steps"], "max_rel_error": r["max_rel_error"], "per_step_error": r["per_step_error"],
               "token_agreement": r["token_agreement"], "cache_bytes": gb.cache_bytes,
               "tokens_per_second": (new_tokens - 1) / gb.seconds if gb.seconds > 0 else 0.0}
    return {"batch": int(prompt.shape[0]), "prompt_tokens": int(prompt.shape[1]), "new_tokens": new_tokens,
            "total_tokens": int(prompt.shape[1] + new_tokens - 1), "tokens": g.tokens.tolist(),
            "prompt_seconds": g.prompt_seconds, "tokens_per_second": (new_tokens - 1) / g.seconds if g.seconds > 0 else 0.0,
            "cache_bytes": g.cache_bytes, "compare": cmp}
