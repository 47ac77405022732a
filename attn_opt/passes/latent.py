"""latent: multi-head attention → latent attention (MHA2MLA, TransMLA).

    latent:rank=R[,rope_dims=D]

K and V are computed from one shared latent c = x · W_down (R values per token) instead
of from x: the joint K/V projection [W_k | W_v] ([D, N]) is factorised as
W_down = W V_R, W_up = V_Rᵀ, with V_R the top R right singular vectors of W (weights
only), or with `--calibrate` of X·W on the calibration activations X (the projection that
keeps most of what K and V actually carry). Biases stay where they are. At R = the full
rank (min(D, N)) the product is W itself: the pass is exact there (test it) and an
approximation below.

On a decoder step the cache holds c ([B, 1, T, R], one shared "head") instead of the
factorised K/V for every head, and each step up-projects the whole cache. A K that is
rotated after its projection (RoPE) cannot be rebuilt from c at past positions: by
default it keeps its own cache whole (the rotary key part, rope_dims = head dim, exact at
full rank) and only V goes in the latent. rope_dims=D < head dim is MHA2MLA's partial
RoPE: D/2 rotary frequency pairs (the most query·key weight energy) stay rotated and
cached per kv head; the other K dims go in the latent unrotated, and the queries' same
dims are turned back to unrotated (the rotary read from the graph), so those dims lose
their position dependence: approximate at any rank (exact where every position is 0).
Where K keeps its own cache (the default on a rotary step), V's up-projection is
absorbed: the step computes P·[c, 1] (R + 1 values per head and query) and then one
[R + 1, dv] product per head, instead of up-projecting the whole cache to V (exact; the
ones column carries the bias). Where K's part is in the latent too (no rotary, or partial
RoPE) and it costs fewer multiply-adds per cached token, K's up-projection is absorbed into
the queries as well: scores are (q_nope·[W_uk; b_k]ᵀ)·[c, 1]ᵀ beside the kept rotated dims'
q_rope·k_ropeᵀ, so no step up-projects the cache (the note gives both costs).
The new cache tensors are named after the ones they replace (past_key_values.0.value →
past_key_values.0.latent, past_key_values.0.key → past_key_values.0.key_rope, present.*
likewise), and the usual loop drives them (every present* fed back as the past* of the
same name).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from attn_opt.core.errors import UserError
from attn_opt.core.passbase import Pass, option
from attn_opt.patterns.cache import past_source
from attn_opt.patterns.form import Form, Latent, reads_own_cache
from attn_opt.patterns.rotary import rotary

_LAYOUT = ("Transpose", "Reshape", "Identity", "Cast", "Squeeze", "Unsqueeze")


def weight(proj) -> np.ndarray:
    """A projection's weight as [D, out] float64."""
    w = proj.weight.const
    return np.asarray(w.T if proj.transposed else w, np.float64)


def added_bias(proj) -> np.ndarray | None:
    """The projection's bias: Gemm/Linear's own, else a constant Add right after it."""
    if proj.bias is not None and proj.bias.const is not None:
        return np.asarray(proj.bias.const, np.float64).reshape(-1)
    node = proj.x.users and next((u for u in proj.x.users if u.name == proj.node), None)
    users = node.outputs[0].users if node is not None else []
    if len(users) == 1 and users[0].op == "Add":
        consts = [i for i in users[0].inputs if i is not None and i.const is not None]
        if len(consts) == 1:
            return np.asarray(consts[0].const, np.float64).reshape(-1)
    return None


def cache_concat(site, which: str):
    """The Concat(past, new) node of the site's K or V cache (through layout ops and a
    GQA repeat), or None."""
    past = getattr(site.cache, f"past_{which}")
    v = getattr(site, which[0]).value
    for _ in range(10):
        n = v.producer
        if n is None:
            return None
        if n.op == "Concat":
            src = past_source(n.input(0)) if n.input(0) is not None else None
            return n if src is not None and src.name == past else None
        if n.op not in _LAYOUT + ("Expand", "Tile"):
            return None
        v = n.input(0)
    return None


