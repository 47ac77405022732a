"""Fuzzing detection and the exact rewrite: hypothesis draws small attention modules
(tools/fuzz.py) from combinations of head layout (MHA/GQA/MQA), scale spelling, soft-cap,
position-bias terms (ALiBi, a learned relative bias), mask kind, heads folded into the
batch and exporter; each export must be found as one site with the right heads,
causality, scale and soft-cap, and `fuse` must be exact on every input set.
benchmarks/fuzz.py runs the whole space and records the figures."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attn_opt.tools import fuzz

cases = st.fixed_dictionaries({k: st.sampled_from(v) for k, v in fuzz.SPACE.items()})


@settings(max_examples=16, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=cases)
def test_fuzzed_attention_is_found_and_fused_exactly(tmp_path, case):
    got = fuzz.check(case, tmp_path)
    assert got["found"] and got["right"] and got["exact"], (case, got["problem"])
