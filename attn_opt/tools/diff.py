"""What changed between two graphs: node alignment, status, and a summary.

Works on the IR-neutral graph view, so ONNX files and torch.export programs diff alike.
Nodes are aligned by name first (attn-opt keeps the names of what it does not touch),
then by structure with networkx: an unmatched node is paired with an unmatched node of
the same op whose matched neighbours correspond, until nothing changes. Each node is
then "same", "changed" (attributes or inputs differ), "added" or "removed".
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import networkx as nx

from attn_opt.patterns.detect import detect
from attn_opt.core.errors import UserError
from attn_opt.core.graph import EPILOGUE_TAG, SITE_TAG, GraphView, layer_of

HIDDEN = {"Constant"}  # drawn as attributes of their users, not as boxes


@dataclass
class Side:
    view: GraphView
    graph: nx.DiGraph
    sites: dict[str, list[str]]  # site id -> node names
    site_labels: dict[str, str]
    layer: dict[str, int | None]


@dataclass
class Diff:
    before: Side
    after: Side
    match: dict[str, str]  # before node name -> after node name
    status: dict[tuple[str, str], str] = field(default_factory=dict)  # (side, name) -> status
    title: str = ""

    def summary(self) -> dict:
        ops_b = Counter(self.before.graph.nodes[n]["op"] for n in self.before.graph)
        ops_a = Counter(self.after.graph.nodes[n]["op"] for n in self.after.graph)
        added = {k: v for k, v in (ops_a - ops_b).items()}
        removed = {k: v for k, v in (ops_b - ops_a).items()}
        counts = Counter(s for s in self.status.values())
        return {"nodes_before": self.before.graph.number_of_nodes(), "nodes_after": self.after.graph.number_of_nodes(),
                "added": counts["added"], "removed": counts["removed"], "changed": counts["changed"],
                "ops_added": added, "ops_removed": removed,
                "sites_before": self.before.site_labels, "sites_after": self.after.site_labels,
                "sites_changed": sorted(k for k in set(self.before.site_labels) | set(self.after.site_labels)
                                        if self.before.site_labels.get(k) != self.after.site_labels.get(k))}


def site_label(s, gated: bool = False) -> str:
    form = s.rule
    if s.pattern:
        p = s.pattern
        form = f"sparse {p.window}" + (f"x{p.kernel[1]}/{p.grid[0]}x{p.grid[1]}" if p.grid else "") + \
            (f" sinks {p.sinks}" if p.sinks and not p.grid else "")
    if not s.normaliser.is_softmax:
        form += f" {s.normaliser.kind}"
    if gated:  # the gate reads the site's output; it is not part of the form record
        form += " gated"
    causal = "causal" if s.causal else "bidir"
    return f"{s.id} {form}: {s.heads}h/{s.kv_heads}kv {causal} mask={s.mask}"


def side_of(gv: GraphView) -> Side:
    g = nx.DiGraph()
    for n in gv.nodes:
        if n.op in HIDDEN:
            continue
        shapes_in = [str(list(v.shape)) if v is not None and v.shape is not None else "?" for v in n.inputs]
        shapes_out = [str(list(v.shape)) if v.shape is not None else "?" for v in n.outputs]
        attrs = {k: _short(v) for k, v in n.attrs.items() if k != "value"}
        where = " ".join(x for x in (n.scope, f"(in {n.region})" if n.region else "") if x)  # a subgraph's, a function's
        g.add_node(n.name, op=n.op, attrs=attrs, ins=shapes_in, outs=shapes_out, scope=where,
                   inputs=[v.name if v is not None else "" for v in n.inputs])
    for n in gv.nodes:
        if n.op in HIDDEN:
            continue
        for v in n.inputs:
            if v is not None and v.producer is not None and v.producer.name in g:
                g.add_edge(v.producer.name, n.name)
    det = detect(gv)
    sites = {s.id: [x for x in s.nodes if x in g] for s in det.sites}
    layers = {n.name: layer_of(n.scope) for n in gv.nodes if n.name in g}
    for s in det.sites:  # a site's nodes are in its layer, new ones (no module scope) too
        for x in sites[s.id]:
            layers[x] = s.layer if s.layer is not None else layers.get(x)
    gated = {n.meta.get(SITE_TAG) for n in gv.nodes if EPILOGUE_TAG in n.meta}
    return Side(gv, g, sites, {s.id: site_label(s, s.id in gated) for s in det.sites}, layers)


def _short(v) -> str:
    s = str(v.tolist() if hasattr(v, "tolist") else v)
    return s if len(s) <= 80 else s[:77] + "..."


def align(before: Side, after: Side) -> dict[str, str]:
    gb, ga = before.graph, after.graph
    match = {n: n for n in gb if n in ga and gb.nodes[n]["op"] == ga.nodes[n]["op"]}
    changed = True
    while changed:  # structure: same op, and a matched neighbour on each side corresponds
        changed = False
        used = set(match.values())
        for b in gb:
            if b in match:
                continue
            cands = set()
            for p in gb.predecessors(b):
                if p in match:
                    cands |= {s for s in ga.successors(match[p]) if s not in used and ga.nodes[s]["op"] == gb.nodes[b]["op"]}
            for s in gb.successors(b):
                if s in match:
                    cands |= {p for p in ga.predecessors(match[s]) if p not in used and ga.nodes[p]["op"] == gb.nodes[b]["op"]}
            if len(cands) == 1:
                match[b] = cands.pop()
                used.add(match[b])
                changed = True
    return match


def diff_views(before: GraphView, after: GraphView, title: str = "") -> Diff:
    b, a = side_of(before), side_of(after)
    match = align(b, a)
    shared_inputs = {v.name for v in before.inputs} & {v.name for v in after.inputs}
    wb, wa = _weights(before), _weights(after)
    if not shared_inputs and len(wb & wa) < 0.2 * max(1, min(len(wb), len(wa))):
        raise UserError("the two models look unrelated: no graph input and almost no weight in common")
    d = Diff(b, a, match, title=title)
    inv = {v: k for k, v in match.items()}
    for n in b.graph:
        if n not in match:
            d.status[("before", n)] = "removed"
        else:
            same = _same(b.graph.nodes[n], a.graph.nodes[match[n]])
            d.status[("before", n)] = d.status[("after", match[n])] = "same" if same else "changed"
    for n in a.graph:
        if n not in inv:
            d.status[("after", n)] = "added"
    return d


def _weights(gv: GraphView) -> set[tuple[str, tuple]]:
    """(name, shape) of the weights the graph reads."""
    return {(v.name, v.const.shape) for n in gv.nodes for v in n.inputs
            if v is not None and v.const is not None and v.const.ndim >= 2}


def _same(x: dict, y: dict) -> bool:
    return x["op"] == y["op"] and x["attrs"] == y["attrs"] and x["inputs"] == y["inputs"]