def plain_from(v, node: str) -> bool:
    """`v` is projection `node`'s output reshaped to heads (a bias Add aside): nothing that
    depends on positions (a rotary embedding) in between."""
    for _ in range(8):
        n = v.producer
        if n is None:
            return False
        if n.name == node:
            return True
        if n.op == "Add" and any(i is not None and i.const is not None for i in n.inputs):
            v = next(i for i in n.inputs if i is not None and i.const is None)
        elif n.op in _LAYOUT:
            v = n.input(0)
        else:
            return False
    return False


def factorise(w: np.ndarray, rank: int, x: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(down [D, R], up [R, N]) with down · up the best rank-R approximation of `w` [D, N]
    (of x · w on the activations `x` [n, D], where given)."""
    target = w if x is None else x.reshape(-1, x.shape[-1]).astype(np.float64) @ w
    _, _, vt = np.linalg.svd(target, full_matrices=False)
    basis = vt[:rank]  # [R, N]
    return w @ basis.T, basis


@dataclass(frozen=True)
class LatentPass(Pass):
    name: ClassVar[str] = "latent"
    why: ClassVar[str] = "K/V projections through one low-rank latent; a decoder step caches it (MHA → MLA)"
    produces: ClassVar[str] = "latent"
    once: ClassVar[bool] = True
    changes_cache: ClassVar[bool] = True  # a decoder step's cache inputs/outputs are replaced
    rank: int | None = option(None, "the latent's width R per token (required; full rank = exact)", low=1)
    rope_dims: int | None = option(None, "rotary key dimensions kept per KV head outside the latent "
                                         "(default: the head dim, exact)", low=0)

    def __post_init__(self):
        if self.rank is None:
            raise UserError("latent: rank=R is required (e.g. latent:rank=64)")

    def is_exact(self) -> bool:
        return False  # exact only at full rank, which depends on the site; the report gives the error

    def partial(self, site) -> bool:
        """A step whose K is rotated and rope_dims keeps fewer than every dim (partial RoPE)."""
        return (site.cache is not None and self.rope_dims is not None and self.rope_dims < site.head_dim
                and not self._k_plain(site))

    def rope_kept(self, site) -> tuple[int, ...]:
        """The rotated K dims (per kv head) kept outside the latent: rope_dims/2 frequency
        pairs (i, i + d/2), those with the most query·key weight energy over the heads
        (‖W_q,h,i‖·‖W_k,g(h),i‖ summed over both dims of a pair and every head; MHA2MLA's
        2-norm choice, here from the weights)."""
        d, h, g = site.head_dim, site.heads, site.heads // site.kv_heads
        wq = np.linalg.norm(weight(site.projections["q"]), axis=0).reshape(h, d)
        wk = np.linalg.norm(weight(site.projections["k"]), axis=0).reshape(site.kv_heads, d)
        energy = (wq * wk[np.arange(h) // g]).sum(0)
        pairs = energy[: d // 2] + energy[d // 2:]
        top = sorted(np.argsort(-pairs, kind="stable")[: self.rope_dims // 2].tolist())
        return tuple(top + [i + d // 2 for i in top])

    def joint(self, site) -> tuple[list[str], np.ndarray]:
        """Which projections go in the latent ("k", "v") and their joint weight [D, N]
        (with partial RoPE, K's columns outside the kept rotary dims)."""
        if site.cache is not None and not self._k_plain(site):
            if not self.partial(site):
                return ["v"], weight(site.projections["v"])
            return ["k", "v"], np.concatenate([self._k_nope(site), weight(site.projections["v"])], axis=1)
        return ["k", "v"], np.concatenate([weight(site.projections[p]) for p in ("k", "v")], axis=1)

    def _k_nope(self, site, w=None) -> np.ndarray:
        d, keep = site.head_dim, set(self.rope_kept(site))
        cols = [g * d + i for g in range(site.kv_heads) for i in range(d) if i not in keep]
        w = weight(site.projections["k"]) if w is None else w
        return w[..., cols]

    @staticmethod
    def _k_plain(site) -> bool:
        concat = cache_concat(site, "key")
        return concat is not None and plain_from(concat.input(1), site.projections["k"].node)

    def skip_reason(self, site) -> str | None:
        if site.region:
            return ("latent rewrites projections and the cache where the model's graph holds them "
                    f"(site in {site.region})")
        if reads_own_cache(site):
            return "a fused op that reads its own present cache: rewrite the step before fusing it"
        if site.head_dim is None or site.kv_heads is None:
            return "heads or head size unknown (the model did not run on sample inputs)"
        if self.rope_dims is not None and self.rope_dims > site.head_dim:
            raise UserError(f"latent: rope_dims={self.rope_dims} is above the head dim ({site.head_dim}) "
                            f"of site {site.id}")
        k, v = site.projections.get("k"), site.projections.get("v")
        if k is None or v is None or k.weight.const is None or v.weight.const is None:
            return "K or V is not computed by a projection with constant weights"
        if k.node == v.node:
            return "K and V come from one fused QKV projection (a Split after it): latent factorises separate ones"
        if k.x.name != v.x.name:
            return "K and V are projected from different hidden states"
        if site.cache is not None:
            c = site.cache
            if c.present_key is None or c.present_value is None:
                return "the step does not return this site's cache"
            if c.static_past:
                return f"its cache input {c.past_key} has a static length: the latent cache needs a dynamic past axis"
            concat_v = cache_concat(site, "value")
            if concat_v is None or not plain_from(concat_v.input(1), v.node) or cache_concat(site, "key") is None:
                return "its cache is not Concat(past, new projection) for K and V"
            if self.partial(site):
                if self.rope_dims % 2:
                    raise UserError(f"latent: rope_dims={self.rope_dims} is odd: rotary dims come in pairs "
                                    "(i, i + d/2)")
                if isinstance(why := rotary(site.q.value, site.head_dim), str):
                    return f"partial RoPE turns the queries' dropped rotary dims back: {why}"
                if "q" not in site.projections or site.projections["q"].weight.const is None:
                    return "partial RoPE chooses dims by the Q/K weights: no Q projection with constant weights"
                if site.q.fold or site.q.perm not in (None, (0, 2, 1, 3)):
                    return "partial RoPE reads Q in [B, H, S, d] layout"
        parts, w = self.joint(site)
        full = min(w.shape)
        if self.rank > full:
            raise UserError(f"latent: rank={self.rank} is above the full rank {full} of site {site.id}'s joint "
                            f"{'/'.join(p.upper() for p in parts)} projection ({w.shape[0]}x{w.shape[1]}); "
                            f"give rank <= {full}")
        return None

    def _costs(self, site, up_k, up_v, partial) -> tuple[int, int]:
        """Multiply-adds per cached token per step, K in the latent: (absorbed, up-projected).
        Absorbed: H·(kept + R + 1) scores + H·(R + 1) for P·[c, 1]; up-projected: the cache
        to K's latent dims and V, R·(Hkv·d_nope + Hkv·dv), then H·(d + dv) for QKᵀ and PV."""
        h, r, d = site.heads, self.rank, site.head_dim
        kept = len(self.rope_kept(site)) if partial else 0
        dv = up_v.shape[1] // site.kv_heads
        return h * (kept + 2 * r + 2), r * (up_k.shape[1] + up_v.shape[1]) + h * (d + dv)

    def _absorb_pays(self, site, up_k, up_v, partial) -> bool:
        absorbed, projected = self._costs(site, up_k, up_v, partial)
        return absorbed < projected

    def _absorb_note(self, site, lat) -> str:
        h, hkv, r = site.heads, site.kv_heads, self.rank
        dv = lat.up_v.shape[1] // hkv
        if lat.up_k is not None:
            absorbed, projected = self._costs(site, lat.up_k, lat.up_v, lat.rope is not None)
            if lat.absorb:
                return (f"; K's and V's up-projections absorbed: scores (q·W_ukᵀ)·[c, 1]ᵀ and P·[c, 1] in the latent "
                        f"space, {absorbed} multiply-adds per cached token per step instead of {projected} up-projecting "
                        "the cache")
            return (f"; up-projections not absorbed (a heads-in-batch or non-float32 site, or absorbing costs "
                    f"{absorbed} multiply-adds per cached token per step against {projected}): each step "
                    "up-projects the cached latent")
        if not lat.absorb:
            return ("; up-projections not absorbed (a heads-in-batch or non-float32 site): each step up-projects the "
                    "cached latent")
        return (f"; V's up-projection absorbed: per cached token a step multiplies H·(R+1) = {h * (r + 1)} values of "
                f"P·[c, 1] instead of up-projecting R·Hkv·dv = {r * hkv * dv} (then one [R+1, dv] product per head "
                "and query)")

    def activations(self, sites) -> dict:
        """Per site, the hidden state its K/V projections read (calibration fits the SVD on it)."""
        return {s.id: s.projections["v"].x for s in sites}

    def form(self, site, diag=None) -> Form:
        parts, w = self.joint(site)
        x = diag.get("x") if isinstance(diag, dict) else None
        down, up = factorise(w, self.rank, x)
        k, v = site.projections["k"], site.projections["v"]
        nk = w.shape[1] - weight(v).shape[1]  # K's columns in the joint weight (0: K keeps its own cache)
        up_k, up_v = (up[:, :nk], up[:, nk:]) if nk else (None, up)
        step = site.cache is not None
        partial = self.partial(site)
        bias_k = added_bias(k) if step and nk else None
        if partial and bias_k is not None:
            bias_k = self._k_nope(site, bias_k)
        absorb = step and not site.q.fold and site.output.dtype in (None, "float32") and (
            not nk or self._absorb_pays(site, up_k, up_v, partial))
        lat = Latent(self.rank, v.x, k, v, down, up_k, up_v, bias_k=bias_k, bias_v=added_bias(v) if step else None,
                     cache=step, rope=self.rope_kept(site) if partial else None,
                     rotary=rotary(site.q.value, site.head_dim) if partial else None, absorb=absorb)
        full = min(w.shape)
        exact = self.rank >= full and not partial
        notes = [f"latent rank {self.rank} of {full} ({'exact: full rank' if exact else 'approximate'}), "
                 f"{'/'.join(p.upper() for p in parts)} from c = x·W_down, SVD of "
                 + ("the projections' activations on the calibration inputs" if x is not None else "the weights")]
        d, hkv = site.head_dim, site.kv_heads
        dv = weight(v).shape[1] // hkv
        before = hkv * (d + dv)
        if step:
            kept = len(lat.rope) if partial else (0 if nk else d)
            after = self.rank + hkv * kept
            what = (f"K dims {list(lat.rope)} of each kv head kept rotated (partial RoPE: the other dims lose their "
                    "rotation, approximate at any rank), the rest of K and V in the latent" if partial else
                    "K and V in the latent" if nk else "the rotated K kept whole as the rotary part, V in the latent")
            size = np.dtype(site.output.dtype or "float32").itemsize if (site.output.dtype or "float32") in (
                "float32", "float16", "float64") else 2
            notes.append(f"cache per token per layer: {before} → {after} values, {before * size} → {after * size} "
                         f"bytes ({after / before:.0%}; {what}"
                         + ")" + self._absorb_note(site, lat))
        else:
            n = w.shape[1]
            notes.append(f"K/V projection weights: {w.shape[0] * n} → {w.shape[0] * self.rank + self.rank * n}")
        if self.rope_dims is not None and not partial and (not step or nk):
            notes.append(f"rope_dims={self.rope_dims} unused here: " + ("no cache to keep rotary dims in (not a "
                         "decoder step)" if not step else "its K is not rotated after the projection"))
        return Form(latent=lat, notes=tuple(notes))
