"""The greedy generation loop of an ONNX decoder step, in ONNX Runtime: the prompt in one
call, then one token per call, each step's `present` cache fed back as the next step's
`past`. The pairs come from the graph (patterns/cache.py: Concat(past input, new) on the
sequence axis whose result is a graph output), else from the exporters' names
(`past_key_values.N.key` -> `present.N.key`). A merged decoder's boolean branch input
(Optimum's `use_cache_branch`) is false on the prompt step (past empty) and true after.

`generate` drives one model; `compare` drives two on the same tokens (the first model's
greedy choices), giving per-step logit error and token agreement; `decode_check` is the
pipeline's fidelity variant for decoder graphs (a few steps through the loop).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from attn_opt.patterns.cache import cache_pairs
from attn_opt.core.errors import UserError
from attn_opt.core.inputs import InputSpec, cache_flag


DECODE_STEPS = 4  # steps of the loop the pipeline's fidelity check runs on a decoder step


@dataclass(frozen=True)
class Loop:
    ids: str  # token ids input [B, T]
    mask: str | None  # attention mask over past + new [B, P + T]
    positions: str | None  # position ids [B, T]
    pairs: tuple[tuple[str, str], ...]  # (present output, past input)
    pasts: dict  # past input -> (shape with 0 past positions, dtype)
    logits: str  # the output whose last row picks the next token
    branch: tuple[str, tuple] | None = None  # a merged decoder's (use-cache flag input, its shape)


def loop_of(gv, specs: list[InputSpec]) -> Loop | None:
    """The loop of a decoder step, or None when the graph is not one (no cache pairs)."""
    pairs = cache_pairs(gv)
    if not pairs:
        return None
    by_name = {s.name: s for s in specs}
    missing = [past for present, past in pairs if present is None]
    if missing:
        raise UserError(f"the model reads a cache ({', '.join(missing)}) but does not return it: "
                        "a decoder step must output its present key/values to be run in a loop")
    ints = [s for s in specs if s.dtype.startswith("int") and len(s.shape) == 2]
    ids = next((s for s in ints if "mask" not in s.name.lower() and "position" not in s.name.lower()), None)
    if ids is None:
        raise UserError("the decoder step has no token-id input")
    mask = next((s.name for s in ints if "mask" in s.name.lower()), None)
    pos = next((s.name for s in ints if "position" in s.name.lower()), None)
    pasts = {}
    for _, past in pairs:
        s = by_name[past]
        if isinstance(s.shape[2], int):
            raise UserError(f"the cache input {past} has a static length ({s.shape[2]}): re-export it with a dynamic "
                            "past-length axis to run it in a loop")
        pasts[past] = (tuple(0 if i == 2 else d for i, d in enumerate(s.shape)), s.dtype)
    logits = next((v.name for v in gv.outputs if "logit" in v.name.lower()),
                  next(v.name for v in gv.outputs if v.name not in {p for p, _ in pairs}))
    flags = cache_flag(specs)
    if len(flags) > 1:
        raise UserError(f"the decoder step has {len(flags)} boolean flag inputs ({', '.join(s.name for s in flags)}): "
                        "cannot tell which one selects the cached branch")
    branch = (flags[0].name, tuple(flags[0].shape)) if flags else None
    return Loop(ids.name, mask, pos, tuple(pairs), pasts, logits, branch)


def first_step(gv, specs: list[InputSpec], feeds: dict) -> dict:
    """`feeds` as a decoder step's first call: every cache input empty (0 past positions),
    the mask over the new tokens only, positions from 0. The fidelity inputs of a pass
    that replaces the cache (latent): a random past has no counterpart in the new cache,
    an empty one does (the loop variant then checks the steps after it)."""
    try:
        loop = loop_of(gv, specs)
    except UserError:
        return feeds
    if loop is None or loop.ids not in feeds:
        return feeds
    out = dict(feeds)
    b, t = feeds[loop.ids].shape
    for past, (shape, dtype) in loop.pasts.items():
        out[past] = np.zeros(tuple(b if i == 0 else d for i, d in enumerate(shape)), np.dtype(dtype))
    if loop.mask in feeds:
        out[loop.mask] = feeds[loop.mask][:, -t:]
    if loop.positions in feeds:
        out[loop.positions] = np.broadcast_to(np.arange(t, dtype=feeds[loop.positions].dtype), (b, t)).copy()
    return out


def with_empty_caches(gv, specs: list[InputSpec], feeds: dict) -> dict:
    """`feeds` plus an empty cache for every cache input of this model they lack, where the
    caches they give are empty too (a first step: a model whose cache a pass replaced runs
    on the original's first-step inputs)."""
    have = {s.name for s in specs}
    if have <= set(feeds):
        return feeds
    try:
        loop = loop_of(gv, specs)
    except UserError:
        return feeds
    if loop is None or any(np.shape(feeds[p])[2] for p in loop.pasts if p in feeds):
        return feeds
    b = feeds[loop.ids].shape[0] if loop.ids in feeds else 1
    out = dict(feeds)
    for past, (shape, dtype) in loop.pasts.items():
        if past not in out:
            out[past] = np.zeros(tuple(b if i == 0 and not isinstance(d, int) else d for i, d in enumerate(shape)),
                                 np.dtype(dtype))
    return out


def own_loop(model, loop: Loop) -> Loop:
    """`loop` where `model` reads the same cache inputs, else the model's own loop (a
    per-head streaming step reads a second, capped cache beside the full one; a latent
    step reads its latent cache under new names)."""
    caches = {v.name for v in model.ir.graph.inputs} - {loop.ids, loop.mask, loop.positions}
    if caches == set(loop.pasts):
        return loop
    from attn_opt.core.ir import onnx as onnx_adapter

    gv = onnx_adapter.view(model)
    return loop_of(gv, onnx_adapter.input_specs(gv)) or loop


class Stepper:
    """One model in the loop: an ONNX Runtime session kept open across steps."""

    def __init__(self, model, loop: Loop):
        loop = own_loop(model, loop)
        self.sess, self.loop = model.session(), loop
        self.names = [o.name for o in self.sess.get_outputs()]
        self.inputs = {i.name for i in self.sess.get_inputs()}

    def start(self, batch: int) -> dict:
        cache = {}
        for past, (shape, dtype) in self.loop.pasts.items():
            cache[past] = np.zeros(tuple(batch if i == 0 and not isinstance(d, int) else d
                                         for i, d in enumerate(shape)), dtype=np.dtype(dtype))
        return cache

    def step(self, ids: np.ndarray, cache: dict, done: int) -> tuple[np.ndarray, dict]:
        """Logits of the new tokens `ids` [B, T] after `done` cached ones, and the new cache."""
        b, t = ids.shape
        feeds = {self.loop.ids: ids.astype(np.int64), **cache}
        # the cache's length: `done`, or less where the step caps it; beside a per-head split's capped
        # `_stream` caches the full ones (the longest) keep every position, and the mask covers them
        held = max(v.shape[2] for v in cache.values())
        if self.loop.mask:
            feeds[self.loop.mask] = np.ones((b, held + t), np.int64)
        if self.loop.branch:
            name, shape = self.loop.branch
            feeds[name] = np.full(shape, held > 0, dtype=bool)  # the cached branch once there is a cache
        if self.loop.positions:
            feeds[self.loop.positions] = np.broadcast_to(np.arange(done, done + t, dtype=np.int64), (b, t)).copy()
        out = dict(zip(self.names, self.sess.run(self.names, {k: v for k, v in feeds.items() if k in self.inputs})))
        return out[self.loop.logits], {past: out[present] for present, past in self.loop.pairs}


@dataclass
class Generation:
    tokens: np.ndarray  # [B, new]
    logits: list  # per step, the last row's logits [B, V]
    seconds: float  # decode steps only (after the prompt)
    prompt_seconds: float
    cache_bytes: int  # the cache after the last step


def generate(model, loop: Loop, prompt: np.ndarray, new_tokens: int, forced: np.ndarray | None = None) -> Generation:
    """Greedy decoding (or the tokens `forced` [B, new], to compare two models on one path)."""
    s = Stepper(model, loop)
    cache = s.start(prompt.shape[0])
    t0 = time.perf_counter()
    logits, cache = s.step(prompt, cache, 0)
    prompt_s = time.perf_counter() - t0
    done, tokens, rows = prompt.shape[1], [], [logits[:, -1]]
    t0 = time.perf_counter()
    for i in range(new_tokens):
        nxt = forced[:, i] if forced is not None else logits[:, -1].argmax(-1)
        tokens.append(nxt)
        if i == new_tokens - 1:
            break
        logits, cache = s.step(nxt[:, None], cache, done)
        done += 1
        rows.append(logits[:, -1])
    return Generation(np.stack(tokens, 1), rows, time.perf_counter() - t0, prompt_s,
                      sum(int(v.nbytes) for v in cache.values()))


def compare(a, b, loop: Loop, prompt: np.ndarray, new_tokens: int, loop_b: Loop | None = None) -> dict:
    """Model `b` (run by its own loop `loop_b`, else `loop`: a merged decoder and a plain
    one name their inputs differently) on model `a`'s greedy path: per-step max relative
    logit error, and the share of steps where `b` would pick `a`'s token."""
    ga = generate(a, loop, prompt, new_tokens)
    gb = generate(b, loop_b or own_loop(b, loop), prompt, new_tokens, forced=ga.tokens)
    errs = [float(np.max(np.abs(x - y)) / max(float(np.max(np.abs(x))), 1e-30)) for x, y in zip(ga.logits, gb.logits)]
    agree = [bool(np.all(x.argmax(-1) == y.argmax(-1))) for x, y in zip(ga.logits, gb.logits)]
    return {"steps": len(errs), "max_rel_error": max(errs), "per_step_error": errs,
            "token_agreement": sum(agree) / len(agree), "a": ga, "b": gb}


def decode_check(loop: Loop, prompt: np.ndarray, steps: int = DECODE_STEPS):
    """A fidelity variant for the pipeline: the logits of `steps` greedy steps after the
    prompt, teacher-forced on the untouched model's tokens so both run the same path."""
    path: dict = {}

    def outputs(model) -> dict:
        g = generate(model, own_loop(model, loop), prompt, steps, forced=path.get("tokens"))
        path.setdefault("tokens", g.tokens)
        return {f"{loop.logits}@step{i}": x for i, x in enumerate(g.logits)}

    return outputs


@dataclass
class Forced:
    """A teacher-forced pass over text: per scored position, the log-probability of the
    true next token and the model's top-1 choice ([B, N - prompt] each)."""
    logprob: np.ndarray
    top1: np.ndarray
    target: np.ndarray
    cache_bytes: int  # the cache after the last step
    seconds: float


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def teacher_forced(model, loop: Loop, tokens: np.ndarray, prompt: int = 1) -> Forced:
    """Feed `tokens` [B, N] through the step: the first `prompt` in one call, then one per
    call with the cache, as generation does, but each step given the true next token.
    Position t (t >= prompt) is scored by the logits the step produced before it."""
    if tokens.ndim != 2 or not 1 <= prompt < tokens.shape[1]:
        raise UserError(f"teacher forcing needs [B, N] tokens with 1 <= prompt < N, got {tokens.shape}, {prompt}")
    s = Stepper(model, loop)
    cache = s.start(tokens.shape[0])
    t0 = time.perf_counter()
    logits, cache = s.step(tokens[:, :prompt], cache, 0)
    rows = [logits[:, -1]]
    for t in range(prompt, tokens.shape[1] - 1):
        logits, cache = s.step(tokens[:, t:t + 1], cache, t)
        rows.append(logits[:, -1])
    lp = _log_softmax(np.stack(rows, 1))  # [B, N - prompt, V]
    target = tokens[:, prompt:]
    return Forced(np.take_along_axis(lp, target[..., None], -1)[..., 0], lp.argmax(-1), target,
                  sum(int(v.nbytes) for v in cache.values()), time.perf_counter() - t0)


def forced_quality(f: Forced, dense: Forced | None = None, split: int | None = None, prompt: int = 1) -> dict:
    """Next-token NLL (nats/token), top-1 accuracy, and top-1 agreement with `dense` over
    every scored position; with `split`, the same over positions < split and >= split."""
    def part(sel) -> dict:
        out = {"tokens": int(sel.sum()), "nll": float(-f.logprob[sel].mean()) if sel.any() else None,
               "top1": float((f.top1 == f.target)[sel].mean()) if sel.any() else None}
        if dense is not None:
            out["agreement"] = float((f.top1 == dense.top1)[sel].mean()) if sel.any() else None
            out["nll_vs_dense"] = float((dense.logprob - f.logprob)[sel].mean()) if sel.any() else None
        return out

    pos = np.broadcast_to(np.arange(prompt, prompt + f.target.shape[1]), f.target.shape)
    out = {"all": part(np.ones(f.target.shape, bool))}
    if split is not None:
        out["before"], out["after"] = part(pos < split), part(pos >= split)
    return out
