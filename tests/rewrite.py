"""One pass through the pipeline without a fidelity run, for tests that look at the
rewritten graph itself: (model, rewritten ids, skipped, notes)."""

from __future__ import annotations

import attn_opt


def apply_pass(model, p, feeds=None):
    out, report = attn_opt.optimize(model, [p], feeds=feeds, check="none", force=True)
    rep = report.passes[0]
    return out, rep.sites_rewritten, rep.sites_skipped, rep.notes
