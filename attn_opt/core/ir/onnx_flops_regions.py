"""FLOPs of the graphs inside an ONNX model's nodes: If branches, Loop and Scan bodies,
local functions' bodies (core/ir/onnx_flops.py counts each node; this walks the regions).

- If: the branch the run took (its condition's value on the inputs counted at); where that
  value is unknown, the costlier branch, and the count says so.
- Loop: the body times its trip count where known (a constant or the run's value; the
  loop may still stop earlier on its condition); otherwise one iteration, said so.
- Scan: the body times the scanned length (the first scan input's size on its axis).
- A function call: the body at that call's sizes (onnx_region_shapes.py), once per call.
Every such choice is a note on the count.
"""

from __future__ import annotations

import numpy as np
import onnx

from attn_opt.core.ir import onnx_region_shapes as shapes_of
from attn_opt.core.ir.onnx_flops import Flops, node_counts


class _Scoped:
    """Sizes as a function body sees them: its call's, else the unscoped (first call's)."""

    def __init__(self, shp: dict, prefix: str):
        self.shp, self.prefix = shp, prefix

    def get(self, name, default=None):
        if self.prefix and self.prefix + name in self.shp:
            return self.shp[self.prefix + name]
        return self.shp.get(name, default)


class Counter:
    def __init__(self, proto: onnx.ModelProto, shp: dict, attention: set[str], values: dict):
        self.proto, self.shp, self.attention, self.values = proto, shp, attention, dict(values)
        self.functions = shapes_of.functions_of(proto)
        for g in shapes_of.all_graphs(proto.graph):  # constant conditions and trip counts
            for t in g.initializer:
                if len(t.dims) <= 1 and t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.BOOL):
                    self.values.setdefault(t.name, onnx.numpy_helper.to_array(t))
        for n in self._every_node():
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.values.setdefault(n.output[0], onnx.numpy_helper.to_array(n.attribute[0].t))

    def _every_node(self):
        for g in shapes_of.all_graphs(self.proto.graph):
            yield from g.node
        for f in self.proto.functions:
            for g in shapes_of.all_graphs(onnx.helper.make_graph(f.node, f.name, [], [])):
                yield from g.node

    def count(self) -> Flops:
        return self._nodes(self.proto.graph.node, "")

    def _nodes(self, nodes, prefix: str, depth: int = 0) -> Flops:
        f = Flops()
        shp = _Scoped(self.shp, prefix)
        for n in nodes:
            fn = self.functions.get((n.domain, n.op_type)) if n.domain not in ("", "ai.onnx") else None
            graphs = dict(shapes_of.graphs_of(n))
            if fn is not None and depth < 8:
                f.add(self._nodes(fn.node, f"{prefix}{n.name}{shapes_of.SEP}", depth + 1))
                _note(f, f"local function {n.domain}.{n.op_type}: its body counted at each call's sizes")
            elif n.op_type == "If" and graphs:
                f.add(self._if(n, graphs, prefix, depth))
            elif n.op_type == "Loop" and "body" in graphs:
                trips = self._scalar(n.input[0]) if n.input and n.input[0] else None
                f.add(self._nodes(graphs["body"].node, prefix, depth + 1), trips or 1)
                _note(f, f"Loop {n.name}: its body x {trips} (the trip count; the loop may stop earlier)" if trips
                      else f"Loop {n.name}: its body counted once (per iteration: the trip count is not known)")
            elif n.op_type == "Scan" and "body" in graphs:
                length = self._scan_length(n, graphs["body"], shp)
                f.add(self._nodes(graphs["body"].node, prefix, depth + 1), length or 1)
                _note(f, f"Scan {n.name}: its body x {length} (the scanned length)" if length
                      else f"Scan {n.name}: its body counted once (the scanned length is not known)")
            elif graphs:
                for g in graphs.values():
                    f.add(self._nodes(g.node, prefix, depth + 1))
                _note(f, f"{n.op_type} {n.name}: each subgraph counted once")
            else:
                f.add(node_counts(n, shp, self.attention))
        return f

    def _if(self, n, graphs, prefix, depth) -> Flops:
        counted = {k: self._nodes(graphs[f"{k}_branch"].node, prefix, depth + 1) if f"{k}_branch" in graphs
                   else Flops() for k in ("then", "else")}
        cond = self._scalar(n.input[0])
        if cond is None:
            k = max(counted, key=lambda b: counted[b].total)
            note = f"If {n.name}: the branch taken is not known; the costlier ({k}) counted"
        else:
            k = "then" if cond else "else"
            note = f"If {n.name}: the {k} branch counted (the one the inputs take)"
        _note(counted[k], note)
        return counted[k]

    def _scalar(self, name: str):
        a = self.values.get(name)
        if a is None or np.size(a) != 1:
            return None
        return int(np.asarray(a).reshape(-1)[0])

    @staticmethod
    def _scan_length(n, body, shp) -> int | None:
        m = next((a.i for a in n.attribute if a.name == "num_scan_inputs"), 0)
        if not m:
            return None
        first = n.input[len(n.input) - m]
        axes = next((list(a.ints) for a in n.attribute if a.name == "scan_input_axes"), [0])
        shape = shp.get(first)
        return int(shape[axes[0]]) if shape else None


def _note(f: Flops, note: str) -> None:
    if note not in f.notes:
        f.notes.append(note)
