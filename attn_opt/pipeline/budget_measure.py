"""What `--budget` measures on an ONNX model (pipeline/budget.py): each choice's cost from
the FLOP counter, each site's sensitivity from one observation run plus the nodes downstream
of the site, and the task's fidelity objective.

A site is re-run from its probabilities: the eager rules record the Softmax output
(`site.probs`); the form's probabilities come from the NumPy reference on the recorded Q/K
and masks (checked against the recorded probabilities first, so a layout the reference
reads differently is caught, not measured wrongly), and the site's downstream cone (every
node that reads the probabilities, directly or not) runs in its own ORT session fed from
the observation run.
"""

from __future__ import annotations

import numpy as np

from attn_opt.core import fidelity
from attn_opt.core.errors import NotSupported
from attn_opt.core.graph import SITE_TAG
from attn_opt.core.ir import onnx_flops
from attn_opt.core.ir.onnx_model import OnnxModel
from attn_opt.core.ir.onnx_segments import _run_sub, _sub_model, reads
from attn_opt.patterns import reference


WINDOWS = ("window", "shift", "stride", "grid")  # patterns whose kept pairs depend on positions only


def form_probabilities(site, probed: dict, form) -> np.ndarray:
    """[B, H, Tq, Tk] weights of `form` at `site` from its probed Q/K and masks."""
    s, vis = reference.scores(site, probed)
    if form.pattern is not None:
        tq, tk = s.shape[-2:]
        if form.pattern.kind in WINDOWS:
            keep = np.broadcast_to(form.pattern.visible(tk)[-tq:], s.shape).copy()
        else:  # a content selection: which keys it keeps depends on Q and K
            select = getattr(reference, "selected_visible", None)
            if select is None:
                raise NotSupported(f"--budget: no reference for a {form.pattern.kind} pattern")
            q, k = (reference.operand(op, probed).astype(np.float64) for op in (site.q, site.k))
            if form.pattern.kind == "routing":
                select = lambda p, q_, k_, _scale, seen: reference.routing_visible(p, q_, k_, seen)  # noqa: E731
            keep = np.array(np.broadcast_to(select(form.pattern, q, k, site.scale, vis), s.shape))
        for h in form.pattern.dense_heads:
            keep[:, h] = True
        vis = vis & keep
    return reference.normalise(form.normaliser, s, vis)


class Cones:
    """Per site, the nodes downstream of its probabilities and what they read from the rest."""

    def __init__(self, model: OnnxModel, sites):
        self.model = model
        self.proto = model.graph_proto()
        nodes = list(self.proto.graph.node)
        inits = {t.name for t in self.proto.graph.initializer}
        outs = [o.name for o in self.proto.graph.output]
        self.cone, self.boundary, self.outputs, self.why = {}, {}, {}, {}
        for site in sites:
            if site.probs is None or site.rule != "eager" or site.region:
                self.why[site.id] = "no probabilities value at the top level to re-run the site from (a fused op)"
                continue
            live, idx = {site.probs.name}, []
            for i, n in enumerate(nodes):
                if any(x in live for x in reads(n)):
                    idx.append(i)
                    live.update(o for o in n.output if o)
            produced = {o for i in idx for o in nodes[i].output}
            self.cone[site.id] = [nodes[i] for i in idx]
            self.boundary[site.id] = sorted({x for i in idx for x in reads(nodes[i])
                                             if x and x not in produced and x not in inits})
            self.outputs[site.id] = [o for o in outs if o in produced]

    def needed(self, sites) -> list[str]:
        names = []
        for s in sites:
            if s.id in self.cone:
                names += self.boundary[s.id] + [s.probs.name, s.v.value.name]
                names += [v.name for v in reference.needed(s) if v.const is None]
        return list(dict.fromkeys(names))

    def session(self, site_id: str, env: dict):
        ins = {k: env[k] for k in self.boundary[site_id]}
        sub = OnnxModel.from_proto(_sub_model(self.proto, self.cone[site_id], ins, self.outputs[site_id]),
                                   self.model.folder)
        return sub.session(prepack=True)  # run once per choice: packing the weights once pays


def check_layout(site, env: dict) -> str | None:
    """Why the reference's probabilities of the untouched site differ from the recorded ones, or None."""
    try:
        mine = reference.probabilities(site, env)
    except (ValueError, KeyError) as e:
        return f"its probabilities cannot be recomputed from Q/K ({e})"
    got = np.asarray(env[site.probs.name], np.float64)
    if mine.size != got.size or not np.allclose(mine.reshape(got.shape), got, atol=2e-3):
        return "the reference's probabilities differ from the graph's (a layout it does not read)"
    return None


def run_cone(sess, site, env: dict, probs: np.ndarray, outputs: dict) -> dict:
    """The model's outputs with the site's probabilities replaced (others from `outputs`)."""
    rec = env[site.probs.name]
    feed = {i.name: env[i.name] for i in sess.get_inputs() if i.name != site.probs.name}
    feed[site.probs.name] = probs.reshape(rec.shape).astype(rec.dtype)
    names = [o.name for o in sess.get_outputs()]
    return dict(outputs, **dict(zip(names, sess.run(names, feed))))


