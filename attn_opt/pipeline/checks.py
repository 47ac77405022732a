"""How the pipeline checks each pass (`--check`), one strategy per choice:

    ModelCheck  run the whole model after every pass: fidelity against the original and
                the previous step on the fidelity inputs and on every variant input set
                (a padded batch, another length, a decoder's generation loop)
    SitesCheck  never run the whole model: each rewritten site alone, on the activations
                the model before the pass computed, one segment of weights at a time
    NoCheck     validity only: the model is not run for fidelity

`check(name)` turns the user's word into its strategy; "model", "sites" and "none" mean
the same on the command line, in `attn_opt.optimize` and in the torch.compile backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from attn_opt.core import fidelity
from attn_opt.core.errors import UserError, first_line

CHECKS = ("model", "sites", "none")


@dataclass
class ModelCheck:
    name = "model"
    runs = True  # observe runs the whole model (its outputs are the fidelity figures' source)
    snapshots = False  # the model before each pass is kept only for --html pages
    variants: list = field(default_factory=list)  # (label, feeds) the passes are also checked on
    refs: dict = field(default_factory=dict)  # label -> the original model's outputs on them
    prev: dict = field(default_factory=dict)  # label -> the previous step's outputs
    notes: list = field(default_factory=list)

    def start(self, steps, state) -> None:
        """The original model's outputs on every variant it runs on (once)."""
        kept = []
        for label, feeds in self.variants:
            try:
                self.refs[label] = steps.outputs_on(state.model, feeds)
                kept.append((label, feeds))
            except Exception as e:  # a model that takes only its own length: checked on the rest
                self.notes.append(f"not checked on the {label} inputs: the model does not run on them "
                                  f"({first_line(e)[:120]})")
        self.variants, self.prev = kept, dict(self.refs)

    def measure(self, steps, rep, ref: dict, before, new, rewritten, feeds, progress):
        """Fill `rep` with the pass's fidelity; (against the original, against the previous
        step), each the worst over every input set."""
        logits = steps.logit_outputs(new)
        outs = {}
        for label, f in self.variants:
            with progress.step(f"{rep.name}: fidelity on the {label} inputs"):
                outs[label] = steps.outputs_on(new.model, f)
        per, changed = compared(ref, new.outputs, logits)
        step, _ = compared(before.outputs, new.outputs, logits)
        headline = fidelity.worst(per), fidelity.worst(step)  # the fidelity inputs alone
        for label, o in outs.items():
            per |= compared(self.refs[label], o, logits, f"@{label}")[0]
            step |= compared(self.prev[label], o, logits, f"@{label}")[0]
        if changed:
            rep.notes.append(f"outputs that changed shape or were replaced are not compared: {', '.join(changed)}")
        rep.per_output = {k: f.to_json() for k, f in per.items()}
        rep.notes += self.notes
        rep.fidelity, rep.step_fidelity = headline[0].to_json(), headline[1].to_json()
        self.prev = outs
        if not outs:
            return headline
        worst = fidelity.worst(per), fidelity.worst(step)
        rep.fidelity_all, rep.step_fidelity_all = worst[0].to_json(), worst[1].to_json()
        return worst


class SitesCheck:
    name = "sites"
    runs = False
    snapshots = True  # each rewritten site is run on the model before the pass

    def start(self, steps, state) -> None:
        pass

    def measure(self, steps, rep, ref, before, new, rewritten, feeds, progress):
        if not rewritten:
            return None, None
        with progress.step(f"{rep.name}: check each rewritten site"):
            per_site = steps.check_sites(before.model, new.model, rewritten, feeds)
        if alone := [s for s in rewritten if s not in per_site and "/" in s]:
            rep.notes.append(f"check=sites did not compare {', '.join(alone)} alone (a site in a function body or a "
                             "subgraph runs only inside the node that holds it): validated, not compared")
        if not per_site:
            return None, None
        step = fidelity.worst(per_site)
        rep.per_site = {k: f.to_json() for k, f in per_site.items()}
        rep.fidelity = rep.step_fidelity = step.to_json()
        rep.notes.append("check=sites: each rewritten site's output compared with the site before the pass, "
                         "on that model's own activations; the whole model was not run, so errors are per "
                         "site and not compounded")
        return None, step


class NoCheck:
    name = "none"
    runs = False
    snapshots = False

    def start(self, steps, state) -> None:
        pass

    def measure(self, steps, rep, ref, before, new, rewritten, feeds, progress):
        rep.notes.append("check=none: the model was validated, and run only as far as the values detection "
                         "reads (shapes, masks), segment by segment; outputs not compared, no fidelity figures")
        return None, None


def check(name: str | None, variants: list | None = None):
    """The strategy for `--check NAME`."""
    if name == "model":
        return ModelCheck(list(variants or []))
    if name == "sites":
        return SitesCheck()
    if name == "none":
        return NoCheck()
    raise UserError(f"--check must be one of {', '.join(CHECKS)} (got {name!r})")


def compared(refs: dict, outs: dict, logits: set, suffix: str = "") -> tuple[dict, list[str]]:
    """Fidelity of each output against its reference, leaving out outputs whose shape the
    pass changed (a capped cache), which it lists."""
    got, changed = {}, []
    for k in refs:
        if k not in outs:  # a cache output a pass replaced (latent): its replacement is listed in the notes
            changed.append(f"{k} (replaced)")
        elif np.shape(refs[k]) != np.shape(outs[k]):
            changed.append(f"{k} {list(np.shape(refs[k]))} -> {list(np.shape(outs[k]))}")
        else:
            got[f"{k}{suffix}"] = fidelity.compare(refs[k], outs[k], logits=k in logits)
    return got, changed
