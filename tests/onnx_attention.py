"""Hand-built single-attention ONNX models and an independent NumPy reference.

The model's inputs are Q, K, V (and a mask), so a test can feed exactly the tensors the
reference formula gets: MatMul(Q, Kᵀ) → Mul(scale) → Add(mask) → Softmax → MatMul(V),
with repeat_kv (Unsqueeze → Expand → Reshape) for GQA.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT


def attention_model(b=2, h=4, kvh=4, t=37, d=8, mask: str | None = "padding", causal=False,
                    dynamic=False) -> onnx.ModelProto:
    """mask: None, "padding" ([B,1,1,T] additive), "full" ([B,1,T,T] additive) or "bool" ([B,1,1,T])."""
    T = "T" if dynamic else t
    B = "B" if dynamic else b
    inputs = [helper.make_tensor_value_info("q", F, [B, h, T, d]),
              helper.make_tensor_value_info("k", F, [B, kvh, T, d]),
              helper.make_tensor_value_info("v", F, [B, kvh, T, d])]
    nodes, inits = [], [numpy_helper.from_array(np.float32(d ** -0.5), "scale")]
    k, v = "k", "v"
    if kvh != h:
        g = h // kvh
        inits += [numpy_helper.from_array(np.array([2], np.int64), "ax2"),
                  numpy_helper.from_array(np.array([1, 1, g, 1, 1], np.int64), "rep"),
                  numpy_helper.from_array(np.array([0, h, -1, d], np.int64), "bhsd")]
        for name in ("k", "v"):
            nodes += [helper.make_node("Unsqueeze", [name, "ax2"], [f"{name}5"]),
                      helper.make_node("Tile", [f"{name}5", "rep"], [f"{name}_tiled"]),
                      helper.make_node("Reshape", [f"{name}_tiled", "bhsd"], [f"{name}r"])]
        k, v = "kr", "vr"
    nodes += [helper.make_node("Transpose", [k], ["kt"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["q", "kt"], ["qk"]),
              helper.make_node("Mul", ["qk", "scale"], ["s"])]
    scores = "s"
    if mask in ("padding", "full"):
        shape = [B, 1, 1, T] if mask == "padding" else [B, 1, T, T]
        inputs.append(helper.make_tensor_value_info("mask", F, shape))
        nodes.append(helper.make_node("Add", [scores, "mask"], ["sm"]))
        scores = "sm"
    elif mask == "bool":
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.BOOL, [B, 1, 1, T]))
        inits.append(numpy_helper.from_array(np.float32(np.finfo(np.float32).min), "fill"))
        nodes.append(helper.make_node("Where", ["mask", scores, "fill"], ["sm"]))
        scores = "sm"
    if causal:
        tri = np.triu(np.full((t, t), np.finfo(np.float32).min, np.float32), 1)
        inits.append(numpy_helper.from_array(tri, "causal"))
        nodes.append(helper.make_node("Add", [scores, "causal"], ["sc"]))
        scores = "sc"
    nodes += [helper.make_node("Softmax", [scores], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", v], ["o"])]
    out = helper.make_tensor_value_info("o", F, [B, h, T, d])
    graph = helper.make_graph(nodes, "attention", inputs, [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def feeds(b=2, h=4, kvh=4, t=37, d=8, mask="padding", pad=5, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    f = {"q": rng.standard_normal((b, h, t, d)).astype(np.float32),
         "k": rng.standard_normal((b, kvh, t, d)).astype(np.float32),
         "v": rng.standard_normal((b, kvh, t, d)).astype(np.float32)}
    keep = np.ones((b, t), bool)
    keep[-1, t - pad:] = False  # the last row is padded
    if mask == "padding":
        f["mask"] = np.where(keep, 0, np.finfo(np.float32).min).astype(np.float32)[:, None, None, :]
    elif mask == "full":
        bias = rng.standard_normal((b, 1, t, t)).astype(np.float32)
        f["mask"] = np.where(keep[:, None, None, :], bias, np.finfo(np.float32).min).astype(np.float32)
    elif mask == "bool":
        f["mask"] = keep[:, None, None, :]
    return f


def reference(f: dict, visible: np.ndarray | bool = True, causal=False, normalise=None) -> np.ndarray:
    """`normalise` (default softmax) over the keys each row may see (pattern ∧ mask); a row
    that sees none gives 0. GQA repeats K/V to the query heads."""
    q, k, v = (f[x].astype(np.float64) for x in "qkv")
    g = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    s = q @ k.transpose(0, 1, 3, 2) * q.shape[-1] ** -0.5
    t = q.shape[2]
    vis = np.broadcast_to(visible, s.shape).copy()
    m = f.get("mask")
    if m is not None and m.dtype == bool:
        vis &= m
    elif m is not None:
        s = s + m
        vis &= m > -1e4
    if causal:
        vis &= np.tril(np.ones((t, t), bool))
    from attn_opt.patterns import reference as forms

    p = (normalise or forms.softmax)(s, vis)
    return p @ v


# ---- attention inside local functions and control flow (If, Loop, Scan) ----------------------

MIN = float(np.finfo(np.float32).min)


def eager_nodes(p: str, q: str, k: str, v: str, out: str, d: int, bias: str | None = None,
                causal: int | None = None, div: bool = False) -> list[onnx.NodeProto]:
    """Eager attention as nodes named with prefix `p`: Transpose(K), MatMul, Mul (or Div)
    by the scale, + `bias`, + a constant causal mask of `causal` positions, Softmax,
    MatMul. Constants are Constant nodes, so the nodes fit in a function body or a branch."""
    c = helper.make_node
    scale = np.float32(d ** 0.5 if div else d ** -0.5)
    nodes = [c("Constant", [], [f"{p}_scale"], name=f"{p}_scale_c", value=numpy_helper.from_array(scale)),
             c("Transpose", [k], [f"{p}_kt"], name=f"{p}_kt", perm=[0, 1, 3, 2]),
             c("MatMul", [q, f"{p}_kt"], [f"{p}_qk"], name=f"{p}_qk"),
             c("Div" if div else "Mul", [f"{p}_qk", f"{p}_scale"], [f"{p}_s"], name=f"{p}_s")]
    s = f"{p}_s"
    if bias is not None:
        nodes.append(c("Add", [s, bias], [f"{p}_sb"], name=f"{p}_sb"))
        s = f"{p}_sb"
    if causal is not None:
        tri = np.triu(np.full((causal, causal), MIN, np.float32), 1)
        nodes += [c("Constant", [], [f"{p}_tri"], name=f"{p}_tri_c", value=numpy_helper.from_array(tri)),
                  c("Add", [s, f"{p}_tri"], [f"{p}_sc"], name=f"{p}_sc")]
        s = f"{p}_sc"
    return nodes + [c("Softmax", [s], [f"{p}_p"], name=f"{p}_softmax", axis=-1),
                    c("MatMul", [f"{p}_p", v], [out], name=f"{p}_pv")]


def _bias_nodes(mask: str, out: str) -> list[onnx.NodeProto]:
    """An int64 padding mask [B, T] as HF's additive bias [B, 1, 1, T] (0 kept, MIN hidden)."""
    c = helper.make_node
    const = lambda n, a: c("Constant", [], [n], name=n, value=numpy_helper.from_array(a))  # noqa: E731
    return [const("one", np.float32(1)), const("lowest", np.float32(MIN)), const("axes12", np.array([1, 2], np.int64)),
            c("Cast", [mask], ["maskf"], name="maskf", to=F), c("Sub", ["one", "maskf"], ["inv"], name="inv"),
            c("Mul", ["inv", "lowest"], ["bias2"], name="bias2"),
            c("Unsqueeze", ["bias2", "axes12"], [out], name="bias")]


