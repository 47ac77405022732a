"""Building rewrites on an onnx_ir model: one `SiteEdit` per site collects the new nodes
(tagged with the site id, so FLOP counts and the diff know them), inserts them after
the site's last node and rewires the site's output; dead nodes go in one sweep."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, RemoveUnusedOpsetsPass

from attn_opt.patterns.site import AttentionSite, Operand
from attn_opt.core.graph import EPILOGUE_TAG, PASS_TAG, SITE_TAG, param_name

MS = "com.microsoft"
# site dtypes the form lowerings compute in float32, and their ONNX types
LOW_PRECISION = {"float16": ir.DataType.FLOAT16, "bfloat16": ir.DataType.BFLOAT16, "float64": ir.DataType.DOUBLE}


class SiteEdit:
    """The new nodes of one site. A site inside a region (an If branch, a Loop or Scan body,
    a function body: patterns/regions.py) is edited where it is: its nodes go into the graph
    that holds its output, reading values from enclosing graphs as they are; its weights are
    top-level initializers, which a subgraph reads from the enclosing scope, or Constant
    nodes in a function body, which has no initializers."""

    def __init__(self, model: ir.Model, site: AttentionSite, pass_name: str, part: str = ""):
        self.model, self.site, self.pass_name = model, site, pass_name
        out = getattr(site.output, "native", None)
        graph = out.producer().graph if out is not None and out.producer() is not None else model.graph
        self.function = next((f for f in model.functions.values() if f.graph is graph), None)
        self.graph = self.function if self.function is not None else graph  # its outputs are the site's graph's
        self.prefix = f"attn_opt/{site.id}/{pass_name}" + (f"/{part}" if part else "")  # node names: unique per edit
        self.nodes: list[ir.Node] = []
        self._n = 0
        self.in_fp32 = False  # set by lowerings that compute a fp16/bf16 site in float32
        self.epilogue = False  # the new nodes read the site's output (a gate); they are not the site

    def site_dtype(self) -> str | None:
        return self.site.output.dtype or self.site.q.value.dtype

    def compute_in_fp32(self) -> str | None:
        """Compute this site in float32 (its values are cast in, the result cast back);
        a note to say so when the site is fp16/bf16/fp64, else None."""
        dt = self.site_dtype()
        self.in_fp32 = dt in LOW_PRECISION
        return f"computed in float32 inside the {dt} model" if self.in_fp32 else None

    def value(self, v) -> ir.Value:
        """A site value as the lowering computes with it (cast to float32 if so; a term
        added to 3-D heads-in-batch scores viewed as [B, H, ·, ·])."""
        x = v.native
        if self.in_fp32 and (v.dtype in LOW_PRECISION):
            x = self.op("Cast", [x], {"to": ir.DataType.FLOAT})
        if v.name in self.site.folded_terms:
            x = self.unfold(x, self.site.heads)
        if v.name in self.site.regrouped_terms:
            x = self.regrouped(x)
        return x

    def regrouped(self, x: ir.Value) -> ir.Value:
        """A term added to the scores viewed [B/W, W, H, Tq, Tk] (Swin's shifted-window mask)
        as a term of the 4-D scores: expanded over the B/W groups, W folded into the batch
        (patterns/reference.py: regrouped)."""
        w = self.site.regroup
        q = self.site.q.value.native
        n = self.op("Gather", [self.op("Shape", [q]), self.ints(0)], {"axis": 0})
        if self.site.q.perm:
            n = self.op("Gather", [self.op("Shape", [q]), self.ints(self.site.q.perm[0])], {"axis": 0})
        groups = n if self.site.q.streams else self.op("Div", [n, self.ints(w)])  # 5-D Q: its batch axis is B
        x = self.op("Expand", [x, self.op("Concat", [groups, self.ints(w, 1, 1, 1)], {"axis": 0})])
        rest = self.op("Slice", [self.op("Shape", [x]), self.ints(2), self.ints(5), self.ints(0)])
        return self.op("Reshape", [x, self.op("Concat", [self.ints(-1), rest], {"axis": 0})])

    def unfold(self, x: ir.Value, heads: int) -> ir.Value:
        """[B*H, a, b] -> [B, H, a, b]."""
        rest = self.op("Slice", [self.op("Shape", [x]), self.ints(1), self.ints(3), self.ints(0)])
        return self.op("Reshape", [x, self.op("Concat", [self.ints(-1, heads), rest], {"axis": 0})])

    def fold(self, x: ir.Value) -> ir.Value:
        """[B, H, a, b] -> [B*H, a, b] (the layout of a heads-in-batch site's output)."""
        rest = self.op("Slice", [self.op("Shape", [x]), self.ints(2), self.ints(4), self.ints(0)])
        return self.op("Reshape", [x, self.op("Concat", [self.ints(-1), rest], {"axis": 0})])

    def back(self, x: ir.Value) -> ir.Value:
        """A float32 result back in the site's dtype."""
        if self.in_fp32:
            return self.op("Cast", [x], {"to": LOW_PRECISION[self.site_dtype()]})
        return x

    def _name(self, op: str) -> str:
        self._n += 1
        return f"{self.prefix}/{op}_{self._n}"

    def op(self, op_type: str, inputs, attrs: dict | None = None, domain: str = "", outputs: int = 1):
        tags = {SITE_TAG: self.site.id, PASS_TAG: self.pass_name} | ({EPILOGUE_TAG: "1"} if self.epilogue else {})
        node = ir.Node(domain, op_type, list(inputs), attributes=_attrs(attrs or {}), num_outputs=outputs,
                       name=self._name(op_type), metadata_props=tags)
        for i, o in enumerate(node.outputs):
            o.name = f"{node.name}:{i}"
        self.nodes.append(node)
        return node.outputs[0] if outputs == 1 else node.outputs

    def const(self, value, dtype=None) -> ir.Value:
        arr = np.asarray(value, dtype=dtype)
        return self.op("Constant", [], {"value": ir.tensor(arr)})

    def initializer(self, suffix: str, array: np.ndarray) -> ir.Value:
        """A new weight of the model (so it shows in parameter counts and can be trained)."""
        name = param_name(self.site.id, suffix)
        array = np.ascontiguousarray(array, dtype=np.float32)
        if self.function is not None:  # a function body has no initializers
            return self.const(array)
        v = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.FLOAT),
                     const_value=ir.tensor(array, name=name))
        self.model.graph.register_initializer(v)
        return v

    def is_inf(self, x: ir.Value, low_precision: bool | None = None) -> ir.Value:
        """IsInf of `x`; a float16/bfloat16 `x` (the site's dtype after `back`) is cast to
        float32 first: IsInf takes them only from opset 20, and the cast keeps ±inf."""
        low = self.in_fp32 if low_precision is None else low_precision
        return self.op("IsInf", [self.op("Cast", [x], {"to": ir.DataType.FLOAT}) if low else x])

    def term(self, m) -> ir.Value:
        """An additive term of the site's scores, negated where the scores subtract it."""
        x = self.value(m)
        return self.op("Neg", [x]) if m.name in self.site.negated_terms else x

    def weight(self, suffix: str, array: np.ndarray) -> ir.Value:
        """`initializer`, reusing the site's weight of that name where it holds the same
        values (a site lowered again keeps its sink logits under one name)."""
        old = self.model.graph.initializers.get(param_name(self.site.id, suffix))
        if old is None:
            return self.initializer(suffix, array)
        if old.const_value is not None and np.array_equal(old.const_value.numpy(), np.asarray(array, np.float32)):
            return old
        return self.const(np.asarray(array, np.float32))

    def ensure_opset(self, domain: str, version: int) -> None:
        """The model (and the function the site is in) imports `domain` at `version` or later."""
        ensure_opset(self.model, domain, version)
        if self.function is not None and self.function.opset_imports.get(domain, -1) < version:
            self.function.opset_imports[domain] = version

    def ints(self, *values: int) -> ir.Value:
        return self.const(np.asarray(values, dtype=np.int64))

    def bhsd(self, operand: Operand) -> ir.Value:
        """The operand as [B, H, S, D] (one Transpose where its layout differs)."""
        v = self.value(operand.value)
        if operand.packed:
            raise ValueError("packed [B, S, H*D] operand")
        v = self.op("Transpose", [v], {"perm": list(operand.perm)}) if operand.perm else v
        if operand.factor is not None:  # a per-head score factor (cosine attention's temperature) folded into Q
            v = self.op("Mul", [v, self.value(operand.factor)])
        if operand.streams:  # [B, N, H, S, D] -> [B*N, H, S, D]
            rest = self.op("Slice", [self.op("Shape", [v]), self.ints(2), self.ints(5), self.ints(0)])
            v = self.op("Reshape", [v, self.op("Concat", [self.ints(-1), rest], {"axis": 0})])
        return self.unfold(v, operand.fold) if operand.fold else v

    def outward(self, x: ir.Value) -> ir.Value:
        """A [B, H, S, dv] result in the site's output layout: heads folded back into the
        batch ([B*H, S, dv]) or the streams split out of it ([B, N, H, S, dv])."""
        if self.site.q.fold:
            return self.fold(x)
        if self.site.q.streams:
            rest = self.op("Slice", [self.op("Shape", [x]), self.ints(1), self.ints(4), self.ints(0)])
            return self.op("Reshape", [x, self.op("Concat", [self.ints(-1, self.site.q.streams), rest], {"axis": 0})])
        return x

    def shape_dim(self, value: ir.Value, axis: int) -> ir.Value:
        """Size of one axis as a 1-element int64 tensor (Shape then Gather: valid at every
        opset, where Shape's start/end need opset 15)."""
        return self.op("Gather", [self.op("Shape", [value]), self.ints(axis)], {"axis": 0})

    def commit(self, new_output: ir.Value, folded: bool = False) -> None:
        """Insert the new nodes after the site's last node and use `new_output` for its output
        (a heads-in-batch site's output goes back to [B*H, Tq, dv] unless already `folded`)."""
        if not folded:
            new_output = self.outward(new_output)
        self.commit_value(self.site.output.native, new_output)

    def commit_output(self, old: ir.Value, new_output: ir.Value, shape: ir.Shape | None = None) -> None:
        """Insert the new nodes after `old`'s producer and return `new_output` (of `shape`,
        default `old`'s) as the graph output `old` was, under its name; `old`'s other uses stay."""
        graph = self.graph
        old.producer().graph.insert_after(old.producer(), self.nodes)
        i = next(i for i, v in enumerate(graph.outputs) if v is old)
        name = old.name
        old.name = f"{name}__full"
        new_output.name, new_output.type = name, old.type
        new_output.shape = shape if shape is not None else old.shape
        graph.outputs[i] = new_output

    def replace_output(self, name: str, new_output: ir.Value) -> None:
        """`new_output` (computed by nodes already inserted) becomes the graph output `name`."""
        graph = self.graph
        i = next(i for i, v in enumerate(graph.outputs) if v.name == name)
        old = graph.outputs[i]
        old.name = f"{name}__replaced"
        new_output.name, new_output.type, new_output.shape = name, old.type, old.shape
        graph.outputs[i] = new_output

    def commit_value(self, old: ir.Value, new_output: ir.Value) -> None:
        """Insert the new nodes after `old`'s producer and use `new_output` in its place."""
        anchor = old.producer()
        anchor.graph.insert_after(anchor, self.nodes)
        was_output = old.is_graph_output()
        name = old.name
        ours = {id(n) for n in self.nodes}
        keep = [(u.node, u.idx) for u in old.uses() if id(u.node) in ours]  # e.g. a gate reading O
        old.replace_all_uses_with(new_output, replace_graph_outputs=True)
        for node, idx in keep:
            node.replace_input_with(idx, old)
        if old.type is not None and new_output.type is None:
            new_output.type = old.type
        if was_output:  # a graph output (or a branch's, which its If declares) keeps its name, type and shape
            old.name = f"{name}__replaced"
            new_output.name, new_output.type = name, old.type
            if old.shape is not None:
                new_output.shape = old.shape


def _attrs(attrs: dict) -> list:
    out = []
    for k, v in attrs.items():
        if v is None:
            continue
        out.append(ir.Attr(k, ir.AttributeType.TENSOR, v) if isinstance(v, ir.TensorProtocol)
                   else ir.convenience.convert_attribute(k, v))
    return out


def find_node(model: ir.Model, name: str) -> ir.Node | None:
    """The node called `name`, in the model's graph, a subgraph or a function body."""
    for body in [model.graph, *model.functions.values()]:
        for n in ir.traversal.RecursiveGraphIterator(body):
            if n.name == name:
                return n
    return None


def ensure_opset(model: ir.Model, domain: str, version: int) -> None:
    have = model.opset_imports.get(domain)
    if have is None or have < version:
        model.opset_imports[domain] = version
        model.graph.opset_imports[domain] = version


def sweep(model: ir.Model) -> None:
    RemoveUnusedNodesPass()(model)
    RemoveUnusedOpsetsPass()(model)
