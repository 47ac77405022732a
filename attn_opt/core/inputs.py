"""Sample inputs generated from a model's signature (IR-neutral).

Integer ids stay inside the embedding table they index, masks are ones (the last batch
row padded when `pad=True`, so masks are real), floats are N(0, 1), all seeded.
Dynamic dims take the user's `--input-shape` or a default, and the choice is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attn_opt.core.errors import UserError
from attn_opt.core.graph import Dim

DEFAULT_BATCH = 2
DEFAULT_LEN = 16
DEFAULT_PAST = 8  # cached tokens a decoder step's generated inputs carry
PAD_TAIL = 3


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: str
    shape: tuple[Dim, ...]
    int_high: int | None = None  # exclusive bound for integer ids (embedding rows)


def parse_shape_overrides(items: list[str] | tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """`NAME=1x4096` strings to {NAME: (1, 4096)}."""
    out = {}
    for item in items:
        name, sep, dims = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            out[name] = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            raise UserError(f"bad --input-shape {item!r}: expected NAME=D1xD2x..., e.g. input_ids=1x4096") from None
        if any(d < 1 for d in out[name]):
            raise UserError(f"bad --input-shape {item!r}: every dimension must be >= 1")
    return out


def resolve_shapes(specs: list[InputSpec], overrides: dict[str, tuple[int, ...]] | None = None) -> dict[str, tuple[int, ...]]:
    overrides = overrides or {}
    unknown = set(overrides) - {s.name for s in specs}
    if unknown:
        raise UserError(f"--input-shape names {sorted(unknown)}, but the model's inputs are {[s.name for s in specs]}")
    symbols: dict[str, int] = {}
    for s in specs:  # a symbol fixed by an override fixes every input that shares it
        if s.name in overrides:
            if len(overrides[s.name]) != len(s.shape):
                raise UserError(f"--input-shape {s.name}: rank {len(overrides[s.name])}, the model wants rank {len(s.shape)}")
            for d, v in zip(s.shape, overrides[s.name]):
                if isinstance(d, str):
                    symbols[d] = v
    shapes = {}
    for s in specs:
        if s.name in overrides:
            shapes[s.name] = overrides[s.name]
            continue
        dims = []
        for i, d in enumerate(s.shape):
            if isinstance(d, int):
                dims.append(d)
            elif isinstance(d, str) and d in symbols:
                dims.append(symbols[d])
            else:
                size = DEFAULT_BATCH if i == 0 else DEFAULT_LEN
                if isinstance(d, str):
                    symbols[d] = size
                dims.append(size)
        shapes[s.name] = tuple(dims)
    return _decoder_step(specs, shapes, overrides)


def check_sizes(specs: list[InputSpec], shapes: dict[str, tuple[int, ...]], what: str) -> None:
    """Refuse input shapes whose arrays would not fit the memory limit, before allocating
    them (floats are drawn in float64 first)."""
    from attn_opt.core import limits

    sizes = {s.name: limits.nbytes(shapes[s.name], max(np.dtype(s.dtype).itemsize, 8)) for s in specs}
    big = max(sizes, key=sizes.get, default=None)
    if big is not None:
        limits.refuse_past(f"{what} ({big} {'x'.join(map(str, shapes[big]))})", sum(sizes.values()),
                           "give smaller --input-shape")


def past_inputs(specs: list[InputSpec]) -> list[InputSpec]:
    """A decoder step's cache inputs: float [B, H, past, D] tensors named past*."""
    return [s for s in specs if "past" in s.name.lower() and len(s.shape) == 4 and s.dtype.startswith(("float", "bfloat"))]


def cache_flag(specs: list[InputSpec]) -> list[InputSpec]:
    """A merged decoder's branch inputs: boolean flags of one element (Optimum's
    `use_cache_branch`, an If between the first step and the cached steps)."""
    return [s for s in specs if s.dtype == "bool" and all(isinstance(d, int) for d in s.shape)
            and int(np.prod(s.shape, dtype=np.int64)) == 1]


def _growing(specs: list[InputSpec]) -> list[InputSpec]:
    """The caches that grow by a step's new tokens: past inputs whose length no other input
    (but a mask) names; a seq2seq decoder's cross-attention cache shares its length with
    the encoder's hidden states (Optimum: `encoder_sequence_length`) and is sized by them."""
    past = past_inputs(specs)
    others = {d for s in specs if s not in past and "mask" not in s.name.lower() for d in s.shape
              if isinstance(d, str)}
    return [s for s in past if s.shape[2] not in others]


