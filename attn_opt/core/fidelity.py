"""How far a rewrite moved the model: error metrics on outputs of the same inputs.

max_rel_error is max|a - b| / max|a| per output (relative to the output's scale, so a
value near zero does not blow it up); cosine is over the flattened output; for outputs
that are logits, KL(softmax(a) || softmax(b)) averaged over positions and the share of
positions whose arg-max agrees. `pair_ranking` is the order a model puts its inputs in:
the Spearman correlation of the pairwise cosine similarities of the batch's rows (each
row's output averaged over its positions), what retrieval and clustering read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class Fidelity:
    max_abs_error: float
    max_rel_error: float
    cosine: float
    kl: float | None = None
    top1_agreement: float | None = None
    nonfinite: int = 0  # NaN/inf in the rewritten output where the original had none

    def to_json(self) -> dict:
        return asdict(self)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(ref: np.ndarray, out: np.ndarray, logits: bool = False) -> Fidelity:
    ref = np.asarray(ref, dtype=np.float64)
    out = np.asarray(out, dtype=np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"output shape changed: {ref.shape} -> {out.shape}")
    nonfinite = int(np.sum(~np.isfinite(out) & np.isfinite(ref)))
    ok = np.isfinite(ref) & np.isfinite(out)
    diff = np.where(ok, np.abs(ref - out), 0.0)
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(np.where(ok, ref, 0)).max()) if diff.size else 0.0
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    a, b = np.where(ok, ref, 0).ravel(), np.where(ok, out, 0).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    cos = float(a @ b / (na * nb)) if na > 0 and nb > 0 else float(na == nb)
    if nonfinite:
        rel, cos = float("inf"), float("nan")
    kl = top1 = None
    if logits and ref.ndim >= 1 and ref.shape[-1] > 1:
        lp, lq = _log_softmax(ref), _log_softmax(out)
        kl = float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))
        top1 = float(np.mean(ref.argmax(-1) == out.argmax(-1)))
    return Fidelity(max_abs, rel, cos, kl, top1, nonfinite)


def worst(per_output: dict[str, Fidelity]) -> Fidelity:
    """One figure for the model: the worst of each metric over its outputs."""
    fs = list(per_output.values())
    kls = [f.kl for f in fs if f.kl is not None]
    tops = [f.top1_agreement for f in fs if f.top1_agreement is not None]
    return Fidelity(max(f.max_abs_error for f in fs), max(f.max_rel_error for f in fs),
                    min(f.cosine for f in fs), max(kls) if kls else None, min(tops) if tops else None,
                    sum(f.nonfinite for f in fs))


def _ranks(x: np.ndarray) -> np.ndarray:
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r


def pair_ranking(ref: np.ndarray, out: np.ndarray, weights: np.ndarray | None = None) -> float | None:
    """Spearman correlation of the pairwise cosine similarities of the batch rows (axis 0;
    each row averaged over its middle axes, weighted by `weights` [B, T] where given: a
    padding mask), rewritten vs original; None for fewer than 3 rows or a constant
    similarity."""
    ref, out = (np.asarray(x, np.float64) for x in (ref, out))
    if ref.ndim < 2 or len(ref) < 3 or ref.shape != out.shape:
        return None
    w = None
    if weights is not None and ref.ndim == 3 and np.shape(weights) == ref.shape[:2]:
        w = np.asarray(weights, np.float64)[..., None]
    sims = []
    for x in (ref, out):
        if w is not None:
            e = (x * w).sum(1) / np.maximum(w.sum(1), 1e-30)
        else:
            e = x.reshape(len(x), -1, x.shape[-1]).mean(1)
        e = e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-30)
        sims.append((e @ e.T)[np.triu_indices(len(e), 1)])
    a, b = (_ranks(s) for s in sims)
    if a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])
