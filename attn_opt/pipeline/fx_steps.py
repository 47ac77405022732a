"""The pipeline's steps on torch.fx GraphModules (see pipeline/run.py for the list).

One run of the module per step gives its outputs, the values detection probes and the
FLOPs of every node (torch's FlopCounterMode per node, with the CPU SDPA kernel it does
not know added), so FLOPs mean what they mean on ONNX: matrix products, 2 per
multiply-add, attention FLOPs those of the nodes a site covers or a pass emitted.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import fx
from torch.utils.flop_counter import FlopCounterMode

from attn_opt.patterns.detect import match, needed
from attn_opt.core.errors import DoesNotRun, NotSupported, UserError, first_line
from attn_opt.core.graph import FORM_KEY, SITE_TAG
from attn_opt.core.ir import fx as fx_adapter
from attn_opt.core.ir.onnx_flops import Flops
from attn_opt.pipeline.run import State, outputs_epsilon


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """torch's CPU SDPA kernel: Q·Kᵀ and P·V (FlopCounterMode has formulas only for GPU kernels)."""
    b, h, lq, e = query_shape
    return 2 * b * h * lq * key_shape[-2] * (e + value_shape[-1])


CUSTOM_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}


class _Run(fx.Interpreter):
    """Runs the module once, keeping the wanted values and each node's FLOPs; with `only`,
    computes just those nodes (the cone of the values detection reads) and skips the rest."""

    def __init__(self, gm, wanted: set[str], only: set[str] | None = None):
        super().__init__(gm)
        self.wanted, self.only, self.seen, self.flops = wanted, only, {}, {}

    def run_node(self, n):
        if n.op not in ("call_function", "call_method", "call_module"):
            return super().run_node(n)
        if self.only is not None and n.name not in self.only:
            return None
        with FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS) as counter:
            out = super().run_node(n)
        self.flops[n.name] = counter.get_total_flops()
        if n.name in self.wanted:
            self.seen[n.name] = out[0] if isinstance(out, (tuple, list)) else out
        return out


def _cone(gm: fx.GraphModule, names: set[str]) -> set[str]:
    """The nodes the named ones are computed from (themselves included)."""
    by_name = {n.name: n for n in gm.graph.nodes}
    out, stack = set(), [by_name[x] for x in names if x in by_name]
    while stack:
        n = stack.pop()
        if n.name in out:
            continue
        out.add(n.name)
        stack.extend(n.all_input_nodes)
    return out


def _observe_without_running(gm: fx.GraphModule, args, found) -> tuple[dict, dict]:
    """(probed, FLOPs per node) without running the module: shapes and FLOPs
    from one pass over fake tensors (no arithmetic), and the values detection reads
    (masks, scale factors) computed from their own cone of nodes, which holds no
    attention and no weight product. Q, K, V stand in as zero-strided arrays of their shapes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    shape_only = {id(v) for c in found.candidates for v in (c.q.value, c.k.value, c.v.value, c.unfold) if v is not None}
    values = [v for v in needed(found) if v.const is None]
    real = {v.name for v in values if id(v) not in shape_only}
    shapes = {v.name for v in values if id(v) in shape_only}
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = _Run(gm, shapes)
        with torch.no_grad():
            fake.run(*[mode.from_tensor(a) for a in args])
    probed = {k: np.broadcast_to(np.zeros((), dtype=fx_adapter._to_numpy(torch.zeros((), dtype=t.dtype)).dtype),
                                 tuple(t.shape)) for k, t in fake.seen.items() if isinstance(t, torch.Tensor)}
    rec = _Run(gm, real, only=_cone(gm, real))
    with torch.no_grad():
        rec.run(*args)
    probed |= {k: a for k, t in rec.seen.items() if (a := fx_adapter._to_numpy(t)) is not None}
    return probed, fake.flops


class _Forced(fx.Interpreter):
    """Runs a rewritten module where every node it shares with the module before the pass
    takes that module's value: only the pass's new nodes compute."""

    def __init__(self, gm, old: dict):
        super().__init__(gm)
        self.old, self.values = old, {}

    def run_node(self, n):
        if n.name in self.old and n.op not in ("placeholder", "output"):
            out = self.old[n.name]
        else:
            out = super().run_node(n)
        self.values[n.name] = out
        return out


def outputs_of(out) -> dict[str, np.ndarray]:
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
    return {str(i): fx_adapter._to_numpy(t) for i, t in enumerate(tensors)}


def placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def args_of(gm: fx.GraphModule, feeds: dict[str, np.ndarray]) -> tuple:
    ph = placeholders(gm)
    missing = [p.name for p in ph if p.name not in feeds]
    if missing:
        raise UserError(f"no value for the program's inputs {missing}; it takes {[p.name for p in ph]}")
    return tuple(torch.from_numpy(np.ascontiguousarray(feeds[p.name])) for p in ph)


def feeds_of(gm: fx.GraphModule, example_inputs) -> dict:
    """Example inputs as the pipeline's feeds (placeholder name -> array)."""
    return {p.name: fx_adapter._to_numpy(x) for p, x in zip(placeholders(gm), example_inputs)}


