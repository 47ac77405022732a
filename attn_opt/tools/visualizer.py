"""The diff page: one layered layout of the union of both graphs, so a node sits at the
same place on both sides and a site faces its rewrite; attention sites collapsed into
one box each; on large graphs every layer after the first collapsed into one box.

Layout: Graphviz `dot` when the binary is installed (through the `graphviz` package),
else a layered layout in Python (networkx generations, barycentre ordering).
"""

from __future__ import annotations

import json
import os
import shutil
from importlib import resources

import networkx as nx

from attn_opt.core.strict_json import for_script
from attn_opt.tools.diff import Diff

X_GAP, Y_GAP = 170, 70
COLLAPSE_ABOVE = 400  # display nodes; past this, layers after the first are collapsed


def _groups(d: Diff) -> dict[tuple[str, str], str]:
    """(side, node) -> display key: a site box, a collapsed layer, or the node itself."""
    inv = {a: b for b, a in d.match.items()}
    key: dict[tuple[str, str], str] = {}
    for side, s in (("before", d.before), ("after", d.after)):
        for n in s.graph:
            if side == "before":
                key[(side, n)] = f"m:{n}" if n in d.match else f"b:{n}"
            else:
                key[(side, n)] = f"m:{inv[n]}" if n in inv else f"a:{n}"
        for sid, nodes in s.sites.items():
            for n in nodes:
                key[(side, n)] = f"site:{sid}"
    if len(set(key.values())) > COLLAPSE_ABOVE:
        layers = sorted({lay for s in (d.before, d.after) for lay in s.layer.values() if lay is not None})
        for side, s in (("before", d.before), ("after", d.after)):
            for n in s.graph:
                lay = s.layer.get(n)
                if lay is not None and layers and lay != layers[0]:
                    key[(side, n)] = f"layer:{lay}"
    return key


def _union(d: Diff, key) -> nx.DiGraph:
    u = nx.DiGraph()
    for side, s in (("before", d.before), ("after", d.after)):
        for n in s.graph:
            u.add_node(key[(side, n)])
        for a, b in s.graph.edges:
            ka, kb = key[(side, a)], key[(side, b)]
            if ka != kb:
                u.add_edge(ka, kb)
    return u


def _layout_python(u: nx.DiGraph) -> dict[str, tuple[float, float]]:
    cond = nx.condensation(u)  # grouping can make cycles: lay out strongly connected parts as one
    members = cond.graph["mapping"]
    layer = {}
    for i, gen in enumerate(nx.topological_generations(cond)):
        for c in gen:
            layer[c] = i
    rows: dict[int, list[str]] = {}
    for n in u:
        rows.setdefault(layer[members[n]], []).append(n)
    pos: dict[str, tuple[float, float]] = {}
    for y in sorted(rows):
        def bary(n):
            xs = [pos[p][0] for p in u.predecessors(n) if p in pos]
            return sum(xs) / len(xs) if xs else 0.0

        row = sorted(rows[y], key=bary)
        width = (len(row) - 1) * X_GAP
        for i, n in enumerate(row):
            pos[n] = (i * X_GAP - width / 2, y * Y_GAP)
    return pos


def _layout_dot(u: nx.DiGraph) -> dict[str, tuple[float, float]]:
    import graphviz

    ids = {n: f"n{i}" for i, n in enumerate(u)}
    g = graphviz.Digraph(graph_attr={"rankdir": "TB", "nodesep": "0.3", "ranksep": "0.35"},
                         node_attr={"shape": "box", "width": "1.9", "height": "0.4", "fixedsize": "true"})
    for n, i in ids.items():
        g.node(i)
    for a, b in u.edges:
        g.edge(ids[a], ids[b])
    out = json.loads(g.pipe(format="json", engine="dot"))
    back = {v: k for k, v in ids.items()}
    pos = {}
    for obj in out.get("objects", []):
        if obj.get("name") in back and "pos" in obj:
            x, y = (float(t) for t in obj["pos"].split(","))
            pos[back[obj["name"]]] = (x * 1.25, -y * 1.25)
    return pos


def layout(u: nx.DiGraph) -> dict[str, tuple[float, float]]:
    if shutil.which("dot") and os.environ.get("ATTN_OPT_LAYOUT") != "python" and len(u) < 1500:
        try:
            pos = _layout_dot(u)
            if len(pos) == len(u):
                return pos
        except Exception:  # a failing dot run falls back, and the page still renders
            pass
    return _layout_python(u)


def _status(statuses: set[str], side: str) -> str:
    if statuses <= {"same"}:
        return "same"
    if statuses == {"removed"} and side == "before":
        return "removed"
    if statuses == {"added"} and side == "after":
        return "added"
    return "changed"


def page_data(d: Diff) -> dict:
    key = _groups(d)
    u = _union(d, key)
    pos = layout(u)
    out = {"title": d.title, "summary": d.summary()}
    for side, s in (("before", d.before), ("after", d.after)):
        boxes: dict[str, dict] = {}
        for n in s.graph:
            k = key[(side, n)]
            attrs = s.graph.nodes[n]
            b = boxes.setdefault(k, {"key": k, "x": pos[k][0], "y": pos[k][1], "members": [],
                                     "kind": k.split(":", 1)[0] if k.startswith(("site:", "layer:")) else "node"})
            b["members"].append({"name": n, "op": attrs["op"], "attrs": attrs["attrs"], "ins": attrs["ins"],
                                 "outs": attrs["outs"], "status": d.status[(side, n)], "scope": attrs["scope"]})
        site_of = {n: sid for sid, nodes in s.sites.items() for n in nodes}
        for b in boxes.values():
            b["status"] = _status({m["status"] for m in b["members"]}, side)
            b["sites"] = sorted({site_of[m["name"]] for m in b["members"] if m["name"] in site_of})
            if b["kind"] == "site":
                sid = b["key"][5:]
                b["label"] = s.site_labels.get(sid, sid)
            elif b["kind"] == "layer":
                b["label"] = f"layer {b['key'][6:]}: {len(b['members'])} nodes, {len(b['sites'])} sites"
            else:
                b["label"] = b["members"][0]["op"]
        edges = {(key[(side, a)], key[(side, b)]) for a, b in s.graph.edges if key[(side, a)] != key[(side, b)]}
        out[side] = {"boxes": list(boxes.values()), "edges": [list(e) for e in edges]}
    return out


def render(steps: list[tuple[Diff, dict | None]]) -> str:
    """One HTML page: a tab per step (a diff, and the pass report entry if any)."""
    data = []
    for d, passrep in steps:
        item = page_data(d)
        item["pass"] = passrep
        data.append(item)
    template = resources.files("attn_opt.tools").joinpath("diff_page.html").read_text()
    blob = for_script(data)  # strict JSON (JSON.parse refuses NaN), with <, >, & escaped
    return template.replace("__DATA__", blob)
