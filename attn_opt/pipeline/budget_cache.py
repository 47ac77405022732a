"""`--budget cache=F` on a decoder step: per site (layer) and KV group, which keep the full
cache and which stream (sinks + a recent window), for the least change of the step's
teacher-forced log-probabilities within F of the original cache's bytes.

    choices      per site: dense (the full cache), and for each `stream` candidate: every KV group
                 streaming, each group alone streaming (the others `full_heads`), and the k groups
                 whose streaming alone changed the log-probabilities least streaming together
                 (1 < k < groups): DuoAttention's per-head allocation, measured
    measurement  each choice lowered at its site alone on a copy of the step, then the step run in
                 its generation loop over the search tokens, each step given the true next token
                 (onnx_decode.teacher_forced): the loss is the mean |change| of the log-probability
                 of every next token against the original; the cost is the cache the loop holds after
                 its last step, in bytes, as a change from the original's (a site's cache is its own
                 outputs, so the costs of sites add up exactly)
    solve        the Pareto knapsack and the fold-checked refinement of pipeline/budget_solve.py
                 (folds: halves of the token rows), the plan measured again on held-out tokens

The search tokens: the search inputs' token ids where they are at least MIN_TOKENS long, else
SEARCH_ROWS x SEARCH_TOKENS ids drawn at random from the model's vocabulary (said in the
plan's notes); the held-out tokens another draw. The plan's specs are `stream:...` per site
(`full_heads=` the site's groups that keep the full cache) or `dense`.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from attn_opt.core.errors import UserError
from attn_opt.passes.plan import DENSE, parse_site_spec
from attn_opt.pipeline.budget_solve import _bar, _refine, pareto

DEFAULT_CANDIDATES = "stream:sinks=4,window=8|16|32"
MIN_TOKENS = 64  # a cache budget is about long sequences: shorter token rows are not searched on
SEARCH_ROWS, SEARCH_TOKENS = 2, 64
OBJECTIVE = "logprob"


def tokens_for(feeds: dict, loop, vocab: int, seed: int) -> tuple[np.ndarray, str]:
    """[B, N] token ids to teacher-force: the inputs' own where long enough, else random."""
    ids = feeds.get(loop.ids)
    if ids is not None and np.ndim(ids) == 2 and ids.shape[1] >= MIN_TOKENS:
        return np.asarray(ids, np.int64), f"the inputs' {ids.shape[0]} x {ids.shape[1]} token ids"
    rng = np.random.default_rng(seed)
    return (rng.integers(1, vocab, (SEARCH_ROWS, SEARCH_TOKENS)),
            f"{SEARCH_ROWS} x {SEARCH_TOKENS} random token ids (the inputs hold fewer than {MIN_TOKENS} tokens a row)")


def _loss(ref, got) -> tuple[float, tuple[float, ...] | None]:
    """Mean |Δ log p| of the true next tokens, and the same on each half of the rows."""
    d = np.abs(np.asarray(got.logprob, np.float64) - ref.logprob)
    folds = tuple(float(d[part].mean()) for part in np.array_split(np.arange(len(d)), 2)) if len(d) >= 2 else None
    return float(d.mean()), folds


def search_cache(steps, model, feeds: dict, heldout: dict | None, budget, candidates: list[str] | None,
                 progress=None, tokens: tuple[np.ndarray, np.ndarray] | None = None):
    """The plan for a cache budget on the decoder step `model` (ONNX); `tokens`: (search,
    held-out) [B, N] token ids to teacher-force (default: `tokens_for` the inputs)."""
    from attn_opt.core.ir import onnx as onnx_adapter
    from attn_opt.pipeline import budget as B
    from attn_opt.pipeline.onnx_decode import Stepper, loop_of, teacher_forced

    t0 = time.perf_counter()
    cands = [c for c in (candidates or B.expand_candidates(DEFAULT_CANDIDATES)) if c.split(":")[0] == "stream"]
    if not cands:
        raise UserError("--budget cache=F chooses which KV groups stream: give stream candidates (e.g. "
                        "--candidates 'stream:sinks=4,window=16|32'); other forms keep the whole cache")
    state = steps.observe(model, feeds, run=False)
    state = steps.prepare(state, parse_site_spec("", cands[0]), feeds, run=False)  # the opset the forms need
    loop = loop_of(state.view, onnx_adapter.input_specs(state.view))
    if loop is None:
        raise UserError("--budget cache=F needs a decoder step (a model that reads and returns a KV cache)")
    sites = [s for s in state.det.sites if not s.blocked]
    stepper = Stepper(state.model, loop)
    vocab = stepper.step(np.ones((1, 1), np.int64), stepper.start(1), 0)[0].shape[-1]
    if tokens is not None:
        (tokens, held_tokens), where = tokens, f"the given {tokens[0].shape[0]} x {tokens[0].shape[1]} token ids"
    else:
        tokens, where = tokens_for(feeds, loop, vocab, 0)
        held_tokens = tokens_for(heldout if heldout is not None else {}, loop, vocab, 1)[0]
    ref = teacher_forced(state.model, loop, tokens)
    notes = [f"searched by teacher forcing {where}; cost: the cache after {tokens.shape[1] - 1} positions, "
             f"{ref.cache_bytes} bytes in the original"]

    def run(plan: dict) -> tuple[object, object]:
        copy = B._fresh(steps, state, feeds)
        by_id = {s.id: s for s in copy.det.sites}
        for sid, c in plan.items():
            steps.lower(copy, by_id[sid], c.form, "plan")
        steps.finish(copy)
        return copy.model, teacher_forced(copy.model, loop, tokens)

    choices: dict[str, list] = {}
    with _bar(progress, len(sites) * len(cands), "measuring each site's cache choices") as advance:
        for s in sites:
            choices[s.id] = [B.Choice(DENSE, DENSE)]
            for spec in cands:
                p = parse_site_spec(s.id, spec)
                if p.skip_reason(s):
                    notes.append(f"{s.id}: {spec} does not apply: {p.skip_reason(s)}")
                    continue
                for c in _variants(s, spec, p):
                    c.form = parse_site_spec(s.id, c.spec).form(s, None)
                    reason = steps.supports(s, c.form)
                    if reason:
                        notes.append(f"{s.id}: {c.spec} refused: {reason}")
                        continue
                    got = run({s.id: c})[1]
                    c.cost = (got.cache_bytes - ref.cache_bytes) / ref.cache_bytes
                    c.loss = _loss(ref, got)[0]
                    choices[s.id].append(c)
                _order_groups(s, spec, p, choices[s.id], run, ref)
                advance(f"{s.id} {spec}")
    order = [s.id for s in sites]
    points = pareto([[c.cost for c in choices[i]] for i in order], [[c.loss for c in choices[i]] for i in order])
    cheapest = 1 + min(p.cost for p in points)
    if cheapest > budget.fraction + 1e-9:
        raise UserError(f"--budget {budget.text()} cannot be met: the cheapest the candidates reach is "
                        f"cache={cheapest:.3f}; nothing written")

    def measure(picks):
        _, got = run({sid: choices[sid][j] for sid, j in zip(order, picks) if j})
        return _loss(ref, got)

    best, tried = _refine(points, choices, order, 1.0, budget.fraction, measure)
    chosen = {sid: choices[sid][j] for sid, j in zip(order, best.picks)}
    applied, got = run({sid: c for sid, c in chosen.items() if c.spec != DENSE})
    held_ref = teacher_forced(state.model, loop, held_tokens)
    held = _loss(held_ref, teacher_forced(applied, loop, held_tokens))[0]
    return _result(sites, choices, chosen, best, tried, points, budget, cands, notes, got, ref, held,
                   time.perf_counter() - t0)


