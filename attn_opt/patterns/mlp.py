"""Feed-forward (MLP) sub-blocks found by graph regions, not by names: what
`mlpfree:drop_mlp=true` removes."""

from __future__ import annotations

from attn_opt.patterns.layout import weight_like

ACTIVATIONS = {"Gelu", "Relu", "Erf", "Sigmoid", "Tanh", "Softplus", "FastGelu", "BiasGelu", "QuickGelu", "HardSigmoid",
               "Elu", "LeakyRelu", "Mish", "Silu", "Swish"}


def mlp_blocks(gv) -> list[tuple]:
    """Feed-forward sub-blocks as (residual Add, its skip input x, region of nodes):
    the region between x and the Add's other input holds two or more weight products
    and an activation, no softmax, and is left only through that input (single exit)."""
    import networkx as nx

    g = nx.DiGraph()
    for n in gv.nodes:
        g.add_node(id(n))
        for v in n.inputs:
            if v is not None and v.producer is not None:
                g.add_edge(id(v.producer), id(n))
    by_id = {id(n): n for n in gv.nodes}
    blocks = []
    for add in gv.nodes:
        if add.op != "Add" or len(add.inputs) != 2 or any(i is None or i.const is not None for i in add.inputs):
            continue
        for x, y in (add.inputs, add.inputs[::-1]):
            yp = y.producer
            if yp is None:
                continue
            starts = {id(u) for u in x.users if u is not add}
            reach = set(starts)
            for s_ in starts:
                reach |= nx.descendants(g, s_)
            region = (nx.ancestors(g, id(yp)) | {id(yp)}) & reach
            nodes = [by_id[i] for i in region]
            if not nodes or any(n.op == "Softmax" for n in nodes):
                continue
            inside = {id(v) for n in nodes for v in n.outputs}
            closed_in = all(v is None or v is x or v.const is not None or id(v) in inside or weight_like(v)
                            or v.dtype in ("int64", "int32")  # shape data computed elsewhere (dynamo exports)
                            for n in nodes for v in n.inputs)
            def users(v):  # torch.export's metadata assertions are not uses
                return [u for u in v.users if u.op != "Assert"]

            single_exit = all(all(id(u) in region for u in users(v)) or v is y
                              for n in nodes for v in n.outputs) and all(u is add for u in users(y))
            products = sum(n.op in ("MatMul", "Gemm", "Linear") and any(weight_like(i) for i in n.inputs[1:]) for n in nodes)
            if closed_in and single_exit and products >= 2 and any(n.op in ACTIVATIONS for n in nodes):
                blocks.append((add, x, nodes))
                break
    return blocks