def control_flow_model(b=2, h=4, t=12, d=8) -> onnx.ModelProto:
    """Attention in every place the top-level graph does not show it:
    - function `custom.Attn(q, k, v, bias)`, called twice (o1 = Attn(q), o1b = Attn(o1));
    - `If` named `pad_if` on "no row is padded": then a causal site, else a padded site
      scaled by Div (the padded fidelity inputs take the else branch);
    - `Loop` named `loop`, 2 iterations: x <- attention(x, k, v) from x = q;
    - `Scan` named `scan` over [q, 2q]: each slice's attention, summed in its state.
    Inputs q, k, v [B, H, T, D] and attention_mask [B, T] (int64)."""
    c = helper.make_node
    vi = helper.make_tensor_value_info
    bhtd = [b, h, t, d]
    fn = helper.make_function("custom", "Attn", ["q", "k", "v", "bias"], ["o"],
                              eager_nodes("fa", "q", "k", "v", "o", d, bias="bias"),
                              [helper.make_opsetid("", 17)])
    then_g = helper.make_graph(eager_nodes("then", "q", "k", "v", "o2_then", d, causal=t), "then",
                               [], [vi("o2_then", F, bhtd)])
    else_g = helper.make_graph(eager_nodes("else", "q", "k", "v", "o2_else", d, bias="bias", div=True), "else",
                               [], [vi("o2_else", F, bhtd)])
    body = helper.make_graph(
        eager_nodes("loop", "x_in", "k", "v", "x_out", d, bias="bias")
        + [c("Identity", ["c_in"], ["c_out"], name="c_id")],
        "loop_body", [vi("i", TensorProto.INT64, []), vi("c_in", TensorProto.BOOL, []), vi("x_in", F, bhtd)],
        [vi("c_out", TensorProto.BOOL, []), vi("x_out", F, bhtd)])
    scan_body = helper.make_graph(
        eager_nodes("scan", "qi", "k", "v", "oi", d, bias="bias")
        + [c("Add", ["acc_in", "oi"], ["acc_out"], name="acc")],
        "scan_body", [vi("acc_in", F, bhtd), vi("qi", F, bhtd)], [vi("acc_out", F, bhtd), vi("oi", F, bhtd)])
    const = lambda n, a: c("Constant", [], [n], name=n, value=numpy_helper.from_array(a))  # noqa: E731
    nodes = _bias_nodes("attention_mask", "bias") + [
        c("Attn", ["q", "k", "v", "bias"], ["o1"], name="attn_call0", domain="custom"),
        c("Attn", ["o1", "k", "v", "bias"], ["o1b"], name="attn_call1", domain="custom"),
        c("ReduceMin", ["attention_mask"], ["min_mask"], name="min_mask", keepdims=0),
        const("zero", np.int64(0)), c("Greater", ["min_mask", "zero"], ["no_pad"], name="no_pad"),
        c("If", ["no_pad"], ["o2"], name="pad_if", then_branch=then_g, else_branch=else_g),
        const("trips", np.int64(2)), const("true", np.bool_(True)),
        c("Loop", ["trips", "true", "q"], ["o3"], name="loop", body=body),
        const("two", np.float32(2)), const("ax0", np.array([0], np.int64)),
        c("Mul", ["q", "two"], ["q2"], name="q2"), c("Unsqueeze", ["q", "ax0"], ["qa"], name="qa"),
        c("Unsqueeze", ["q2", "ax0"], ["qb"], name="qb"), c("Concat", ["qa", "qb"], ["qs"], name="qs", axis=0),
        c("ConstantOfShape", [c_shape := "shape_q"], ["acc0"], name="acc0",
          value=numpy_helper.from_array(np.zeros(1, np.float32))),
        c("Scan", ["acc0", "qs"], ["acc", "os"], name="scan", body=scan_body, num_scan_inputs=1)]
    nodes.insert(len(_bias_nodes("attention_mask", "bias")), c("Shape", ["q"], [c_shape], name="shape_q"))
    inputs = [vi(n, F, bhtd) for n in "qkv"] + [vi("attention_mask", TensorProto.INT64, [b, t])]
    outputs = [vi("o1b", F, bhtd), vi("o2", F, bhtd), vi("o3", F, bhtd), vi("acc", F, bhtd),
               vi("os", F, [2] + bhtd)]
    graph = helper.make_graph(nodes, "control_flow", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)],
                              functions=[fn])
    onnx.checker.check_model(model, full_check=True)
    return model


