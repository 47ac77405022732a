"""Calibration: fit each rewritten site's per-head parameters (patterns/form.py: the
affine gain · N(temperature · S + offset) of every form, and the form's own: softplus's
length exponent and power, the sink logit, redistribute's α) so its output matches what
the original site computes, on calibration inputs, layer by layer in model order; and,
asked for (`lora=R`), a rank-R correction of the site's output projection fitted on
what error is left.

A pass run with calibration lowers every form with those parameters as initializers
(ONNX) or nn.Parameters (torch.fx) set to the identity, and the LoRA factors with B = 0;
calibration only changes their values, never the graph. For layer l the site's scores S
and values V are probed in the model whose layers before l are already calibrated; the
target is the original normaliser and visibility on those same S and V (the site as it
was before the pass); the parameters are fitted with Adam in torch (CPU, a few hundred
steps). The LoRA is then fitted in closed form (ridge, reduced rank) on the projection's
probed input against what the projection read in the model before the pass. Query rows
at padding tokens are left out throughout. After the last layer each site
is checked on the held-out inputs (the pipeline's fidelity inputs): where its error
there is worse than uncalibrated, the site (or its LoRA) goes back to the identity, and
the report says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from attn_opt.core.graph import param_name
from attn_opt.core.errors import UserError

STEPS, LR = 300, 0.05
FIT_ROWS = 4096  # query rows (of every head) a fit uses at most: seconds per layer on MiniLM-sized inputs
LORA_ROWS = 16384  # token rows the LoRA's least squares uses at most
RIDGE = 1e-2  # the LoRA's ridge, relative to the mean eigenvalue of XᵀX
LOWER = {"p": 0.05, "alpha": 0.0}  # parameters kept above a bound while fitting


@dataclass
class LoraFit:
    """A site's rank-`rank` correction of its output projection: the projection's output
    error against what it read before the pass, before/after the fit, on the calibration
    rows and the held-out ones; `skipped`: why none was fitted."""
    rank: int
    error_before: float | None = None
    error_after: float | None = None
    heldout_before: float | None = None
    heldout_after: float | None = None
    reverted: bool = False
    skipped: str | None = None
    b_shape: tuple | None = None
    a: np.ndarray | None = field(default=None, repr=False)  # kept until the held-out check, never reported
    b: np.ndarray | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        if self.skipped is not None:
            return {"rank": self.rank, "skipped": self.skipped}
        d = {k: v for k, v in self.__dict__.items() if k not in ("a", "b", "skipped") and v is not None}
        d["b_shape"] = list(self.b_shape) if self.b_shape is not None else None
        return d


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
    start: dict = field(default_factory=dict)  # name -> the identity's values (what a revert writes)
    lora: LoraFit | None = None

    def to_json(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("start", "lora")}
        d["values"] = {k: np.round(v, 4).tolist() for k, v in self.values.items()}
        d["lora"] = self.lora.to_json() if self.lora is not None else None
        return d


@dataclass
class Calibration:
    """What --calibrate did in one pass: per site, and the model's error against the
    original before and after (on the calibration inputs and the held-out ones; `*_order`:
    the held-out order of each output), its time, and why it was undone if it was."""
    sites: list[SiteFit] = field(default_factory=list)
    model_error_before: dict = field(default_factory=dict)
    model_error_after: dict = field(default_factory=dict)
    seconds: float = 0.0
    note: str | None = None  # why every site went back to the identity, or why nothing was fitted

    @property
    def reverted(self) -> list[str]:
        return [f.site for f in self.sites if f.reverted]

    @property
    def fitted(self) -> bool:
        """Whether anything was calibrated (a pass with nothing to fit has only a note)."""
        return bool(self.sites) or bool(self.model_error_before)

    def to_json(self) -> dict:
        if not self.fitted:
            return {"note": self.note}
        return {"sites": [f.to_json() for f in self.sites], "model_error_before": self.model_error_before,
                "model_error_after": self.model_error_after, "seconds": self.seconds, "reverted": self.reverted,
                "note": self.note}


def check_lora(sites, rank: int) -> None:
    """Refuse a LoRA rank no output projection can have (at most min(in, out) of each), or
    whose factors, with the fit's copies, would not fit the memory limit: before the
    lowering allocates them."""
    from attn_opt.core import limits

    total = 0
    for s in sites:
        o = s.out_projection
        if o is None:
            continue
        d_in, d_out = (o.weight.const.shape[1], o.weight.const.shape[0]) if o.transposed else o.weight.const.shape
        if rank > min(d_in, d_out):
            raise UserError(f"--lora {rank}: site {s.id}'s output projection is {d_in}x{d_out}, so a correction "
                            f"has rank at most {min(d_in, d_out)}")
        total += 4 * rank * (d_in + d_out) * 8  # A and B in float64: the initial ones, the fit's, the written
    limits.refuse_past(f"--lora {rank} (the factors of {len(sites)} site(s) and their fit)", total,
                       "give a smaller rank")


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
        out = vis & pattern.visible(tk)[tk - tq:]
        if pattern.dense_heads:  # those heads keep every pair the site's masks allow
            out[:, list(pattern.dense_heads)] = vis[:, list(pattern.dense_heads)]
        return out

    v = reference.operand(new_site.v, probed).astype(np.float64)
    v = np.repeat(v, s.shape[1] // v.shape[1], axis=1)
    target = reference.normalise(old_site.normaliser, s, kept(old_site.pattern)) @ v
    return s, kept(new_site.pattern), v, target


def live_rows(vis: np.ndarray) -> np.ndarray:
    """[B, Tq] bool: query rows at tokens some query may attend to. A padding token (hidden
    as a key from every query) changes nothing the model's real tokens compute, so its
    row is left out of the fit and of the errors. Cross-attention (the query block not the
    last Tq of the keys): every row."""
    b, _, tq, tk = vis.shape
    alive = np.asarray(vis).any(axis=(1, 2))  # [B, Tk]
    live = alive[:, tk - tq:] if tq <= tk else np.ones((b, tq), bool)
    return live if live.any() else np.ones((b, tq), bool)


def row_error(a, b, live) -> float:
    """relative_error over the live rows of [B, H, Tq, d] outputs."""
    m = np.asarray(live)[:, None, :, None]
    return relative_error(np.where(m, a, 0.0), np.where(m, b, 0.0))


def fit(s, vis, v, target, normaliser, steps: int = STEPS, frozen: tuple[int, ...] = ()) -> tuple[dict, float, float]:
    """The calibrated `normaliser`'s per-head parameters minimising the squared error of its
    output against `target` on the live rows (`live_rows`), from the identity; (values,
    error before, after). The heads in `frozen` (a pattern's dense heads: exact as they are)
    keep their starting values."""
    import torch

    from attn_opt.backends.torch.forms import normalise

    h = s.shape[1]
    normaliser = normaliser if normaliser.calibrated else normaliser.calibrate(heads=h)
    b, tq = s.shape[0], s.shape[2]
    keep = max(1, FIT_ROWS // (h * tq))  # whole sequences, evenly spread, up to FIT_ROWS rows per head group
    pick = np.linspace(0, b - 1, min(b, keep)).round().astype(int)
    s, vis, v, target = (np.asarray(x)[pick] for x in (s, vis, v, target))
    live = live_rows(vis)
    S, V, T = (torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) for x in (s, v, target))
    Vis = torch.from_numpy(np.ascontiguousarray(vis))
    rows = torch.from_numpy(np.ascontiguousarray(live[:, None, :, None], dtype=np.float32))
    params = {k: torch.tensor(x, dtype=torch.float32, requires_grad=True) for k, x in normaliser.values(h).items()}

    def out():
        w = normalise(normaliser, S, Vis, lambda vals: torch.as_tensor(vals, dtype=S.dtype).reshape(1, h, 1, 1), h,
                      params)
        return w @ V

    with torch.no_grad():
        before = row_error(out().numpy(), target, live)  # on the rows fitted
    opt = torch.optim.Adam(params.values(), lr=LR)
    scale = T.abs().max().clamp(min=1e-12)
    for _ in range(steps):
        opt.zero_grad()
        loss = ((((out() - T) / scale) ** 2) * rows).sum() / rows.sum()
        loss.backward()
        for t in params.values():  # a zero gradient from the start: Adam leaves the value as it is
            t.grad[list(frozen)] = 0
        opt.step()
        with torch.no_grad():
            for k, low in LOWER.items():
                if k in params:
                    params[k].clamp_(min=low)
    with torch.no_grad():
        after = row_error(out().numpy(), target, live)
    return {k: t.detach().numpy().astype(np.float64) for k, t in params.items()}, before, after


def fit_lora(x: np.ndarray, y_err: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """A [D, r], B [r, Dout] minimising ||x A B − y_err||² + ridge: the ridge solution's best
    rank-r part on the rows' span (reduced-rank regression)."""
    x, y_err = x.astype(np.float64), y_err.astype(np.float64)
    if len(x) > LORA_ROWS:
        pick = np.linspace(0, len(x) - 1, LORA_ROWS).round().astype(int)
        x, y_err = x[pick], y_err[pick]
    gram = x.T @ x
    lam = RIDGE * max(np.trace(gram) / gram.shape[0], 1e-12)
    w = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), x.T @ y_err)  # [D, Dout]
    _, _, vt = np.linalg.svd(x @ w, full_matrices=False)
    v = vt[:rank].T  # [Dout, r]
    return w @ v, v.T


