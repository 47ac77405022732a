"""What `--budget` shows and writes besides the model: the plan as a table, and the Pareto
plot of every assignment the search tried (predicted and, where measured, whole-model loss
against cost; the chosen point marked)."""

from __future__ import annotations

from rich.table import Table


def plan_table(plan: dict) -> Table:
    applied = plan.get("applied", {})
    att = applied.get("attention_flops") or [0, 0]
    frac = att[1] / att[0] if att and att[0] else None
    t = Table(title=(f"plan for --budget {plan['budget']} ({plan['objective']}; searched on {plan.get('searched_on')} "
                     f"in {plan['seconds']:.0f} s): cost {plan['cost']:.3f}"
                     + (f" (attention FLOPs applied: {frac:.3f})" if frac is not None else "")
                     + f", {plan['search_fidelity']} on the search inputs"
                     + (f", {plan['heldout_fidelity']} held out" if plan.get("heldout_fidelity") else "")),
              title_justify="left")
    for c in ("site", "layer", "form", "cost", "fidelity with only this site changed", "choices"):
        t.add_column(c)
    for sid, e in plan["sites"].items():
        t.add_row(sid, str(e.get("layer")), e["spec"], f"{e['cost']:.3f}", e["fidelity_alone"], str(e["choices"]))
    if plan.get("notes"):
        t.caption = "; ".join(plan["notes"])
    return t


def write_pareto(plan: dict, path: str) -> None:
    """Loss vs cost of every assignment tried; the chosen one marked. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from attn_opt.core.io import atomic_path

    pts = plan.get("tried", [])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([p["cost"] for p in pts], [p["predicted_loss"] for p in pts], ".", color="C0", alpha=0.6,
            label="assignments on the Pareto front (predicted: sum of per-site losses)")
    measured = [p for p in pts if p.get("measured_loss") is not None]
    ax.plot([p["cost"] for p in measured], [p["measured_loss"] for p in measured], "s", mfc="none", color="C1",
            label="measured on the whole model")
    c = plan["chosen"]
    ax.plot([c["cost"]], [c["measured_loss"]], "*", markersize=14, color="C3", label="chosen")
    ax.axvline(float(plan["budget"].split("=")[1]), color="k", lw=0.8, ls="--", label=f"budget {plan['budget']}")
    ax.set_xlabel(plan["cost_definition"])
    ax.set_ylabel(f"fidelity loss ({plan['objective']}: {'KL' if plan['objective'] == 'kl' else '1 - score'})")
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
