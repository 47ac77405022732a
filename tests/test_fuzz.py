"""Fuzzing detection and the exact rewrite: hypothesis draws small attention modules from
combinations of head layout (MHA/GQA/MQA), scale spelling, soft-cap, mask kind and
exporter; each export must be found as one site with the right heads and causality, and
`fuse` must be exact on every input set."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attn_opt
from attn_opt.tools import zoo
from test_pipeline import cli

T, D, HEAD = 6, 16, 4


class Fuzzed(torch.nn.Module):
    def __init__(self, heads: int, kv: int, scale: str, softcap: float | None, mask: str):
        super().__init__()
        torch.manual_seed(0)
        self.h, self.kv, self.scale, self.softcap, self.mask = heads, kv, scale, softcap, mask
        self.q = torch.nn.Linear(D, heads * HEAD)
        self.k = torch.nn.Linear(D, kv * HEAD)
        self.v = torch.nn.Linear(D, kv * HEAD)
        self.o = torch.nn.Linear(heads * HEAD, D)

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
        s = q @ k.transpose(-1, -2)
        if self.scale == "mul":
            s = s * c
        elif self.scale == "div":
            s = s / math.sqrt(HEAD)
        if self.softcap:
            s = torch.tanh(s / self.softcap) * self.softcap
        keep = pad[:, None, None, :].bool()
        if self.mask in ("causal", "causal+pad"):
            keep = keep & torch.ones(t, t, dtype=torch.bool).tril() if self.mask == "causal+pad" \
                else torch.ones(t, t, dtype=torch.bool).tril()[None, None]
        if self.mask == "additive":
            s = s + (1.0 - pad[:, None, None, :].float()) * torch.finfo(torch.float32).min
        elif self.mask != "none":
            s = s.masked_fill(~keep, -1e9)
        p = torch.softmax(s, -1)
        return self.o((p @ v).transpose(1, 2).reshape(b, t, self.h * HEAD))


cases = st.fixed_dictionaries({
    "heads": st.sampled_from([(4, 4), (4, 2), (4, 1), (2, 2)]),
    "scale": st.sampled_from(["mul", "div", "prescaled", "none"]),
    "softcap": st.sampled_from([None, 30.0]),
    "mask": st.sampled_from(["none", "additive", "where", "causal", "causal+pad"]),
    "exporter": st.sampled_from(["dynamo", "torchscript"]),
})


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=cases)
def test_fuzzed_attention_is_found_and_fused_exactly(tmp_path, case):
    (h, kv), mask = case["heads"], case["mask"]
    model = Fuzzed(h, kv, case["scale"], case["softcap"], mask).eval()
    pad = torch.ones(2, T, dtype=torch.long)
    pad[1, -2:] = 0
    args = (torch.randn(2, T, D), pad)
    path = tmp_path / f"m-{abs(hash(json.dumps(case, sort_keys=True)))}.onnx"
    zoo.export_module(model, args, ("x", "attention_mask"), case["exporter"], path)
    sites = attn_opt.inspect(str(path)).sites
    assert len(sites) == 1, case
    s = sites[0]
    assert (s.kind, s.heads, s.kv_heads) == ("self", h, kv), case
    assert s.causal == mask.startswith("causal"), case
    assert s.softcap == case["softcap"], case
    expected_scale = 1.0 if case["scale"] in ("none", "prescaled") else 1 / math.sqrt(HEAD)
    assert s.scale == pytest.approx(expected_scale, rel=1e-6) or case["scale"] == "prescaled", case
    rep = tmp_path / "r.json"
    r = cli(path, "--pass", "fuse", "-o", tmp_path / "o.onnx", "--report", rep)
    assert r.returncode == 0, (case, r.stderr)
    p = json.loads(rep.read_text())["passes"][0]
    assert p["sites_rewritten"] == ["a0"] and p["step_fidelity_all"]["max_rel_error"] <= 1e-4, case