def _decoder_step(specs: list[InputSpec], shapes: dict, overrides: dict) -> dict:
    """A decoder step sees past + new tokens: its growing cache inputs get DEFAULT_PAST
    positions (unless given), a mask over a cache's length follows that cache, and any other
    mask over more than the new tokens gets past + new."""
    past = _growing(specs)
    ids = next((s for s in specs if s.dtype.startswith("int") and len(s.shape) == 2 and "mask" not in s.name.lower()
                and "position" not in s.name.lower()), None)
    if not past or ids is None:
        return shapes
    p_sym = past[0].shape[2]
    for s in past:
        if s.name not in overrides and not isinstance(s.shape[2], int):
            shapes[s.name] = shapes[s.name][:2] + (DEFAULT_PAST,) + shapes[s.name][3:]
    n_past, n_new = shapes[past[0].name][2], shapes[ids.name][1]
    cached = {p.shape[2]: shapes[p.name][2] for p in past_inputs(specs) if isinstance(p.shape[2], str)}
    merged = bool(cache_flag(specs))  # Optimum's merge gives the mask and the ids one dim name; it covers past + new
    for s in specs:
        if "mask" not in s.name.lower() or len(s.shape) != 2:
            continue
        if s.shape[1] in cached and s.shape[1] != p_sym:  # the encoder's mask beside its cross-attention cache
            if s.name not in overrides:
                shapes[s.name] = (shapes[s.name][0], cached[s.shape[1]])
        elif (merged or s.shape[1] != ids.shape[1]) and s.shape[1] != p_sym:
            if s.name in overrides and overrides[s.name][1] != n_past + n_new:
                raise UserError(f"--input-shape {s.name}: a decoder step's mask covers past + new tokens "
                                f"({n_past} + {n_new} = {n_past + n_new}), not {overrides[s.name][1]}")
            shapes[s.name] = (shapes[s.name][0], n_past + n_new)
    return shapes


def _past_length(specs: list[InputSpec], shapes: dict) -> int:
    past = _growing(specs)
    return shapes[past[0].name][2] if past else 0


