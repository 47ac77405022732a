"""Solving a budget from measured choices (pipeline/budget.py): the multiple-choice knapsack
as a Pareto DP, whole-model verification and greedy refinement, and the search's progress bar."""

from __future__ import annotations

from dataclasses import dataclass

from attn_opt.passes.plan import DENSE

VERIFY = 3  # best predicted assignments measured on the whole model
GREEDY = 3  # greedy refinement steps (each one whole-model measurement)
UNIFORM_SEEDS = 2  # uniform assignments (one form everywhere) also measured as starting points


@dataclass
class Point:
    cost: float  # fraction of the original's
    loss: float  # predicted: the sum of the sites' measured losses
    picks: tuple[int, ...]
    measured: float | None = None  # the whole model's loss with this assignment


def pareto(costs: list[list[float]], losses: list[list[float]], resolution: float = 1e-3) -> list[Point]:
    """Multiple-choice knapsack as a Pareto DP: per site, extend every kept assignment by each
    choice; keep per cost bucket the lowest loss, then only assignments no cheaper one beats."""
    states = [Point(0.0, 0.0, ())]
    for cs, ls in zip(costs, losses):
        best: dict[int, Point] = {}
        for s in states:
            for j, (c, lo) in enumerate(zip(cs, ls)):
                p = Point(s.cost + c, s.loss + lo, s.picks + (j,))
                key = int(round(p.cost / resolution))
                if key not in best or p.loss < best[key].loss:
                    best[key] = p
        states, floor = [], float("inf")
        for p in sorted(best.values(), key=lambda p: (p.cost, p.loss)):
            if p.loss < floor - 1e-12:
                states.append(p)
                floor = p.loss
    return states


def _uniform(choices, order, base: float, limit: float) -> list[Point]:
    """The assignments that give every site the same choice template, within the limit, best
    predicted first."""
    out = []
    for t in dict.fromkeys(c.template for sid in order for c in choices[sid]):
        picks = tuple(next((j for j, c in enumerate(choices[sid]) if c.template == t), -1) for sid in order)
        if t == DENSE or -1 in picks:
            continue
        p = Point(sum(choices[sid][j].cost for sid, j in zip(order, picks)),
                  sum(choices[sid][j].loss for sid, j in zip(order, picks)), picks)
        if base + p.cost <= limit + 1e-9:
            out.append(p)
    return sorted(out, key=lambda p: p.loss)


def _refine(points: list[Point], choices, order, base: float, limit: float, measure):
    """The best VERIFY predicted assignments within the limit, and the best UNIFORM_SEEDS
    uniform ones, measured on the whole model; the best measured kept; then up to GREEDY single-site upgrades that fit the leftover budget,
    each kept only when the whole model's measurement confirms it."""
    under = sorted((p for p in points if base + p.cost <= limit + 1e-9), key=lambda p: p.loss)
    for p in under[:VERIFY]:
        p.measured = measure(p.picks)
    tried = [u for u in _uniform(choices, order, base, limit)[:UNIFORM_SEEDS]
             if all(u.picks != p.picks for p in under[:VERIFY])]
    for u in tried:  # one form everywhere is a seed too: the search never ends below the best uniform it measured
        u.measured = measure(u.picks)
    best = min(under[:VERIFY] + tried, key=lambda p: p.measured)
    for _ in range(GREEDY):
        slack = limit - base - best.cost
        moves = [(choices[sid][best.picks[i]].loss - c.loss, i, j) for i, sid in enumerate(order)
                 for j, c in enumerate(choices[sid]) if j != best.picks[i]
                 and c.loss < choices[sid][best.picks[i]].loss and c.cost - choices[sid][best.picks[i]].cost <= slack]
        if not moves:
            break
        gain, i, j = max(moves)
        picks = best.picks[:i] + (j,) + best.picks[i + 1:]
        c_old, c_new = choices[order[i]][best.picks[i]], choices[order[i]][j]
        cand = Point(best.cost - c_old.cost + c_new.cost, best.loss - gain, picks)
        cand.measured = measure(picks)
        tried.append(cand)
        if cand.measured < best.measured:
            best = cand
        else:
            break
    return best, tried


class _bar:
    """A rich progress bar (terminal only) with the last measurement; `advance(text)`."""

    def __init__(self, progress, total: int, what: str):
        self.show = bool(progress is not None and getattr(progress, "show", False))
        self.console, self.total, self.what = getattr(progress, "console", None), total, what

    def __enter__(self):
        if not self.show:
            return lambda text="": None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("{task.fields[last]}"), console=self.console, transient=True)
        self.bar.__enter__()
        task = self.bar.add_task(self.what, total=self.total, last="")
        return lambda text="": self.bar.update(task, advance=1, last=text)

    def __exit__(self, *exc):
        if self.show:
            self.bar.__exit__(*exc)
        return False