def merged_decoder_model(h=2, d=8, vocab=50, seed=0) -> onnx.ModelProto:
    """A one-layer decoder step in the shape of Hugging Face Optimum's older
    decoder_model_merged.onnx: If(use_cache_branch) between the cached steps (then: K/V =
    Concat(past, new), returned as present) and the first step (else: no past read; present
    = the new K/V). Inputs input_ids [B, S], attention_mask [B, P+S], past_key_values.0.key
    and .value [B, H, P, D], use_cache_branch [1]; outputs logits and the present cache.
    Weights are top-level initializers both branches read."""
    c = helper.make_node
    vi = helper.make_tensor_value_info
    rng = np.random.default_rng(seed)
    e = h * d
    w = lambda n, *s: numpy_helper.from_array((rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32), n)  # noqa
    inits = [w("emb", vocab, e), w("wq", e, e), w("wk", e, e), w("wv", e, e), w("wo", e, e), w("lm", e, vocab),
             numpy_helper.from_array(np.array([0, 0, h, d], np.int64), "heads_shape"),
             numpy_helper.from_array(np.array([0, 0, e], np.int64), "merge_shape")]

    def branch(p: str, cached: bool) -> onnx.GraphProto:
        const = lambda n, a: c("Constant", [], [f"{p}_{n}"], name=f"{p}_{n}", value=numpy_helper.from_array(a))  # noqa
        nodes = [c("Gather", ["emb", "input_ids"], [f"{p}_x"], name=f"{p}_embed")]
        for t in "qkv":
            nodes += [c("MatMul", [f"{p}_x", f"w{t}"], [f"{p}_{t}2"], name=f"{p}_{t}_proj"),
                      c("Reshape", [f"{p}_{t}2", "heads_shape"], [f"{p}_{t}3"], name=f"{p}_{t}_heads"),
                      c("Transpose", [f"{p}_{t}3"], [f"{p}_{t}_new" if t != "q" else f"{p}_q"], name=f"{p}_{t}_t",
                        perm=[0, 2, 1, 3])]
        if cached:
            nodes += [c("Concat", ["past_key_values.0.key", f"{p}_k_new"], [f"{p}_k"], name=f"{p}_cat_k", axis=2),
                      c("Concat", ["past_key_values.0.value", f"{p}_v_new"], [f"{p}_v"], name=f"{p}_cat_v", axis=2)]
        else:
            nodes += [c("Identity", [f"{p}_k_new"], [f"{p}_k"], name=f"{p}_k_id"),
                      c("Identity", [f"{p}_v_new"], [f"{p}_v"], name=f"{p}_v_id")]
        # bias [B, 1, S, T]: the padding mask over the T keys (the last T of attention_mask) and causal
        nodes += [const("zero", np.int64(0)), const("one", np.int64(1)), const("ax1", np.array([1], np.int64)),
                  const("lowest", np.float32(MIN)), const("f0", np.float32(0)), const("neg1", np.array([-1], np.int64)),
                  const("big", np.array([2 ** 62], np.int64)), const("axes12", np.array([1, 2], np.int64)),
                  const("two", np.int64(2)), const("zero_ax", np.array([0], np.int64)),
                  c("Shape", [f"{p}_k"], [f"{p}_kshape"], name=f"{p}_kshape"),
                  c("Gather", [f"{p}_kshape", f"{p}_two"], [f"{p}_t"], name=f"{p}_t", axis=0),
                  c("Shape", ["input_ids"], [f"{p}_ishape"], name=f"{p}_ishape"),
                  c("Gather", [f"{p}_ishape", f"{p}_one"], [f"{p}_slen"], name=f"{p}_slen", axis=0),
                  c("Sub", [f"{p}_t", f"{p}_slen"], [f"{p}_past"], name=f"{p}_past"),
                  c("Range", [f"{p}_past", f"{p}_t", f"{p}_one"], [f"{p}_qpos"], name=f"{p}_qpos"),
                  c("Range", [f"{p}_zero", f"{p}_t", f"{p}_one"], [f"{p}_kpos"], name=f"{p}_kpos"),
                  c("Unsqueeze", [f"{p}_qpos", f"{p}_ax1"], [f"{p}_qcol"], name=f"{p}_qcol"),
                  c("Greater", [f"{p}_kpos", f"{p}_qcol"], [f"{p}_future"], name=f"{p}_future"),
                  c("Unsqueeze", [f"{p}_t", f"{p}_zero_ax"], [f"{p}_t1"], name=f"{p}_t1"),
                  c("Neg", [f"{p}_t1"], [f"{p}_negt"], name=f"{p}_negt"),
                  c("Slice", ["attention_mask", f"{p}_negt", f"{p}_big", f"{p}_ax1"], [f"{p}_m"], name=f"{p}_m"),
                  c("Cast", [f"{p}_m"], [f"{p}_mb"], name=f"{p}_mb", to=TensorProto.BOOL),
                  c("Not", [f"{p}_mb"], [f"{p}_pad"], name=f"{p}_pad"),
                  c("Unsqueeze", [f"{p}_pad", f"{p}_axes12"], [f"{p}_pad4"], name=f"{p}_pad4"),
                  c("Or", [f"{p}_pad4", f"{p}_future"], [f"{p}_hidden"], name=f"{p}_hidden"),
                  c("Where", [f"{p}_hidden", f"{p}_lowest", f"{p}_f0"], [f"{p}_bias"], name=f"{p}_bias")]
        nodes += eager_nodes(p, f"{p}_q", f"{p}_k", f"{p}_v", f"{p}_o", d, bias=f"{p}_bias")
        nodes += [c("Transpose", [f"{p}_o"], [f"{p}_ot"], name=f"{p}_ot", perm=[0, 2, 1, 3]),
                  c("Reshape", [f"{p}_ot", "merge_shape"], [f"{p}_om"], name=f"{p}_om"),
                  c("MatMul", [f"{p}_om", "wo"], [f"{p}_h"], name=f"{p}_o_proj"),
                  c("Add", [f"{p}_x", f"{p}_h"], [f"{p}_res"], name=f"{p}_res"),
                  c("MatMul", [f"{p}_res", "lm"], [f"{p}_logits"], name=f"{p}_lm_head")]
        outs = [vi(f"{p}_logits", F, ["B", "S", vocab]), vi(f"{p}_k", F, ["B", h, "T", d]),
                vi(f"{p}_v", F, ["B", h, "T", d])]
        return helper.make_graph(nodes, p, [], outs)

    inputs = [vi("input_ids", TensorProto.INT64, ["B", "S"]), vi("attention_mask", TensorProto.INT64, ["B", "T"]),
              vi("past_key_values.0.key", F, ["B", h, "P", d]), vi("past_key_values.0.value", F, ["B", h, "P", d]),
              vi("use_cache_branch", TensorProto.BOOL, [1])]
    outputs = [vi("logits", F, ["B", "S", vocab]), vi("present.0.key", F, ["B", h, "T", d]),
               vi("present.0.value", F, ["B", h, "T", d])]
    node = c("If", ["use_cache_branch"], ["logits", "present.0.key", "present.0.value"], name="optimum::if",
             then_branch=branch("with_past", True), else_branch=branch("no_past", False))
    graph = helper.make_graph([node], "decoder_model_merged", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def scaled_function_model(scales=(0.35, 0.7), b=2, h=4, t=12, d=8, ref_attr: bool = False) -> onnx.ModelProto:
    """Function `custom.Scaled` whose scale comes from the call: a formal input (one call
    per entry of `scales`), or with `ref_attr` its attribute `scale` (read by a Constant
    node through ref_attr_name). Calls with different scales disagree on the site."""
    c = helper.make_node
    vi = helper.make_tensor_value_info
    nodes = [c("Transpose", ["k"], ["kt"], name="kt", perm=[0, 1, 3, 2]), c("MatMul", ["q", "kt"], ["qk"], name="qk")]
    if ref_attr:
        const = c("Constant", [], ["s"], name="s_const")
        const.attribute.append(onnx.AttributeProto(name="value_float", ref_attr_name="scale",
                                                   type=onnx.AttributeProto.FLOAT))
        nodes.append(const)
    nodes += [c("Mul", ["qk", "s"], ["sc"], name="scale"), c("Softmax", ["sc"], ["p"], name="softmax", axis=-1),
              c("MatMul", ["p", "v"], ["o"], name="pv")]
    fn = helper.make_function("custom", "Scaled", ["q", "k", "v"] + ([] if ref_attr else ["s"]), ["o"], nodes,
                              [helper.make_opsetid("", 17)], attributes=["scale"] if ref_attr else [])
    top, outs = [], []
    for i, s in enumerate(scales):
        if ref_attr:
            top.append(c("Scaled", ["q", "k", "v"], [f"o{i}"], name=f"call{i}", domain="custom", scale=float(s)))
        else:
            top += [c("Constant", [], [f"s{i}"], name=f"s{i}", value=numpy_helper.from_array(np.float32(s))),
                    c("Scaled", ["q", "k", "v", f"s{i}"], [f"o{i}"], name=f"call{i}", domain="custom")]
        outs.append(vi(f"o{i}", F, [b, h, t, d]))
    graph = helper.make_graph(top, "scaled", [vi(n, F, [b, h, t, d]) for n in "qkv"], outs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)],
                              functions=[fn])
    onnx.checker.check_model(model, full_check=True)
    return model


