"""The hostile-input fuzzer in CI: mutated protobufs, external-data locations, archive
entries (.npz, .npy, .pt2), option strings and npz headers for a bounded time, in a child
under an address-space limit. Every case must end in exit 0 or one error line (exit 2),
with no traceback, no internal error and its input files unchanged (the fuzzer checks
each); the child's peak RSS stays under 1 GB (os.wait4)."""

from __future__ import annotations

import json

from attn_opt.tools.fuzz_hostile import KINDS
from hostile_run import run_limited

SECONDS = 45  # the child stops starting cases after this; with setup, about a minute in all


def test_hostile_fuzzing_bounded():
    r = run_limited("--seconds", SECONDS, "--seed", 0, module="attn_opt.tools.fuzz_hostile")
    summary = json.loads(r.stdout)
    assert not summary["problems"], json.dumps(summary["problems"][:5], indent=1)
    assert r.rc == 0, r.stderr[-2000:]
    assert set(summary["by_kind"]) == set(KINDS)
    assert all(k["cases"] >= 10 for k in summary["by_kind"].values()), summary["by_kind"]
    assert sum(k["exit 2"] for k in summary["by_kind"].values()) > summary["cases"] // 2  # most were refused
    assert r.peak_rss < 1 << 30, f"peak RSS {r.peak_rss / 2**30:.2f} GB"
