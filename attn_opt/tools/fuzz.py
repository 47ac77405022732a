"""Small attention modules drawn from combinations of what exporters see: head layout
(MHA/GQA/MQA), scale spelling, soft-capping, position-bias terms, mask kinds and heads
folded into the batch. `check(case)` exports one and says whether it is found as one site
with the right heads, causality, scale and soft-cap, and whether `fuse` is exact on every
input set. tests/test_fuzz.py draws cases with hypothesis; benchmarks/fuzz.py runs many.
"""

from __future__ import annotations

import itertools
import math
import tempfile
from pathlib import Path

import torch

T, D, HEAD = 6, 16, 4
SPACE = {
    "heads": [(4, 4), (4, 2), (4, 1), (2, 2)],
    "scale": ["mul", "div", "prescaled", "none"],
    "softcap": [None, 30.0],
    "bias": ["none", "alibi", "relative"],
    "mask": ["none", "additive", "where", "causal", "causal+pad"],
    "layout": ["4d", "3d"],
    "exporter": ["dynamo", "torchscript"],
}


class Fuzzed(torch.nn.Module):
    def __init__(self, heads: int, kv: int, scale: str, softcap: float | None, mask: str, bias: str = "none",
                 layout: str = "4d"):
        super().__init__()
        torch.manual_seed(0)
        self.h, self.kv, self.scale, self.softcap, self.mask = heads, kv, scale, softcap, mask
        self.bias, self.layout = bias, layout
        self.q = torch.nn.Linear(D, heads * HEAD)
        self.k = torch.nn.Linear(D, kv * HEAD)
        self.v = torch.nn.Linear(D, kv * HEAD)
        self.o = torch.nn.Linear(heads * HEAD, D)
        self.rel = torch.nn.Parameter(torch.randn(heads, 2 * T - 1) * 0.5)  # relative position bias per head
        self.register_buffer("slopes", 2.0 ** (-8.0 * torch.arange(1, heads + 1) / heads))  # ALiBi

    def position_bias(self, t: int) -> torch.Tensor:
        """[H, t, t]: ALiBi (slope · (j − i)) or a learned bias by distance."""
        d = torch.arange(t)[None, :] - torch.arange(t)[:, None]
        if self.bias == "alibi":
            return self.slopes[:, None, None] * d[None].float()
        return self.rel[:, (d + T - 1).clamp(0, 2 * T - 2)]

    def forward(self, x, attention_mask):
        pad = attention_mask
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.h, HEAD).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv, HEAD).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv, HEAD).transpose(1, 2)
        if self.kv != self.h:  # repeat_kv as Hugging Face writes it
            k = k[:, :, None].expand(b, self.kv, self.h // self.kv, t, HEAD).reshape(b, self.h, t, HEAD)
            v = v[:, :, None].expand(b, self.kv, self.h // self.kv, t, HEAD).reshape(b, self.h, t, HEAD)
        c = 1 / math.sqrt(HEAD)
        if self.scale == "prescaled":
            q = q * c
        if self.layout == "3d":  # heads folded into the batch, as bmm attention writes it (BLOOM)
            s = torch.bmm(q.reshape(b * self.h, t, HEAD), k.reshape(b * self.h, t, HEAD).transpose(1, 2))
        else:
            s = q @ k.transpose(-1, -2)
        if self.scale == "mul":
            s = s * c
        elif self.scale == "div":
            s = s / math.sqrt(HEAD)
        if self.softcap:
            s = torch.tanh(s / self.softcap) * self.softcap
        if self.bias != "none":
            pb = self.position_bias(t)
            s = s + (pb.repeat(b, 1, 1) if self.layout == "3d" else pb[None])
        s = s.view(b, self.h, t, t)
        keep = pad[:, None, None, :].bool()
        if self.mask in ("causal", "causal+pad"):
            keep = keep & torch.ones(t, t, dtype=torch.bool).tril() if self.mask == "causal+pad" \
                else torch.ones(t, t, dtype=torch.bool).tril()[None, None]
        if self.mask == "additive":
            s = s + (1.0 - pad[:, None, None, :].float()) * torch.finfo(torch.float32).min
        elif self.mask != "none":
            s = s.masked_fill(~keep, -1e9)
        p = torch.softmax(s, -1)
        if self.layout == "3d":
            out = torch.bmm(p.reshape(b * self.h, t, t), v.reshape(b * self.h, t, HEAD)).view(b, self.h, t, HEAD)
        else:
            out = p @ v
        return self.o(out.transpose(1, 2).reshape(b, t, self.h * HEAD))


def all_cases() -> list[dict]:
    return [dict(zip(SPACE, combo)) for combo in itertools.product(*SPACE.values())]


def check(case: dict, folder: str | Path | None = None) -> dict:
    """Export `case`, detect, fuse: {"found", "right" (heads, kv heads, causality, scale,
    soft-cap), "exact" (fuse within 1e-4 on every input set), "problem"}."""
    import attn_opt
    from attn_opt.tools import zoo

    (h, kv), mask = case["heads"], case["mask"]
    model = Fuzzed(h, kv, case["scale"], case["softcap"], mask, case.get("bias", "none"),
                   case.get("layout", "4d")).eval()
    pad = torch.ones(2, T, dtype=torch.long)
    pad[1, -2:] = 0
    args = (torch.randn(2, T, D), pad)
    out = {"found": False, "right": False, "exact": False, "problem": None}
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        path = Path(tmp) / "m.onnx"
        zoo.export_module(model, args, ("x", "attention_mask"), case["exporter"], path)
        sites = attn_opt.inspect(str(path)).sites
        out["found"] = len(sites) == 1
        if not out["found"]:
            out["problem"] = f"{len(sites)} sites"
            return out
        s = sites[0]
        want_scale = 1.0 if case["scale"] in ("none", "prescaled") else 1 / math.sqrt(HEAD)
        got = {"kind": s.kind, "heads": s.heads, "kv": s.kv_heads if case.get("layout", "4d") == "4d" else kv,
               "causal": s.causal, "softcap": s.softcap}
        want = {"kind": "self", "heads": h, "kv": kv, "causal": mask.startswith("causal"), "softcap": case["softcap"]}
        scale_ok = case["scale"] == "prescaled" or math.isclose(s.scale, want_scale, rel_tol=1e-6)
        out["right"] = got == want and scale_ok
        if not out["right"]:
            out["problem"] = f"got {got}, scale {s.scale}; want {want}, scale {want_scale}"
        _, report = attn_opt.optimize(str(path), ["fuse"], force=True)
        p = report.passes[0]
        err = (p.step_fidelity_all or p.step_fidelity).get("max_rel_error")
        out["exact"] = p.sites_rewritten == ["a0"] and err is not None and err <= 1e-4
        if not out["exact"]:
            out["problem"] = (out["problem"] or "") + f" fuse: rewritten {p.sites_rewritten}, error {err}, " \
                f"skipped {[x.reason for x in p.sites_skipped]}"
    return out
