"""Calibration: fit each rewritten site's per-head affine (gain · N(temperature · S +
offset), patterns/form.py) so its output matches what the original site computes, on
calibration inputs, layer by layer in model order.

A pass run with calibration lowers every form with that affine as initializers set to
the identity (temperature 1, offset 0, gain 1); calibration only changes their values,
never the graph. For layer l the site's scores S and values V are probed in the model
whose layers before l are already calibrated, the target is the original normaliser and
visibility on those same S and V (the site as it was before the pass), and the three
vectors are fitted with Adam in torch (CPU, a few hundred steps). After the last layer
each site is checked on the held-out inputs (the pipeline's fidelity inputs): where its
error there is worse than uncalibrated, the site goes back to the identity, and the
report says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from attn_opt.rewriter.errors import UserError

PARAMS = (("temperature", 1.0), ("offset", 0.0), ("gain", 1.0))
STEPS, LR = 300, 0.05
FIT_ROWS = 4096  # query rows (of every head) a fit uses at most: seconds per layer on MiniLM-sized inputs


@dataclass
class SiteFit:
    site: str
    layer: int | None
    error_before: float  # ||out − original|| / ||original|| of the site's output, on the calibration rows fitted
    error_after: float
    heldout_before: float | None = None
    heldout_after: float | None = None
    reverted: bool = False
    seconds: float = 0.0
    values: dict = field(default_factory=dict)  # name -> per-head values written

    def to_json(self) -> dict:
        return dict(self.__dict__)


def relative_error(a, b) -> float:
    """Relative error ||a − b|| / ||b|| over the whole output (the site's error figure)."""
    scale = float(np.linalg.norm(b))
    return float(np.linalg.norm(a - b) / scale) if scale > 0 else float(np.linalg.norm(a - b))


def site_tensors(new_site, old_site, probed: dict):
    """(S, visible for the new form, V, target output) of one site in float64: S and V from
    the rewritten site's record, the target from the site as it was before the pass."""
    from attn_opt.patterns import reference

    s, vis = reference.scores(new_site, probed)
    tq, tk = s.shape[-2:]

    def kept(pattern):
        if pattern is None:
            return vis
        return vis & pattern.visible(tk)[tk - tq:]

    v = reference.operand(new_site.v, probed).astype(np.float64)
    v = np.repeat(v, s.shape[1] // v.shape[1], axis=1)
    target = reference.normalise(old_site.normaliser, s, kept(old_site.pattern)) @ v
    return s, kept(new_site.pattern), v, target


def fit(s, vis, v, target, normaliser, steps: int = STEPS) -> tuple[dict, float, float]:
    """Per-head temperature, offset and gain minimising the squared error of
    gain · N(temperature · S + offset) V against `target`; (values, error before, after)."""
    import torch

    from attn_opt.backends.torch.forms import normalise

    h = s.shape[1]
    base = normaliser.without_affine()
    b, tq = s.shape[0], s.shape[2]
    keep = max(1, FIT_ROWS // (h * tq))  # whole sequences, evenly spread, up to FIT_ROWS rows per head group
    pick = np.linspace(0, b - 1, min(b, keep)).round().astype(int)
    s, vis, v, target = (np.asarray(x)[pick] for x in (s, vis, v, target))
    s = np.where(vis, s, 0.0)  # hidden scores do not count, and must not send exp() to inf in the gradient
    S, V, T = (torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) for x in (s, v, target))
    Vis = torch.from_numpy(np.ascontiguousarray(vis))
    params = {name: torch.full((h,), default, dtype=torch.float32, requires_grad=True) for name, default in PARAMS}

    def out():
        p = {k: t.reshape(1, h, 1, 1) for k, t in params.items()}
        w = normalise(base, S * p["temperature"] + p["offset"], Vis,
                      lambda vals: torch.as_tensor(vals, dtype=S.dtype).reshape(1, h, 1, 1), h)
        return (w * p["gain"]) @ V

    with torch.no_grad():
        before = relative_error(out().numpy(), target)  # on the rows fitted
    opt = torch.optim.Adam(params.values(), lr=LR)
    scale = T.abs().max().clamp(min=1e-12)
    for _ in range(steps):
        opt.zero_grad()
        loss = (((out() - T) / scale) ** 2).mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = relative_error(out().numpy(), target)
    return {k: t.detach().numpy().copy() for k, t in params.items()}, before, after


def calibrate(om, old_sites: dict, rewritten: list[str], calib: dict, heldout: dict | None, progress=None) -> list[SiteFit]:
    """Fit and write the affine of every rewritten site of the ONNX model `om` (edited in
    place), layer by layer; `old_sites`: id -> the site before the pass."""
    import onnx_ir as ir

    from attn_opt.rewriter.ir import onnx as onnx_adapter

    shaped = onnx_adapter.with_shapes(om)  # the copy the view probes; the values go back to `om` at the end
    inits = shaped.ir.graph.initializers
    names = {f"attn_opt.{i}.{p}" for i in rewritten for p, _ in PARAMS}
    if names - set(inits):
        raise UserError(f"calibration: {', '.join(sorted(names - set(inits)))} missing after the pass")

    def write(site_id: str, values: dict) -> None:
        for name, _ in PARAMS:
            key = f"attn_opt.{site_id}.{name}"
            inits[key].const_value = ir.tensor(np.asarray(values[name], np.float32), name=key)

    fits = fit_sites(onnx_adapter.view(shaped), old_sites, rewritten, calib, heldout, write, progress)
    for key in names:
        om.ir.graph.initializers[key].const_value = inits[key].const_value
    return fits


def reset(model, site_ids: list[str]) -> None:
    """The sites' affine back to the identity (an ONNX model or a GraphModule)."""
    import onnx_ir as ir
    import torch

    for sid in site_ids:
        for name, default in PARAMS:
            if isinstance(model, torch.nn.Module):
                with torch.no_grad():
                    model.get_parameter(f"attn_opt_{sid}_{name}").fill_(default)
            else:
                v = model.ir.graph.initializers[f"attn_opt.{sid}.{name}"]
                v.const_value = ir.tensor(np.full(v.const_value.shape, default, np.float32), name=v.name)


def calibrate_fx(gm, old_sites: dict, rewritten: list[str], calib: dict, heldout: dict | None, progress=None):
    """The same on a GraphModule: the affine is three nn.Parameters per site."""
    import torch

    from attn_opt.rewriter.ir import fx as fx_adapter

    def write(site_id: str, values: dict) -> None:
        with torch.no_grad():
            for name, _ in PARAMS:
                gm.get_parameter(f"attn_opt_{site_id}_{name}").copy_(torch.as_tensor(values[name]))

    return fit_sites(fx_adapter.view(gm), old_sites, rewritten, calib, heldout, write, progress)


def fit_sites(gv, old_sites: dict, rewritten: list[str], calib: dict, heldout: dict | None, write,
              progress=None) -> list[SiteFit]:
    """Layer by layer: probe the sites of `gv` on `calib` (earlier layers already
    calibrated), fit, `write(site, values)`; then the held-out check."""
    from attn_opt.patterns import reference
    from attn_opt.patterns.detect import detect

    sites = {s.id: s for s in detect(gv, feeds=calib).sites if s.id in rewritten}
    order = {id(n): i for i, n in enumerate(gv.nodes)}
    position = {sid: order.get(id(s.output.producer), 0) for sid, s in sites.items()}
    # model order: by layer where the scopes say it, else each site alone where it lies in the graph
    groups: dict = {}
    for sid, s in sorted(sites.items(), key=lambda kv: position[kv[0]]):
        groups.setdefault(s.layer if s.layer is not None else ("at", position[sid]), []).append(s)
    fits: dict[str, SiteFit] = {}
    for chosen in sorted(groups.values(), key=lambda g: min(position[s.id] for s in g)):
        layer = chosen[0].layer
        t0 = time.perf_counter()
        ctx = progress.step(f"calibrate layer {layer}" if layer is not None else f"calibrate {chosen[0].id}") if progress is not None else _Null()
        with ctx:
            probed = gv.probe([x for s in chosen for x in reference.needed(s) + [s.v.value]], calib)
            for s in chosen:
                tensors = site_tensors(s, old_sites[s.id], probed)
                values, before, after = fit(*tensors, normaliser=s.normaliser.without_affine())
                if after < before:
                    write(s.id, values)
                fits[s.id] = SiteFit(s.id, s.layer, before, min(after, before), values={
                    k: np.round(v, 4).tolist() for k, v in values.items()} if after < before else {})
        for s in chosen:
            fits[s.id].seconds = (time.perf_counter() - t0) / len(chosen)
    if heldout is not None:
        _check_heldout(gv, sites, old_sites, fits, heldout, write)
    return [fits[i] for i in rewritten if i in fits]


def _check_heldout(gv, sites, old_sites, fits, heldout, write) -> None:
    """Each site's error on the held-out inputs, calibrated vs identity (both on the
    calibrated model's activations); a site that got worse goes back to the identity."""
    from attn_opt.patterns import reference

    probed = gv.probe([x for s in sites.values() for x in reference.needed(s) + [s.v.value]], heldout)
    for sid, f in fits.items():
        if not f.values:
            continue
        s, vis, v, target = site_tensors(sites[sid], old_sites[sid], probed)
        base = sites[sid].normaliser.without_affine()
        f.heldout_before = relative_error(reference.normalise(base, s, vis) @ v, target)
        fitted = base.with_affine(*(f.values[k] for k, _ in PARAMS))
        f.heldout_after = relative_error(reference.normalise(fitted, s, vis) @ v, target)
        if f.heldout_after > f.heldout_before:
            f.reverted = True
            write(sid, {k: np.full(len(f.values[k]), d) for k, d in PARAMS})


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def heal(gm, data: dict, reference, steps: int = 200, lr: float = 1e-2) -> dict:
    """End-to-end distillation on torch: train only the parameters attn-opt added to the
    GraphModule (calibration's affine, sink logits, gates) so its outputs match
    `reference` (the original module) on `data` (input name -> array); the rest of the
    model stays frozen. Returns the loss before and after."""
    import torch

    from attn_opt.rewriter.ir.fx_steps import args_of

    own = {n: p for n, p in gm.named_parameters() if n.startswith("attn_opt_")}
    if not own:
        raise UserError("heal: the module has no attn-opt parameters to train (run a form pass with calibrate=, "
                        "sinkfree:mode=logit or gated first)")
    args = args_of(gm, data)
    frozen = {n: p.requires_grad for n, p in gm.named_parameters()}
    for n, p in gm.named_parameters():
        p.requires_grad_(n in own)

    def leaves(out):
        return [x for x in torch.utils._pytree.tree_flatten(out)[0] if isinstance(x, torch.Tensor)]

    with torch.no_grad():
        want = [t.float() for t in leaves(reference(*args))]
    scales = [t.abs().max().clamp(min=1e-12) for t in want]

    def loss():
        return sum((((a.float() - b) / s) ** 2).mean() for a, b, s in zip(leaves(gm(*args)), want, scales))

    opt = torch.optim.Adam(own.values(), lr=lr)
    try:
        with torch.no_grad():
            before = float(loss())
        for _ in range(steps):
            opt.zero_grad()
            value = loss()
            value.backward()
            opt.step()
        with torch.no_grad():
            after = float(loss())
    finally:
        for n, p in gm.named_parameters():
            p.requires_grad_(frozen[n])
    return {"loss_before": before, "loss_after": after, "steps": steps, "parameters": sorted(own)}
