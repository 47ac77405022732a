"""What the pipeline asks of an IR: the step adapter protocol. `OnnxSteps`
(pipeline/onnx_steps.py) and `FxSteps` (pipeline/fx_steps.py) implement it, and the
pipeline (pipeline/run.py) and the front door (attn_opt/api.py) reach an IR only through
it, so neither branches on which IR a model is."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class Steps(Protocol):
    ir: str  # "onnx" | "fx": for messages and reports only

    # -- the model in and out
    def load(self, path: str) -> Any:
        """The model in a file (weights left where they are), vetted; UserError if unreadable."""

    def input_specs(self, model, view=None) -> list:
        """The model's inputs (core/inputs.py: InputSpec) for generated and checked feeds
        (`view`: the model's view where the caller has it, so it is not built again)."""

    def run_check(self, model, hint: str):
        """A function refusing (UserError, `hint` said) input shapes a run would not fit in
        memory with, decided from the shapes alone; None where runs are not estimated."""

    def weight_bytes(self, model) -> int:
        """Bytes of weights, for choosing how a model can be checked."""

    def save(self, model, path: str, feeds: dict[str, np.ndarray]) -> str | None:
        """Write the model atomically; the external data file's name, if one was written."""

    def variants(self, model, feeds: dict, overrides, view=None) -> list:
        """(label, feeds or a function of the model) the passes are also checked on."""

    # -- one model as the pipeline sees it
    def observe(self, model, feeds: dict, run: bool = True, known=None):
        """View, match, read what detection needs (a whole run when `run`), detect, count: a State.
        `known`: a state of the same function whose read values may serve (without a run)."""

    def prepare(self, state, p, feeds: dict, run: bool = True):
        """The state the pass starts from (an opset conversion where it needs one)."""

    def snapshot(self, state) -> Any:
        """A copy of the state's model that later edits do not touch."""

    # -- rewriting
    def supports(self, site, form) -> str | None:
        """Why the backend cannot lower `form` for `site` (its declared capabilities), or None."""

    def lower(self, state, site, form, pass_name: str) -> str | None:
        """Emit `form` in place of `site`; a note for the report."""

    def graph_edit(self, state, edit: str) -> list[str]:
        """A whole-graph edit a pass asks for, by name; notes."""

    def finish(self, state) -> None:
        """Remove what the rewrites left dead."""

    def validate(self, model) -> None:
        """UserError unless the model is valid (onnx.checker / graph.lint)."""

    def calibrate(self, model, old_sites, rewritten, calib, heldout, progress, lora=0, targets=None) -> list:
        """Fit the rewritten sites' parameters (pipeline/calibrate.py): the fits."""

    def stream_gates(self, state, site_ids, feeds, p):
        """DuoAttention's gates per KV group of the sites (pipeline/stream_gates.py): a GateFit."""

    # -- checking
    def run_along(self, sets: list) -> None:
        """Input sets (the check's variants) every whole run of a model serves too, where the
        IR can share its runs (ONNX: one session per model); a no-op elsewhere."""

    def outputs_on(self, model, feeds) -> dict[str, np.ndarray]:
        """The model's outputs on other inputs (a callable variant is called with the model)."""

    def logit_outputs(self, state) -> set[str]:
        """The outputs that are logits (their fidelity adds KL and top-1)."""

    def output_epsilon(self, state) -> float | None:
        """Machine epsilon of the coarsest floating output (exact passes' bound)."""

    def check_sites(self, before, after, site_ids, feeds) -> dict:
        """Per rewritten site, its fidelity on the activations of the model before the pass."""

    def view_for_diff(self, model, feeds):
        """The model's GraphView for the diff page."""