def twin_branches_model(b=2, h=4, t=12, d=8, classifier: bool = False) -> onnx.ModelProto:
    """If(cond) whose two branches reuse the same node and value names (ONNX allows it in
    sibling graphs); with `classifier`, each branch is a softmax over a class axis instead
    (not attention: a near miss, inside a branch)."""
    vi = helper.make_tensor_value_info
    if classifier:
        body = [helper.make_node("Softmax", ["q"], ["o"], name="cls", axis=1)]
    else:
        body = eager_nodes("att", "q", "k", "v", "o", d)
    then_g = helper.make_graph(body, "then", [], [vi("o", F, [b, h, t, d])])
    else_g = helper.make_graph([onnx.NodeProto().__class__.FromString(n.SerializeToString()) for n in body], "else",
                               [], [vi("o", F, [b, h, t, d])])
    graph = helper.make_graph([helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)],
                              "twins", [vi(n, F, [b, h, t, d]) for n in "qkv"] + [vi("cond", TensorProto.BOOL, [])],
                              [vi("y", F, [b, h, t, d])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def nested_model(b=2, h=4, t=12, d=8) -> onnx.ModelProto:
    """Regions inside regions: Loop `loop` (2 iterations, x <- ...) whose body holds If
    `inner_if` on a captured condition: then calls function `custom.Attn(x, k, v)`, else
    is an eager site. Inputs q, k, v [B, H, T, D] and flag (bool)."""
    c = helper.make_node
    vi = helper.make_tensor_value_info
    bhtd = [b, h, t, d]
    fn = helper.make_function("custom", "Attn", ["q", "k", "v"], ["o"], eager_nodes("fa", "q", "k", "v", "o", d),
                              [helper.make_opsetid("", 17)])
    then_g = helper.make_graph([c("Attn", ["x_in", "k", "v"], ["y_then"], name="call", domain="custom")], "then", [],
                               [vi("y_then", F, bhtd)])
    else_g = helper.make_graph(eager_nodes("in_else", "x_in", "k", "v", "y_else", d), "else", [],
                               [vi("y_else", F, bhtd)])
    body = helper.make_graph(
        [c("If", ["flag"], ["x_out"], name="inner_if", then_branch=then_g, else_branch=else_g),
         c("Identity", ["c_in"], ["c_out"], name="c_id")],
        "body", [vi("i", TensorProto.INT64, []), vi("c_in", TensorProto.BOOL, []), vi("x_in", F, bhtd)],
        [vi("c_out", TensorProto.BOOL, []), vi("x_out", F, bhtd)])
    nodes = [c("Constant", [], ["trips"], name="trips", value=numpy_helper.from_array(np.int64(2))),
             c("Loop", ["trips", "", "q"], ["y"], name="loop", body=body)]
    graph = helper.make_graph(nodes, "nested", [vi(n, F, bhtd) for n in "qkv"] + [vi("flag", TensorProto.BOOL, [])],
                              [vi("y", F, bhtd)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)],
                              functions=[fn])
    onnx.checker.check_model(model, full_check=True)
    return model