def merged(out: np.ndarray) -> np.ndarray:
    """[B, H, T, dv] -> [B·T, H·dv]: the heads merged as the output projection reads them."""
    b, h, t, d = out.shape
    return out.transpose(0, 2, 1, 3).reshape(b * t, h * d)


def _projection(site):
    """(input value, W [D, Dout]) of the site's output projection, or None."""
    o = site.out_projection
    if o is None:
        return None
    w = o.weight.const.T if o.transposed else o.weight.const
    return o.x, np.asarray(w, np.float64)


def _lora_data(site, probed, out_new, before_pass: dict, live):
    """(what the output projection reads now [rows, D], what it gave in the model before
    the pass [rows, Dout], W) on the live token rows, or a reason the LoRA cannot be fitted
    here: what it reads is checked to be the site's output with heads merged. The target
    is the original model's, so a layer also makes up for what earlier layers still change."""
    x_value, w = _projection(site)

    def rows(a):
        a = np.asarray(a, np.float64)
        return a.reshape(-1, a.shape[-1])

    x = rows(probed[x_value.name])
    mine = merged(out_new)
    if x.shape != mine.shape or relative_error(mine, x) > 1e-3:
        return "the output projection does not read the site's output with its heads merged"
    keep = np.asarray(live).reshape(-1)
    return x[keep], rows(before_pass[x_value.name])[keep] @ w, w


