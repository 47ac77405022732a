"""Runs of an ONNX model: one ONNX Runtime session for every input set it runs on.

The pipeline runs each model on the fidelity inputs (its outputs, the values detection
probes) and, with check=model, on each variant input set (a padded batch, another
length). They are run together: one session (one weight initialisation) serves every
set, and what each set gave is remembered per graph content, so the later `run` of the
same graph on a variant returns it without running again. A model whose weights pass
`WHOLE_RUN_BYTES` runs segment by segment (core/ir/onnx_segments.py), each segment's
session serving every set, so memory holds one segment's weights at a time.

`COUNTS` counts the sessions made and the runs of them, for tests/test_runs.py.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Mapping

import numpy as np

COUNTS: Counter = Counter()  # "sessions", "runs" (one input set through one session), "largest" (weight
#                               bytes one session held at most): what the pipeline's model runs did
WHOLE_RUN_BYTES = 256 << 20  # models with more weights run one segment at a time ...
SEGMENT_BYTES = 256 << 20  # ... of at most about this many bytes of weights
MIN_SEGMENT_BYTES = 64 << 20  # (a segment of fewer costs more in sessions than it saves)


def segment_budget(weight_bytes: int, parts: int = 8) -> int:
    """Weight bytes per segment: the model in `parts` (an eighth; a layer where the caller
    knows the number of layers), between the bounds above."""
    return min(SEGMENT_BYTES, max(MIN_SEGMENT_BYTES, weight_bytes // max(1, parts)))


def feeds_key(feeds: Mapping[str, np.ndarray]) -> str:
    """A digest of an input set: names, dtypes, shapes and bytes."""
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(feeds):
        a = np.ascontiguousarray(feeds[k])
        h.update(f"{k}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class Memo:
    """What runs of one graph gave: (feeds digest) -> values or the error, for the input
    sets of the latest call that ran; reset when the graph's content changes (its digest)."""

    def __init__(self):
        self.digest, self.values, self.checked = None, {}, set()

    def at(self, digest: str) -> "Memo":
        if digest != self.digest:
            self.digest, self.values, self.checked = digest, {}, set()
        return self


def run(model, feeds: Mapping[str, np.ndarray], extra=(), also=()) -> dict[str, np.ndarray]:
    """`model`'s outputs and `extra` values on `feeds`; each set in `also` is run by the same
    session(s) and its outputs remembered (an error too: said when that set is asked for)."""
    from attn_opt.core.ir.onnx_memory import check_run

    proto = model.graph_proto()
    h = hashlib.blake2b(proto.SerializeToString(), digest_size=16)
    h.update(str(model.folder).encode())
    memo = model._memo.at(h.hexdigest())
    outs = [o.name for o in proto.graph.output]
    first = list(dict.fromkeys(outs + [x for x in extra if x]))
    sets = [(feeds, first)] + [(f, outs) for f in also]
    todo, keys = [], []
    for i, (f, want) in enumerate(sets):
        key = feeds_key(f)
        keys.append(key)
        got = memo.values.get(key)
        if isinstance(got, Exception) or (isinstance(got, dict) and (i or all(w in got for w in want))):
            continue  # made before (a variant wants only the outputs), or failed before: said again
        shapes = {k: tuple(np.shape(v)) for k, v in f.items()}
        try:
            if repr(shapes) not in memo.checked:  # the memory estimate, once per shape
                check_run(proto, shapes)
                memo.checked.add(repr(shapes))
        except Exception as e:
            if not i:
                raise
            memo.values[key] = e
            continue
        if any(keys[t[0]] == key for t in todo):  # the same inputs twice: run once
            continue
        todo.append((i, f, want))
    if todo:  # what earlier calls ran on other inputs is let go: memory holds one call's sets
        memo.values = {k: v for k, v in memo.values.items() if k in keys}
        if model.weight_bytes() > WHOLE_RUN_BYTES:
            from attn_opt.core.ir.onnx_segments import run_segmented_sets

            budget = segment_budget(model.weight_bytes())
            got = run_segmented_sets(model, proto, [(f, set(w)) for _, f, w in todo], budget)
        else:
            got = _whole(model, proto, [(f, w) for _, f, w in todo])
        for (i, f, _), g in zip(todo, got):
            old = memo.values.get(keys[i])
            memo.values[keys[i]] = {**old, **g} if isinstance(old, dict) and isinstance(g, dict) else g
    result = memo.values[keys[0]]
    if isinstance(result, Exception):
        raise result
    return {k: np.array(result[k]) for k in first if k in result}  # the caller's own: the memo stays as run


def _whole(model, proto, sets: list) -> list:
    """One session with every wanted value as an output; each set run once."""
    have = {o.name for o in proto.graph.output}
    extra = [x for _, want in sets for x in want if x not in have]
    sess = model.session(extra, proto=proto)
    counted(model.weight_bytes())
    inputs = {i.name for i in sess.get_inputs()}
    got = []
    for i, (f, want) in enumerate(sets):
        try:
            vals = sess.run(list(want), {k: v for k, v in f.items() if k in inputs})
            COUNTS["runs"] += 1
            got.append(dict(zip(want, vals)))
        except Exception as e:  # the first set's error is the caller's; a variant's is remembered
            if not i:
                raise
            got.append(e)
    del sess
    return got


def counted(weight_bytes: int) -> None:
    """One more session, holding `weight_bytes` of weights."""
    COUNTS["sessions"] += 1
    COUNTS["largest"] = max(COUNTS["largest"], weight_bytes)
