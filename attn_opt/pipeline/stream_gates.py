"""DuoAttention's gate fitting (Xiao et al. 2024) for stream:...,full_heads=auto with
--calibrate: which KV groups keep the full cache, chosen by what the model's outputs need
rather than by how much attention a window drops.

Each site's output becomes a per-group mix α_g · dense + (1 − α_g) · streaming
(backends/onnx/duo.py, α as graph inputs), and α is fitted on the calibration inputs so
the model's outputs match the untouched model's, with an L1 pull towards streaming:

    min_α  E(α) / E(0)  +  λ · mean(α),   0 ≤ α ≤ 1,   E(α) = Σ_o ‖y_o(α) − y_o(1)‖² / ‖y_o(1)‖²

(y_o: each output that is not a returned cache; E(0): every group streaming). The error is
taken relative to E(0), so λ is scale-free: near α's optimum a group's error grows as
(1 − α)², and its gate ends above 0.5 where it accounts for more than λ / G of E(0) (G
groups): λ = 1 keeps the groups with more than an average share. ONNX Runtime has no gradients, so the
fit is Gauss-Newton on finite differences: per iteration one run per group for the
Jacobian, then the bounded quadratic model minimised by projected gradient inside a
trust region, the step kept only where the true loss fell. A group keeps the full cache
where its α ends above the pass's threshold.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

STEP = 0.25  # finite-difference step in α
ITERATIONS = 5


@dataclass
class GateFit:
    gates: dict[str, np.ndarray]  # site id -> α per KV group
    loss: list[float] = field(default_factory=list)  # output error + λ·mean(α), per accepted iteration
    error_all_dense: float = 0.0  # the output error term at α = 1 (0 up to rounding)
    error_all_stream: float = 0.0  # at α = 0 (every group streams)
    runs: int = 0
    seconds: float = 0.0

    def describe(self, above: float) -> str:
        g = np.concatenate(list(self.gates.values()))
        return (f"DuoAttention gates fitted on the calibration inputs ({self.runs} runs, {self.seconds:.1f} s): "
                f"{int((g > above).sum())} of {g.size} KV groups above {above:g}; relative output error "
                f"{self.error_all_stream:.3g} with every group streaming; loss (error / that + L1) "
                f"{self.loss[0]:.3g} -> {self.loss[-1]:.3g}")


def fit_gates(om, site_ids: list[str], feeds: dict, sinks: int, window: int, l1: float) -> GateFit:
    """Gates for the sites `site_ids` of the ONNX model `om` (not edited) on `feeds`."""
    from attn_opt.backends.onnx.duo import emit_gate_mix
    from attn_opt.backends.onnx.edit import sweep
    from attn_opt.core.ir import onnx as onnx_adapter
    from attn_opt.patterns.detect import detect

    t0 = time.perf_counter()
    mixed = onnx_adapter.with_shapes(om)  # a copy: the weights are shared
    sites = [s for s in detect(onnx_adapter.view(mixed), feeds=feeds).sites if s.id in site_ids]
    caches = {n for s in sites if s.cache is not None for n in (s.cache.present_key, s.cache.present_value)}
    names = [emit_gate_mix(mixed.ir, s, sinks, window) for s in sites]
    sizes = [s.kv_heads for s in sites]
    sweep(mixed.ir)
    sess = mixed.session()
    outputs = [o.name for o in sess.get_outputs() if o.name not in caches]
    wanted = {i.name for i in sess.get_inputs()}
    base = {k: v for k, v in feeds.items() if k in wanted}
    fit = GateFit({})

    def run(alpha: np.ndarray) -> list[np.ndarray]:
        fit.runs += 1
        parts = np.split(alpha.astype(np.float32), np.cumsum(sizes)[:-1])
        return sess.run(outputs, base | dict(zip(names, parts)))

    ref = [np.asarray(y, np.float64) for y in run(np.ones(sum(sizes)))]
    scale = [max(float(np.sqrt((y ** 2).sum())), 1e-30) for y in ref]

    def residual(alpha):
        return np.concatenate([((np.asarray(y, np.float64) - r) / s).ravel() for y, r, s in zip(run(alpha), ref, scale)])

    n = sum(sizes)
    fit.error_all_stream = float((r0 := residual(np.zeros(n))) @ r0)
    alpha = np.ones(n)
    r = residual(alpha)
    fit.error_all_dense = float(r @ r)
    if fit.error_all_stream <= 1e-12:  # the window drops nothing here: every group streams, exactly
        fit.gates = dict(zip((s.id for s in sites), np.split(np.zeros(n), np.cumsum(sizes)[:-1])))
        fit.loss, fit.seconds = [0.0], time.perf_counter() - t0
        return fit
    norm = np.sqrt(fit.error_all_stream)

    def loss(alpha, r):
        return float(r @ r) / fit.error_all_stream + l1 * float(alpha.mean())

    fit.loss.append(loss(alpha, r))
    trust = 1.0
    for _ in range(ITERATIONS):
        jac = np.empty((r.size, n))
        for g in range(n):
            h = -STEP if alpha[g] >= STEP else STEP  # inside [0, 1]
            a = alpha.copy()
            a[g] += h
            jac[:, g] = (residual(a) - r) / h
        step = _bounded_step(jac / norm, r / norm, alpha, l1 / n, trust)
        cand = np.clip(alpha + step, 0, 1)
        rc = residual(cand)
        if loss(cand, rc) < fit.loss[-1]:
            alpha, r = cand, rc
            fit.loss.append(loss(alpha, r))
            trust = min(1.0, trust * 2)
        else:
            trust /= 4
        if trust < 1e-3:
            break
    fit.gates = dict(zip((s.id for s in sites), np.split(alpha, np.cumsum(sizes)[:-1])))
    fit.seconds = time.perf_counter() - t0
    return fit


def _bounded_step(jac: np.ndarray, r: np.ndarray, alpha: np.ndarray, c: float, trust: float) -> np.ndarray:
    """argmin_d ‖r + J d‖² + c · Σ d over the box 0 ≤ α + d ≤ 1, |d| ≤ trust
    (projected gradient on the quadratic: a few groups, so a dense Hessian)."""
    hess = 2 * jac.T @ jac
    grad0 = 2 * jac.T @ r + c
    lo, hi = np.maximum(-alpha, -trust), np.minimum(1 - alpha, trust)
    lr = 1.0 / max(float(np.linalg.eigvalsh(hess)[-1]), 1e-12)
    d = np.zeros_like(alpha)
    for _ in range(2000):
        d_new = np.clip(d - lr * (grad0 + hess @ d), lo, hi)
        if np.max(np.abs(d_new - d)) < 1e-9:
            return d_new
        d = d_new
    return d