def _variants(site, spec: str, p) -> list:
    """Every group streaming, then each group alone streaming (the others full)."""
    from attn_opt.pipeline import budget as B

    if p.full_heads is not None:
        return [B.Choice(spec, spec)]
    # every group streaming as split caches (full_heads=empty): the attention mask stays over every
    # position, so the layers of a plan can differ (a capped cache everywhere would shorten it)
    out = [B.Choice(spec, B.spec_of(dataclasses.replace(p, full_heads="empty")))]
    if site.kv_heads < 2:
        return out
    for g in range(site.kv_heads):
        full = "+".join(str(x) for x in range(site.kv_heads) if x != g)
        out.append(B.Choice(f"{spec} group {g} streams", B.spec_of(dataclasses.replace(p, full_heads=full))))
    return out


def _order_groups(site, spec: str, p, choices: list, run, ref) -> None:
    """The k least sensitive groups streaming together (1 < k < groups), ordered by what each
    group streaming alone changed (measured as its own choice)."""
    from attn_opt.pipeline import budget as B

    alone = {int(c.template.split(" group ")[1].split()[0]): c.loss for c in choices
             if c.template.startswith(f"{spec} group ")}
    if not alone:
        return
    order = sorted(alone, key=alone.get)
    for k in range(2, site.kv_heads):
        full = "+".join(str(x) for x in sorted(set(range(site.kv_heads)) - set(order[:k])))
        c = B.Choice(f"{spec} {k} groups stream", B.spec_of(dataclasses.replace(p, full_heads=full)))
        c.form = parse_site_spec(site.id, c.spec).form(site, None)
        got = run({site.id: c})[1]
        c.cost, c.loss = (got.cache_bytes - ref.cache_bytes) / ref.cache_bytes, _loss(ref, got)[0]
        choices.append(c)


def _result(sites, choices, chosen, best, tried, points, budget, cands, notes, got, ref, held, seconds):
    from attn_opt.pipeline import budget as B

    predicted = 1 + best.cost
    measured = got.cache_bytes / ref.cache_bytes
    entries = {s.id: {"spec": chosen[s.id].spec, "layer": s.layer, "cost": round(chosen[s.id].cost, 6),
                      "loss_alone": chosen[s.id].loss, "fidelity_alone": f"mean |Δ log p| {chosen[s.id].loss:.4g}",
                      "choices": len(choices[s.id])} for s in sites}
    summary = {"budget": budget.text(), "objective": OBJECTIVE, "cost_definition": B.KINDS["cache"],
               "cost": predicted, "cache_bytes": {"original": ref.cache_bytes, "plan": got.cache_bytes,
                                                  "plan_fraction_measured": measured},
               "predicted_loss": best.loss, "measured_loss": best.measured, "heldout_loss": held,
               "heldout_fidelity": f"mean |Δ log p| {held:.4g}",
               "search_fidelity": f"mean |Δ log p| {best.measured:.4g}", "candidates": cands,
               "seconds": seconds, "phases": {"search": seconds}, "notes": notes}
    pts = [{"cost": 1 + p.cost, "predicted_loss": p.loss, "measured_loss": p.measured} for p in points]
    pts += [{"cost": 1 + p.cost, "predicted_loss": p.loss, "measured_loss": p.measured, "refined": True}
            for p in tried if all(p.picks != q.picks for q in points)]
    return B.SearchResult({sid: c.spec for sid, c in chosen.items()}, entries, pts,
                          {"cost": predicted, "predicted_loss": best.loss, "measured_loss": best.measured}, summary)