def _lora_errors(x, want, w, a, b) -> tuple[float, float]:
    """The projection's output error without and with the LoRA a·b."""
    return relative_error(x @ w, want), relative_error(x @ (w + a @ b), want)


def calibrate(om, old_sites: dict, rewritten: list[str], calib: dict, heldout: dict | None, progress=None,
              lora: int = 0, targets=None) -> list[SiteFit]:
    """Fit and write the parameters of every rewritten site of the ONNX model `om` (edited
    in place), layer by layer; `old_sites`: id -> the site before the pass."""
    from attn_opt.core.ir import onnx as onnx_adapter

    shaped = onnx_adapter.with_shapes(om)  # the copy the view probes; the values go back to `om` at the end
    inits = shaped.ir.graph.initializers
    missing = [i for i in rewritten if param_name(i, "temperature") not in inits]
    if missing:
        raise UserError(f"calibration: the parameters of {', '.join(missing)} are missing after the pass")
    fits = fit_sites(onnx_adapter.view(shaped), old_sites, rewritten, calib, heldout, writer(shaped), progress, lora,
                     targets)
    for key in [k for k in inits if k.startswith("attn_opt.") and k.split(".")[1] in rewritten]:
        om.ir.graph.initializers[key].const_value = inits[key].const_value
    return fits


def writer(model):
    """write(site, {name: per-head values}): a site's parameters set in an ONNX model
    (initializers attn_opt.<site>.<name>) or a GraphModule (nn.Parameters attn_opt_<site>_<name>)."""
    import torch

    if isinstance(model, torch.nn.Module):
        def write(site_id: str, values: dict) -> None:
            with torch.no_grad():
                for name, vals in values.items():
                    p = model.get_parameter(param_name(site_id, name, "fx"))
                    p.copy_(torch.as_tensor(np.asarray(vals), dtype=p.dtype))
        return write

    import onnx_ir as ir

    inits = model.ir.graph.initializers

    def write(site_id: str, values: dict) -> None:
        for name, vals in values.items():
            key = param_name(site_id, name)
            inits[key].const_value = ir.tensor(np.asarray(vals, np.float32), name=key)
    return write


def reset(model, fits: list[SiteFit]) -> None:
    """The sites' parameters back to the identity, their LoRA to zero (an ONNX model or a
    GraphModule)."""
    write = writer(model)
    for f in fits:
        write(f.site, f.start | ({"lora_b": np.zeros(f.lora.b_shape)} if f.lora and f.lora.b_shape else {}))


def calibrate_fx(gm, old_sites: dict, rewritten: list[str], calib: dict, heldout: dict | None, progress=None,
                 lora: int = 0, targets=None):
    """The same on a GraphModule: the parameters are nn.Parameters of the module."""
    from attn_opt.core.ir import fx as fx_adapter

    return fit_sites(fx_adapter.view(gm), old_sites, rewritten, calib, heldout, writer(gm), progress, lora, targets)