# -- costs ---------------------------------------------------------------------------------
def site_flops(model: OnnxModel, feeds: dict, sites_nodes: dict[str, set[str]], env: dict) -> dict[str, tuple]:
    """Per site: (attention matmul FLOPs, matmul FLOPs) of its nodes, from the FLOP counter at
    the feeds' shapes: a site's nodes are those tagged with its id or named in `sites_nodes`.
    Their shapes come from running the site's nodes alone on the observation run's values
    (`env`: its Q, K, V and masks), never the whole model; static inference where a site
    reads a value the run did not record."""
    proto = model.graph_proto()
    owner = {n: sid for sid, names in sites_nodes.items() for n in names}
    mine: dict[str, list] = {sid: [] for sid in sites_nodes}
    for n in proto.graph.node:
        tag = next((p.value for p in n.metadata_props if p.key == SITE_TAG), None)
        sid = tag if tag in mine else owner.get(n.name)
        if sid is not None:
            mine[sid].append(n)
    known, shp = dict(env, **feeds), None
    inits = {t.name for t in proto.graph.initializer}
    out = {}
    for sid, nodes in mine.items():
        produced = {o for n in nodes for o in n.output if o}
        reads_ = {x for n in nodes for x in reads(n) if x and x not in produced and x not in inits}
        if reads_ <= set(known):
            got = _run_sub(model, proto, nodes, [known], sorted(produced))[0]
            here = {k: tuple(np.shape(v)) for k, v in got.items()}
            here.update({k: tuple(np.shape(known[k])) for k in reads_})
        else:
            shp = shp or onnx_flops.shapes(model, feeds)
            here = shp
        f = [onnx_flops.node_counts(n, here, {n.name}) for n in nodes]
        out[sid] = (sum(x.attention_matmul for x in f), sum(x.matmul for x in f))
    return out


# -- the objective ---------------------------------------------------------------------------
def padding_mask(feeds: dict):
    return next((v for n, v in feeds.items() if "mask" in n.lower() and np.ndim(v) == 2), None)


SPEARMAN_ROWS = 8  # fewer rows give too few pairs (28 at 8) for a ranking to tell choices apart


def choose_objective(objective: str, refs: dict, logits: set) -> str:
    """The task's objective: KL for logits, the Spearman of pairwise similarities for a batch
    of embeddings (≥ SPEARMAN_ROWS rows), cosine otherwise; `objective` overrides it."""
    if objective != "auto":
        return objective
    if any(k in logits for k in refs):
        return "kl"
    if any(np.ndim(v) >= 2 and len(v) >= SPEARMAN_ROWS and np.issubdtype(np.asarray(v).dtype, np.floating)
           for v in refs.values()):
        return "spearman"
    return "cosine"


def loss(objective: str, refs: dict, outs: dict, feeds: dict, logits: set) -> float:
    """The fidelity loss (0 = the original): 1 − Spearman, KL, 1 − arg-max agreement, or
    1 − cosine, the worst over the outputs it applies to."""
    worst = 0.0
    mask = padding_mask(feeds)
    for k, ref in refs.items():
        out = outs[k]
        if np.shape(out) != np.shape(ref) or not np.issubdtype(np.asarray(ref).dtype, np.floating):
            continue
        if objective == "spearman":
            r = fidelity.pair_ranking(ref, out, mask)
            val = None if r is None else 1.0 - r
        elif objective in ("kl", "top1"):
            if logits and k not in logits:
                continue
            f = fidelity.compare(ref, out, logits=True)
            val = f.kl if objective == "kl" else (None if f.top1_agreement is None else 1.0 - f.top1_agreement)
        else:
            val = 1.0 - fidelity.compare(ref, out).cosine
        if val is not None:
            worst = max(worst, float(val) if np.isfinite(val) else float("inf"))
    return worst


FOLDS = 2  # parts of the search rows a per-site plan must win on (budget_solve.Point.beats)


def fold_losses(objective: str, refs: dict, outs: dict, feeds: dict, logits: set) -> tuple[float, ...] | None:
    """`loss` on each of FOLDS contiguous parts of the rows (the batch axis of the feeds and
    outputs); None where a part would hold too few rows to rank (SPEARMAN_ROWS) or to compare."""
    rows = {np.shape(v)[0] for v in feeds.values() if np.ndim(v)}
    if len(rows) != 1:
        return None
    n = rows.pop()
    if n < FOLDS * (SPEARMAN_ROWS if objective == "spearman" else 2):
        return None
    out = []
    for part in np.array_split(np.arange(n), FOLDS):
        def cut(d):
            return {k: v[part] if np.ndim(v) and np.shape(v)[0] == n else v for k, v in d.items()}
        out.append(loss(objective, cut(refs), cut(outs), cut(feeds), logits))
    return tuple(out)


def score_text(objective: str, value: float) -> str:
    return f"KL {value:.4g}" if objective == "kl" else f"{objective} {1 - value:.4f}"