def make_inputs(specs: list[InputSpec], overrides=None, seed: int = 0, pad: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = resolve_shapes(specs, overrides)
    check_sizes(specs, shapes, "the generated inputs")
    start = _past_length(specs, shapes)  # a decoder step's new tokens come after its cache
    feeds = {}
    for s in specs:
        shape, name = shapes[s.name], s.name.lower()
        dt = np.dtype(s.dtype)
        if dt == np.bool_ or (dt.kind in "iu" and "mask" in name):
            x = np.ones(shape, dtype=dt)
            if pad and len(shape) >= 2 and shape[0] > 1 and shape[-1] > PAD_TAIL:
                x[-1, ..., -PAD_TAIL:] = 0
        elif dt.kind in "iu":
            if "position" in name:
                x = np.broadcast_to(np.arange(start, start + shape[-1], dtype=dt), shape).copy()
            elif s.int_high:
                x = rng.integers(1 if s.int_high > 1 else 0, s.int_high, size=shape, dtype=dt)
            else:
                x = np.zeros(shape, dtype=dt)
        elif dt.kind == "f":
            x = rng.standard_normal(shape).astype(dt)
        else:
            raise UserError(f"cannot generate input {s.name!r} of type {dt}; pass --inputs FILE.npz")
        feeds[s.name] = x
    return feeds


def feeds_from_npz(specs: list[InputSpec], path: str, flag: str, check=None) -> dict[str, np.ndarray]:
    """The model's inputs from an .npz: every member's header checked against the signature
    and the memory limit (and by `check(shapes)`: a run at those shapes) before its data is
    read, then the values (`checked_feeds`)."""
    what = f"{flag} {path}"
    from attn_opt.core import npz

    heads = {h.name: h for h in npz.headers(path, what)}
    _check_signature(specs, {k: (h.shape, h.dtype) for k, h in heads.items()}, what)
    if check is not None:
        check({s.name: heads[s.name].shape for s in specs})
    return checked_feeds(specs, npz.load(path, what, {s.name for s in specs}), what)


def _check_signature(specs: list[InputSpec], have: dict[str, tuple], what: str) -> None:
    """Names, ranks, static sizes and dtype kinds ({name: (shape, dtype)}) against the
    model's inputs, before any data is read or cast."""
    missing = [s.name for s in specs if s.name not in have]
    if missing:
        raise UserError(f"{what} lacks {missing}; it has {sorted(have)}")
    caches = {s.name for s in past_inputs(specs)}  # an empty past is a decoder's first step
    for s in specs:
        shape, dtype = have[s.name]
        if 0 in shape and s.name not in caches:
            raise UserError(f"{what}: {s.name} is empty")
        if len(shape) != len(s.shape) or any(isinstance(d, int) and d != n for d, n in zip(s.shape, shape)):
            want = "x".join(str(d) if isinstance(d, int) else "?" for d in s.shape)
            raise UserError(f"{what}: {s.name} has shape {'x'.join(map(str, shape))}; the model wants {want}")
        want = np.dtype(s.dtype)
        if dtype.kind not in ("biuf" if want.kind == "f" else "biu" if want.kind in "biu" else want.kind):
            raise UserError(f"{what}: {s.name} is {dtype}, the model takes {want}; "
                            f"{'float or complex values are not cast to integers' if want.kind in 'biu' else 'not cast'}")


def _check_values(s: InputSpec, a: np.ndarray, what: str) -> None:
    """Values the cast to the model's dtype would change or that mean nothing to it."""
    want = np.dtype(s.dtype)
    if want.kind in "biu" and a.dtype.kind in "iu" and a.size:
        lo, hi = int(a.min()), int(a.max())
        rng = (0, 1) if want.kind == "b" else (np.iinfo(want).min, np.iinfo(want).max)
        if s.int_high is not None and want.kind != "b":  # ids into an embedding table of int_high rows
            rng = (0, s.int_high - 1)
        if lo < rng[0] or hi > rng[1]:
            bad = lo if lo < rng[0] else hi
            what_range = f"the embedding table has {s.int_high} rows" if s.int_high is not None and want.kind != "b" \
                else f"{want} holds {rng[0]}..{rng[1]}"
            raise UserError(f"{what}: {s.name} has value {bad}, outside {rng[0]}..{rng[1]} ({what_range})")
    elif want.kind == "f" and a.dtype.kind == "f" and a.size:
        if np.isnan(a).any():
            raise UserError(f"{what}: {s.name} has NaN values")
        finite = a[np.isfinite(a)]
        if finite.size and np.abs(finite).max() > np.finfo(want).max:
            raise UserError(f"{what}: {s.name} has values beyond {want}'s range ({float(np.abs(finite).max()):.3g})")


def checked_feeds(specs: list[InputSpec], data: dict, what: str) -> dict[str, np.ndarray]:
    """Every input present, none empty (but a decoder's cache), each of the model's rank and static sizes, of a
    dtype that casts to the model's without changing a value (no float or complex ids, no
    NaN, ids inside the table they index); a one-line UserError naming `what` otherwise."""
    arrays = {k: np.asarray(v) for k, v in data.items()}
    for k, a in arrays.items():
        if a.dtype.hasobject or a.dtype.kind not in "biuf":
            raise UserError(f"{what}: {k} has dtype {a.dtype}; inputs are boolean, integer or float arrays")
    _check_signature(specs, {k: (a.shape, a.dtype) for k, a in arrays.items()}, what)
    feeds = {}
    for s in specs:
        _check_values(s, arrays[s.name], what)
        feeds[s.name] = arrays[s.name].astype(s.dtype, copy=False)
    return feeds


def read_npz(path: str, what: str | None = None) -> dict[str, np.ndarray]:
    """Arrays from a .npz file (headers checked before the data is read), or a one-line UserError."""
    from attn_opt.core import npz

    return npz.load(path, what or f"--inputs {path}")


def _is_mask(name: str, a: np.ndarray) -> bool:
    return "mask" in name.lower() and a.ndim >= 2 and (a.dtype == np.bool_ or a.dtype.kind in "iu")


def fidelity_variants(feeds: dict[str, np.ndarray], specs: list[InputSpec] | None = None,
                      overrides: dict | None = None) -> list[tuple[str, dict[str, np.ndarray]]]:
    """Inputs an exact pass must also be exact on, beside `feeds`:
    - "padded": row 0 sees one token, row 1 none (more padding than any window), when the
      model takes a padding mask (the batch is doubled if it has one row and may grow);
    - "length+5": another sequence length, when the inputs were generated and a dim after
      the batch is dynamic."""
    out = []
    masks = [k for k, a in feeds.items() if _is_mask(k, a)]
    if masks:
        padded = dict(feeds)
        b = next(iter(feeds.values())).shape[0]
        dynamic_batch = specs is not None and all(not isinstance(s.shape[0], int) for s in specs if s.shape)
        if b == 1 and dynamic_batch:
            padded = {k: np.concatenate([a, a]) if a.ndim else a for k, a in feeds.items()}
        for k in masks:
            m = padded[k].copy()
            m[0] = 0
            m[0, ..., 0] = 1  # row 0: only its first key (every query of row 0, for a mask of higher rank)
            if m.shape[0] > 1:
                m[1] = 0  # row 1: fully padded
            padded[k] = m
        out.append(("padded", padded))
    if specs is not None:
        dyn = [s for s in specs if any(isinstance(d, str) or d is None for d in s.shape[1:])]
        if dyn and not overrides:
            longer = {}
            for s in specs:
                shape = feeds[s.name].shape
                longer[s.name] = tuple(d + 5 if i > 0 and not isinstance(s.shape[i], int) else d
                                       for i, d in enumerate(shape))
            if past_inputs(specs):  # a decoder step: 5 more cached and 5 more new tokens; its mask follows
                longer = {k: v for k, v in longer.items() if "mask" not in k.lower()}
            try:
                out.append(("length+5", make_inputs(specs, longer, seed=1, pad=True)))
            except UserError:
                pass
    return out