def fit_sites(gv, old_sites: dict, rewritten: list[str], calib: dict, heldout: dict | None, write,
              progress=None, lora: int = 0, targets=None) -> list[SiteFit]:
    """Layer by layer: probe the sites of `gv` on `calib` (earlier layers already
    calibrated), fit, `write(site, values)`, then the LoRA where the pass added one; then
    the held-out check. `targets`: (calibration, held-out) name -> what each output
    projection read in the model before the pass, the LoRA's targets."""
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
    with_lora = {sid for sid, s in sites.items() if lora and s.out_projection is not None}  # the pass added one
    ordered = sorted(groups.values(), key=lambda g: min(position[s.id] for s in g))
    for i, chosen in enumerate(ordered):
        layer = chosen[0].layer
        t0 = time.perf_counter()
        what = f"calibrate layer {layer}" if layer is not None else f"calibrate {chosen[0].id}"
        ctx = progress.step(f"{what} ({i + 1}/{len(ordered)})") if progress is not None else _Null()
        with ctx:
            probed = gv.probe([x for s in chosen for x in reference.needed(s) + [s.v.value]], calib)
            tensors = {s.id: site_tensors(s, old_sites[s.id], probed) for s in chosen}
            for s in chosen:
                n = s.normaliser
                dense = s.pattern.dense_heads if s.pattern is not None else ()
                values, before, after = fit(*tensors[s.id], normaliser=n, frozen=dense)
                start = n.values(s.heads)
                if after < before:
                    write(s.id, values)
                fits[s.id] = SiteFit(s.id, s.layer, before, min(after, before), start=start,
                                     values=values if after < before else {})
            mine = [s for s in chosen if s.id in with_lora]
            if mine:  # with the fitted values written, what the projections now read (S and V are upstream)
                probed = gv.probe([_projection(s)[0] for s in mine], calib)
                for s in mine:
                    fits[s.id].lora = _fit_lora_site(s, tensors[s.id], probed, write, lora,
                                                    fits[s.id].values or fits[s.id].start, targets[0])
        for s in chosen:
            fits[s.id].seconds = (time.perf_counter() - t0) / len(chosen)
    if heldout is not None:
        _check_heldout(gv, sites, old_sites, fits, heldout, write, targets[1] if targets else None)
    return [fits[i] for i in rewritten if i in fits]


def _fit_lora_site(site, tensors, probed, write, rank: int, values: dict, before_pass: dict) -> LoraFit:
    """Fit and write the site's rank-`rank` LoRA on its projection's error (the site's
    parameters at `values`, its `site_tensors`); what it did."""
    from attn_opt.patterns import reference

    s, vis, v, _ = tensors
    out = reference.normalise(site.normaliser.calibrate(values), s, vis) @ v
    got = _lora_data(site, probed, out, before_pass, live_rows(vis))
    if isinstance(got, str):
        return LoraFit(rank, skipped=got)
    x, want, w = got
    a, b = fit_lora(x, want - x @ w, rank)
    before, after = _lora_errors(x, want, w, a, b)
    info = LoraFit(rank, before, after, b_shape=tuple(b.shape))
    if after < before:
        write(site.id, {"lora_a": a, "lora_b": b})
        info.a, info.b = a, b
    return info


def _check_heldout(gv, sites, old_sites, fits, heldout, write, before_pass=None) -> None:
    """Each site's error on the held-out inputs, calibrated vs identity (both on the
    calibrated model's activations); a site that got worse goes back to the identity, a
    LoRA that made its projection's output worse goes back to zero."""
    from attn_opt.patterns import reference

    wanted = [x for s in sites.values() for x in reference.needed(s) + [s.v.value]]
    wanted += [_projection(s)[0] for sid, s in sites.items() if fits[sid].lora is not None and fits[sid].lora.a is not None]
    probed = gv.probe(wanted, heldout)
    for sid, f in fits.items():
        site = sites[sid]
        s, vis, v, target = site_tensors(site, old_sites[sid], probed)
        live = live_rows(vis)
        if f.values:
            identity = site.normaliser.calibrate(f.start)
            f.heldout_before = row_error(reference.normalise(identity, s, vis) @ v, target, live)
            f.heldout_after = row_error(reference.normalise(site.normaliser.calibrate(f.values), s, vis) @ v, target,
                                        live)
            if f.heldout_after > f.heldout_before:
                f.reverted = True
                write(sid, f.start)
        info = f.lora
        if info is not None and info.a is not None:
            n = site.normaliser.calibrate(f.values or f.start)  # the values the held-out run had
            got = _lora_data(site, probed, reference.normalise(n, s, vis) @ v, before_pass, live)
            if not isinstance(got, str):
                x, want, w = got
                info.heldout_before, info.heldout_after = _lora_errors(x, want, w, info.a, info.b)
                if info.heldout_after > info.heldout_before:
                    info.reverted = True
                    write(sid, {"lora_b": np.zeros_like(info.b)})
        if info is not None:
            info.a = info.b = None


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

    from attn_opt.pipeline.fx_steps import args_of

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