def run_module(fn, args) -> dict[str, np.ndarray]:
    with torch.no_grad():
        return outputs_of(fn(*args))


class FxSteps:
    ir = "fx"

    def load(self, path: str) -> fx.GraphModule:
        from attn_opt.core.ir import load

        return load(path).native

    def input_specs(self, gm: fx.GraphModule, view=None) -> list:
        return fx_adapter.input_specs(view if view is not None else fx_adapter.view(gm))

    def run_check(self, gm: fx.GraphModule, hint: str):
        return None  # a program's run is not estimated from shapes (its inputs are, by their headers)

    def weight_bytes(self, gm: fx.GraphModule) -> int:
        return 0  # a torch program is checked whole: its weights are in memory already

    def save(self, gm: fx.GraphModule, path: str, feeds) -> None:
        """torch.export.save of the rewritten program, traced on the fidelity inputs."""
        from attn_opt.core.io import atomic_path

        program = torch.export.export(gm, args_of(gm, feeds))
        with atomic_path(path) as tmp:
            torch.export.save(program, tmp)

    def variants(self, gm: fx.GraphModule, feeds, overrides, view=None) -> list:
        from attn_opt.core.inputs import fidelity_variants

        return fidelity_variants(feeds, self.input_specs(gm, view), overrides)

    def observe(self, gm: fx.GraphModule, feeds, run: bool = True, known: State | None = None) -> State:
        """With `run`: one run gives the outputs, the probed values and each node's FLOPs.
        Without: the module is not run (shapes and FLOPs over fake tensors, mask values
        from their own small cone of nodes) and there are no outputs."""
        args = args_of(gm, feeds)
        gv = fx_adapter.view(gm, args)
        found = match(gv)
        outputs = None
        try:
            if run:
                rec = _Run(gm, {v.name for v in needed(found)})
                with torch.no_grad():
                    outputs = outputs_of(rec.run(*args))
                probed, flops = {k: a for k, t in rec.seen.items() if (a := fx_adapter._to_numpy(t)) is not None}, \
                    rec.flops
            else:
                probed, flops = _observe_without_running(gm, args, found)
        except Exception as e:
            raise DoesNotRun(f"the program does not run on these inputs ({first_line(e)[:300]})") from None
        gv.remember(feeds, probed)
        det = found.finish(gv, probed, None, feeds)
        covered = {n for s in det.sites for n in s.nodes}
        tagged = {n.name for n in gm.graph.nodes if SITE_TAG in n.meta or FORM_KEY in n.meta}
        total = sum(flops.values())
        att = sum(f for k, f in flops.items() if k in covered or k in tagged)
        return State(gm, gv, det, outputs, Flops(total, total, att, att), self.param_count(gm))

    @staticmethod
    def param_count(gm: fx.GraphModule) -> int:
        return sum(p.numel() for p in gm.parameters()) + sum(b.numel() for b in gm.buffers() if b.is_floating_point())

    def prepare(self, state: State, p, feeds, run: bool = True) -> State:
        return state

    def snapshot(self, state: State) -> fx.GraphModule:
        return copy.deepcopy(state.model)

    def lower(self, state: State, site, form, pass_name: str) -> str | None:
        from attn_opt.backends.torch.fx import lower

        return lower(state.model, site, form)

    def supports(self, site, form) -> str | None:
        """Why the backend cannot lower `form` for `site` (its declared capabilities), or None."""
        from attn_opt.backends.torch.fx import CAPABILITIES

        return CAPABILITIES.supports(site, form)

    def calibrate(self, gm, old_sites, rewritten, calib, heldout, progress, lora=0, targets=None):
        from attn_opt.pipeline.calibrate import calibrate_fx

        return calibrate_fx(gm, old_sites, rewritten, calib, heldout, progress, lora, targets)

    def stream_gates(self, state: State, site_ids, feeds, p):
        raise NotSupported(f"{p.name}: full_heads=auto with --calibrate (DuoAttention gate fitting) is implemented on "
                           "ONNX models only; on torch.fx give full_heads=auto without --calibrate, or name the groups")

    def graph_edit(self, state: State, edit: str) -> list[str]:
        from attn_opt.backends.torch.fx import GRAPH_EDITS

        if edit not in GRAPH_EDITS:
            raise NotSupported(f"{edit} is not lowered to torch.fx yet (it runs on ONNX models)")
        return GRAPH_EDITS[edit](state.model, state.view)

    def finish(self, state: State) -> None:
        gm = state.model
        gm.graph.eliminate_dead_code()
        gm.recompile()

    def validate(self, gm: fx.GraphModule) -> None:
        try:
            gm.graph.lint()
        except Exception as e:
            raise UserError(f"the rewritten graph is not valid ({str(e).splitlines()[0]})") from None

    def logit_outputs(self, state: State) -> set[str]:
        return set()

    def output_epsilon(self, state: State) -> float | None:
        """Machine epsilon of the coarsest floating output, read from the graph (bfloat16
        outputs come back as float32 arrays)."""
        out = next(n for n in state.model.graph.nodes if n.op == "output")
        eps = []

        def visit(a):
            v = a.meta.get("val") if isinstance(a, fx.Node) else None
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                eps.append(float(torch.finfo(v.dtype).eps))
            return a

        fx.node.map_arg(out.args, visit)
        return max(eps + [e for e in [outputs_epsilon(state.outputs)] if e is not None], default=None)

    def run_along(self, sets: list) -> None:
        """torch.fx runs each input set by itself: nothing is set up to share."""

    def outputs_on(self, gm: fx.GraphModule, feeds) -> dict:
        """The module's outputs on other inputs (the fidelity variants)."""
        return run_module(gm, args_of(gm, feeds))

    def view_for_diff(self, gm: fx.GraphModule, feeds):
        return fx_adapter.view(gm, args_of(gm, feeds))

    def check_sites(self, before: fx.GraphModule, after: fx.GraphModule, site_ids, feeds) -> dict:
        """Per rewritten site: its new nodes on the activations the module before the pass
        computed (every node the pass kept takes its value from that run, so errors do not
        compound), against that module's site output."""
        from attn_opt.core import fidelity

        args = args_of(before, feeds)
        rec = _Forced(before, {})  # forcing nothing: a record of every node's value
        with torch.no_grad():
            rec.run(*args)
        old = rec.values
        forced = _Forced(after, old)
        with torch.no_grad():
            forced.run(*args)
        before_nodes = {n.name: n for n in before.graph.nodes}
        out = {}
        for n in after.graph.nodes:
            sid = n.meta.get(SITE_TAG)
            if sid not in site_ids or n.name in before_nodes:
                continue
            pairs = []
            for u in n.users:  # the consumer's argument that was the old site output
                b = before_nodes.get(u.name)
                if b is None:
                    continue
                for a_new, a_old in zip(u.all_input_nodes, b.all_input_nodes):
                    if a_new is n and a_old.name in old:
                        pairs.append(a_old.name)
            if pairs and n.name in forced.values:
                got = fx_adapter._to_numpy(forced.values[n.name])
                out[sid] = fidelity.worst({k: fidelity.compare(fx_adapter._to_numpy(old[k]), got) for k in pairs})
        return out
