"""Building rewrites on an onnx_ir model: one `SiteEdit` per site collects the new nodes
(tagged with the site id, so FLOP counts and the diff know them), inserts them after
the site's last node and rewires the site's output; dead nodes go in one sweep."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, RemoveUnusedOpsetsPass

from attn_opt.patterns.site import AttentionSite, Operand
from attn_opt.rewriter.ir.onnx_flops import SITE_TAG

MS = "com.microsoft"


class SiteEdit:
    def __init__(self, model: ir.Model, site: AttentionSite, pass_name: str):
        self.model, self.site, self.pass_name = model, site, pass_name
        self.nodes: list[ir.Node] = []
        self._n = 0
        self.diagnostics = None  # head statistics of this site, for passes that ask for them

    def _name(self, op: str) -> str:
        self._n += 1
        return f"attn_opt/{self.site.id}/{self.pass_name}/{op}_{self._n}"

    def op(self, op_type: str, inputs, attrs: dict | None = None, domain: str = "", outputs: int = 1):
        node = ir.Node(domain, op_type, list(inputs), attributes=_attrs(attrs or {}), num_outputs=outputs,
                       name=self._name(op_type), metadata_props={SITE_TAG: self.site.id, "attn_opt.pass": self.pass_name})
        for i, o in enumerate(node.outputs):
            o.name = f"{node.name}:{i}"
        self.nodes.append(node)
        return node.outputs[0] if outputs == 1 else node.outputs

    def const(self, value, dtype=None) -> ir.Value:
        arr = np.asarray(value, dtype=dtype)
        return self.op("Constant", [], {"value": ir.tensor(arr)})

    def initializer(self, suffix: str, array: np.ndarray) -> ir.Value:
        """A new weight of the model (so it shows in parameter counts and can be trained)."""
        name = f"attn_opt.{self.site.id}.{suffix}"
        v = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.FLOAT),
                     const_value=ir.tensor(np.ascontiguousarray(array, dtype=np.float32), name=name))
        self.model.graph.register_initializer(v)
        return v

    def ints(self, *values: int) -> ir.Value:
        return self.const(np.asarray(values, dtype=np.int64))

    def bhsd(self, operand: Operand) -> ir.Value:
        """The operand as [B, H, S, D] (one Transpose where its layout differs)."""
        v = operand.value.native
        if operand.packed:
            raise ValueError("packed [B, S, H*D] operand")
        return self.op("Transpose", [v], {"perm": list(operand.perm)}) if operand.perm else v

    def shape_dim(self, value: ir.Value, axis: int) -> ir.Value:
        """Size of one axis as a 1-element int64 tensor."""
        return self.op("Shape", [value], {"start": axis, "end": axis + 1 if axis != -1 else None})

    def commit(self, new_output: ir.Value) -> None:
        """Insert the new nodes after the site's last node and use `new_output` for its output."""
        self.commit_value(self.site.output.native, new_output)

    def commit_value(self, old: ir.Value, new_output: ir.Value) -> None:
        """Insert the new nodes after `old`'s producer and use `new_output` in its place."""
        graph = self.model.graph
        anchor = old.producer()
        graph.insert_after(anchor, self.nodes)
        was_output = old.is_graph_output()
        name = old.name
        ours = {id(n) for n in self.nodes}
        keep = [(u.node, u.idx) for u in old.uses() if id(u.node) in ours]  # e.g. a gate reading O
        old.replace_all_uses_with(new_output, replace_graph_outputs=True)
        for node, idx in keep:
            node.replace_input_with(idx, old)
        if was_output:
            old.name = f"{name}__replaced"
            new_output.name = name
        if old.type is not None and new_output.type is None:
            new_output.type = old.type


def _attrs(attrs: dict) -> list:
    out = []
    for k, v in attrs.items():
        if v is None:
            continue
        out.append(ir.Attr(k, ir.AttributeType.TENSOR, v) if isinstance(v, ir.TensorProtocol)
                   else ir.convenience.convert_attribute(k, v))
    return out


def ensure_opset(model: ir.Model, domain: str, version: int) -> None:
    have = model.opset_imports.get(domain)
    if have is None or have < version:
        model.opset_imports[domain] = version
        model.graph.opset_imports[domain] = version


def sweep(model: ir.Model) -> None:
    RemoveUnusedNodesPass()(model)
    RemoveUnusedOpsetsPass()(model)
