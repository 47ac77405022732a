"""`stream` lowered to a runtime's own windowed op (stream:target=onnx|ort|auto): the
step's attention as one op reading the (capped) past cache, its present outputs capped
at the window as the own lowering caps them (lower.py: cap_cache), so the loop and the
cache are the same whichever op computes the window.

    onnx  ONNX `Attention` (opset 25) with left_window_size = W − 1, right_window_size = 0
    ort   ONNX Runtime's GroupQueryAttention with local_window_size = W (both measured to
          keep the keys j with i − j < W, the query included)
    auto  whichever of the two runs faster in ONNX Runtime at the site's shape (one new
          token after a cache of W positions), said in the report

    ort_window_cache  GroupQueryAttention with sliding_window_cache=1 (the op evicts inside
          a window-sized cache; ort.py: window_cache_attention pads the loop's shorter first
          pasts to the capacity), where the installed ONNX Runtime's schema has it

Neither op has sink tokens (GroupQueryAttention's head_sink is a sink *logit*): these
targets take sinks=0.
"""

from __future__ import annotations

from attn_opt.backends.onnx import ort
from attn_opt.backends.onnx.edit import SiteEdit
from attn_opt.backends.onnx.fused import _with_cache, attention_mask, gqa_step_reason
from attn_opt.patterns.form import StreamCache

TARGETS = ("onnx", "ort")


def op_reason(site, stream: StreamCache, target: str) -> str | None:
    """Why `target`'s windowed op cannot compute this stream form, or None."""
    if stream.sinks:
        return f"sinks={stream.sinks}: neither windowed op keeps sink tokens (give sinks=0, or target=own)"
    if target in ("ort", "ort_window_cache") and (why := gqa_step_reason(site)) is not None:
        return f"not GroupQueryAttention: {why}"
    if target == "ort_window_cache" and not ort.has_attribute("GroupQueryAttention", "sliding_window_cache"):
        return (f"the installed onnxruntime {ort.ort_version()}'s GroupQueryAttention has no sliding_window_cache "
                "(use target=ort: a capped cache around the op)")
    if any(op.perm or op.packed or op.fold for op in (site.k, site.v)) or site.cache is None:
        return "its K/V are not Concat(past input, new) in [B, H, S, D] layout"
    if site.normaliser.calibrated or site.normaliser.kind != "softmax":
        return f"{site.normaliser.describe()}: the windowed ops compute softmax"
    if stream.rotary is not None:
        return "positions=cache scores sinks at cache positions; the windowed ops do not"
    return None


def choose(site, stream: StreamCache, target: str) -> tuple[str, str]:
    """("onnx" | "ort", why) for stream:target=`target` (onnx, ort or auto)."""
    if target != "auto":
        return target, "asked for"
    fit = [t for t in TARGETS if op_reason(site, stream, t) is None]
    if len(fit) == 1:
        return fit[0], f"the only windowed op that fits ({op_reason(site, stream, TARGETS[fit[0] == 'onnx'])})"
    b, h, _, _, d = site.run_shape or (1, site.heads, 1, 1, site.head_dim)
    return ort.fastest_window(b, h, site.kv_heads, stream.window, d, stream.window)


def emit_stream_op(e: SiteEdit, stream: StreamCache, target: str, cap) -> str:
    """The step's attention as the chosen windowed op; `cap` caps the present outputs."""
    s = e.site
    choice, why = choose(s, stream, target)
    q = e.bhsd(s.q)
    mask, _ = attention_mask(e, s, q)
    cached = _with_cache(e, s)
    if choice == "ort_window_cache":  # the op keeps the window itself: nothing to cap after it
        y, present_k, present_v = ort.window_cache_attention(e, s, q, cached, mask, stream.window)
        e.commit(y)
        e.replace_output(s.cache.present_key, present_k)
        e.replace_output(s.cache.present_value, present_v)
        return (f"GroupQueryAttention (com.microsoft) local_window_size={stream.window}, sliding_window_cache=1: "
                f"its own window-sized cache ({why})")
    if choice == "ort":
        y, present_k, present_v = ort.group_query_attention(e, s, q, cached, mask, window=stream.window)
        what = f"GroupQueryAttention (com.microsoft) local_window_size={stream.window}"
    else:
        e.ensure_opset("", 25)
        k_new, v_new, past_k, past_v = cached
        attrs = {"scale": float(s.scale), "left_window_size": stream.window - 1, "right_window_size": 0}
        if s.softcap:
            attrs["softcap"] = float(s.softcap)
        y, present_k, present_v = e.op("Attention", [q, k_new, v_new, mask, past_k, past_v], attrs, outputs=3)
        what = f"Attention (opset 25) left_window_size={stream.window - 1}, right_window_size=0"
    e.commit(y)
    e.replace_output(s.cache.present_key, present_k)
    e.replace_output(s.cache.present_value, present_v)
    cap(SiteEdit(e.model, s, e.pass_name, "cache"), stream)
    return f"{what}, its present cache capped at {stream.window}: {why}"
