"""The pipeline's steps on ONNX models (see pipeline/run.py for the list).

Every step works on the weightless graph: the weights stay in their files, ORT maps them
itself, and each model is run once per pass (its outputs, the values detection probes and
the shapes FLOP counting could not infer come back from that one run).
"""

from __future__ import annotations

import numpy as np

from attn_opt.patterns.detect import match, needed
from attn_opt.core.errors import DoesNotRun, UserError, first_line as _first_line
from attn_opt.core.ir import onnx as onnx_adapter
from attn_opt.core.ir import onnx_flops
from attn_opt.core.ir.onnx_model import OnnxModel, split_feeds
from attn_opt.pipeline.onnx_decode import with_empty_caches
from attn_opt.pipeline.run import State, outputs_epsilon


def _opset(proto_or_model) -> int:
    imports = proto_or_model.opset_imports if hasattr(proto_or_model, "opset_imports") else None
    if imports is not None:
        return imports.get("", imports.get("ai.onnx", 0))
    return next((o.version for o in proto_or_model.opset_import if o.domain in ("", "ai.onnx")), 0)


class OnnxSteps:
    ir = "onnx"
    along: list = []  # input sets each whole run of a model also runs (run_along)

    def run_along(self, sets: list) -> None:
        """Run `sets` with every observing run: the session serves them too, and later runs of
        that graph on them are answered from what it gave (core/ir/onnx_runs.py)."""
        self.along = list(sets)

    def load(self, path: str) -> OnnxModel:
        return onnx_adapter.load(path)

    def input_specs(self, model: OnnxModel, view=None) -> list:
        return onnx_adapter.input_specs(view if view is not None else onnx_adapter.view(model))

    def run_check(self, model: OnnxModel, hint: str):
        """What refuses, from shapes alone, a run of the model that would not fit in memory."""
        from attn_opt.core.ir.onnx_memory import check_run

        proto = model.graph_proto()
        return lambda shapes: check_run(proto, shapes, hint)

    def weight_bytes(self, model: OnnxModel) -> int:
        return model.weight_bytes()

    def save(self, model: OnnxModel, path: str, feeds, share: bool = False) -> str | None:
        data = model.save(path, share=share)
        return data.name if data else None

    def variants(self, model: OnnxModel, feeds, overrides, view=None) -> list:
        """A padded batch, another length, and for a decoder step, four steps of its
        generation loop after the fidelity inputs' first row of tokens as the prompt."""
        from attn_opt.core.inputs import fidelity_variants
        from attn_opt.pipeline.onnx_decode import DECODE_STEPS, decode_check, loop_of

        gv = view if view is not None else onnx_adapter.view(model)
        specs = onnx_adapter.input_specs(gv)
        out = fidelity_variants(feeds, specs, overrides)
        try:
            loop = loop_of(gv, specs)
        except UserError:  # a cache it does not return, or a static past: not a loop to run (generate says why)
            loop = None
        if loop is not None:
            out.append((f"decode x{DECODE_STEPS}", decode_check(loop, feeds[loop.ids][:1], DECODE_STEPS)))
        return out

    def observe(self, model: OnnxModel, feeds, run: bool = True, known: State | None = None) -> State:
        """View, match, one run (outputs + probes + missing shapes), detect, count. With
        `known` (the same function before an opset conversion, or the model before a pass
        when nothing runs) its values are reused and the model runs only for what they lack.
        Without a run, Q, K and V (read for their shapes) stand in as zero-strided arrays
        where inference sized them, so no layer's projections are computed for them."""
        om, proto = onnx_adapter.shaped(model)
        feeds = split_feeds(om.ir, feeds)  # a cache a rewrite split by KV group (per-head streaming)
        gv = onnx_adapter.view(om)
        feeds = with_empty_caches(gv, onnx_adapter.input_specs(gv), feeds)
        found = match(gv)
        shapes, missing = onnx_flops.static_shapes(proto, feeds)
        stand_ins = {} if run else _shape_stand_ins(found, shapes)
        names = [v.name for v in needed(found) if v.const is None and v.name not in stand_ins]
        control = [n for n in onnx_flops.control_values(proto) if n not in feeds]  # If taken, Loop trips
        want = list(dict.fromkeys(names + missing + control))
        have = dict(known.view.probed) if known is not None and (known.outputs is not None or not run) else {}
        lack = [n for n in want if n not in have]
        outputs = known.outputs if run and known is not None else None
        # the values whose shapes inference missed are kept too: the next observe may miss them again
        probed = {n: have[n] for n in want if n in have}
        if lack or (run and outputs is None):
            try:
                if run:
                    top = lambda ns: om.run(feeds, ns, also=self.along)  # noqa: E731
                else:  # what detection and counting need, one segment of weights in memory at a time
                    from attn_opt.core.ir.onnx_runs import segment_budget
                    from attn_opt.core.ir.onnx_segments import run_segmented

                    budget = segment_budget(om.weight_bytes(), parts=len(found.candidates))  # about a layer
                    top = lambda ns: run_segmented(om, feeds, set(ns), budget, shapes)  # noqa: E731
                got = onnx_adapter.probe(gv, feeds, lack, top)  # regions: run alone
            except UserError:  # refused before it ran (the memory limit): said as it is
                raise
            except Exception as e:
                raise DoesNotRun(f"the model does not run in ONNX Runtime on these inputs ({_first_line(e)[:300]}); "
                                "give --inputs FILE.npz or --input-shape NAME=DIMS") from None
            outs = {o.name for o in proto.graph.output}
            outputs = {k: v for k, v in got.items() if k in outs} if run else None
            probed.update({k: v for k, v in got.items() if k not in outs or k in names})
        shapes.update({k: tuple(np.shape(v)) for k, v in probed.items()})
        gv.remember(feeds, probed)
        det = found.finish(gv, {**stand_ins, **probed}, None, feeds)
        attention = {n for s in det.sites for n in s.nodes}
        flops = onnx_flops.count_shapes(proto, shapes, attention, {**probed, **feeds})
        return State(om, gv, det, outputs, flops, onnx_flops.params(proto))

    def prepare(self, state: State, p, feeds, run: bool = True) -> State:
        """Convert to the opset the pass needs (on the weightless graph); re-observe if so."""
        need = self.opset_for(p)
        upgraded = self.upgrade(state.model, need, p.name) if need else state.model
        if upgraded is state.model:
            return state
        new = self.observe(upgraded, feeds, run, known=state)
        lost = [s.id for s in state.det.sites[len(new.det.sites):]] if len(new.det.sites) < len(state.det.sites) else []
        if lost:
            raise UserError(f"{p.name}: converting the model from opset {_opset(state.model.ir)} to {need} loses "
                            f"site(s) {', '.join(lost)} ({len(state.det.sites)} found before, {len(new.det.sites)} "
                            "after); nothing written")
        return new

    @staticmethod
    def opset_for(p) -> int | None:
        """The opset the lowering of `p`'s forms needs, if it rewrites sites."""
        from attn_opt.backends.onnx.lower import opset_for

        return opset_for(p.produces) if p.touches_sites() else None

    def upgrade(self, om: OnnxModel, need: int, why: str) -> OnnxModel:
        """The model at opset `need` (converted on the weightless graph), or itself."""
        from attn_opt.core.ir.onnx_opset import convert, lowest_opset

        cur = _opset(om.ir)
        if lowest_opset(om.ir) >= need:
            return om
        proto = om.graph_proto()
        try:  # local functions and node metadata (module scopes: layers) kept
            new = convert(proto, need)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"cannot convert the model from opset {cur} to {need} for {why} ({_first_line(e)})") from None
        upgraded = OnnxModel.from_proto(new, om.folder, om.source)
        upgraded.external_input, upgraded._keep = om.external_input, om._keep
        return upgraded

    def snapshot(self, state: State) -> OnnxModel:
        return state.model.clone()

    def lower(self, state: State, site, form, pass_name: str) -> str | None:
        from attn_opt.backends.onnx.edit import SiteEdit
        from attn_opt.backends.onnx.lower import lower

        edit = SiteEdit(state.model.ir, site, pass_name)
        note = lower(edit, form)
        if edit.in_fp32:
            note = (note + "; " if note else "") + f"computed in float32 inside (the site is {edit.site_dtype()})"
        return note

    def supports(self, site, form) -> str | None:
        """Why the backend cannot lower `form` for `site` (its declared capabilities), or None."""
        from attn_opt.backends.onnx.lower import CAPABILITIES

        return CAPABILITIES.supports(site, form)

    def calibrate(self, model: OnnxModel, old_sites, rewritten, calib, heldout, progress, lora=0, targets=None):
        from attn_opt.pipeline.calibrate import calibrate

        return calibrate(model, old_sites, rewritten, calib, heldout, progress, lora, targets)

    def stream_gates(self, state: State, site_ids, feeds, p):
        from attn_opt.pipeline.stream_gates import fit_gates

        return fit_gates(state.model, site_ids, feeds, p.sinks, p.window, p.gate_l1)

    def graph_edit(self, state: State, edit: str) -> list[str]:
        from attn_opt.backends.onnx.lower import GRAPH_EDITS

        return GRAPH_EDITS[edit](state.model.ir, state.view)

    def finish(self, state: State) -> None:
        from attn_opt.backends.onnx.edit import sweep

        sweep(state.model.ir)

    def validate(self, model: OnnxModel) -> None:
        model.check(full=True)

    def logit_outputs(self, state: State) -> set[str]:
        """Outputs that are logits: named so, or sized like the vocabulary (the rows of the
        largest table a Gather looks tokens up in), not like any weight (a hidden size)."""
        tables = [n.inputs[0] for n in state.model.ir.graph if n.op_type == "Gather" and n.inputs
                  and n.inputs[0] is not None and n.inputs[0].const_value is not None]
        rows = [int(v.const_value.shape[0]) for v in tables if len(v.const_value.shape) == 2]
        vocab = {max(rows)} if rows and max(rows) >= 100 else set()  # the token table, not positions
        return {k for k, v in (state.outputs or {}).items()
                if "logit" in k.lower() or (np.ndim(v) >= 2 and np.shape(v)[-1] in vocab)}

    def output_epsilon(self, state: State) -> float | None:
        return outputs_epsilon(state.outputs)

    def outputs_on(self, model: OnnxModel, feeds) -> dict:
        """The model's outputs on other inputs (the fidelity variants); a variant that is a
        function of the model (a decoder step's generation loop) is called with it."""
        if callable(feeds):
            return feeds(model)
        if not {v.name for v in model.ir.graph.inputs} <= set(feeds):  # a cache a pass replaced
            gv = onnx_adapter.view(model)
            feeds = with_empty_caches(gv, onnx_adapter.input_specs(gv), feeds)
        return model.run(feeds)

    def first_step(self, model: OnnxModel, feeds) -> dict:
        """The fidelity inputs as a decoder step's first call (for passes that replace the cache)."""
        from attn_opt.pipeline.onnx_decode import first_step

        gv = onnx_adapter.view(model)
        return first_step(gv, onnx_adapter.input_specs(gv), feeds)

    def view_for_diff(self, model: OnnxModel, feeds):
        return onnx_adapter.view(onnx_adapter.with_shapes(model))

    def check_sites(self, before: OnnxModel, after: OnnxModel, site_ids, feeds):
        from attn_opt.core.ir.onnx_segments import check_sites

        return check_sites(before, after, site_ids, feeds)


def _shape_stand_ins(found, shapes: dict) -> dict[str, np.ndarray]:
    """Q, K, V (and the 4-D scores of heads folded into the batch) of each candidate, where
    static inference gave their shape and they are in the model's own graph: detection
    reads only their shapes, so a zero-strided array of that shape serves (no memory, no
    run). Values it did not size are run as before."""
    out = {}
    for c in found.candidates:
        for v in (c.q.value, c.k.value, c.v.value, c.unfold):
            if (v is None or v.const is not None or v.name not in shapes or not v.dtype
                    or (v.producer is not None and v.producer.region)):
                continue
            out[v.name] = np.broadcast_to(np.zeros((), np.dtype(v.dtype)), shapes[v.name])
    return out

