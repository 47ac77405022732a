"""Solving a budget from measured choices (pipeline/budget.py): the multiple-choice knapsack
as a Pareto DP, whole-model verification and greedy refinement, and the search's progress bar."""

from __future__ import annotations

from dataclasses import dataclass

from attn_opt.passes.plan import DENSE

VERIFY = 3  # best predicted assignments measured on the whole model
GREEDY = 3  # greedy refinement steps (each one whole-model measurement)
UNIFORM_SEEDS = 3  # uniform assignments (one form everywhere) also measured as starting points


@dataclass
class Point:
    cost: float  # fraction of the original's
    loss: float  # predicted: the sum of the sites' measured losses
    picks: tuple[int, ...]
    measured: float | None = None  # the whole model's loss with this assignment
    folds: tuple[float, ...] | None = None  # the same on each fold of the search rows (None: too few rows)
    uniform: bool = False  # one choice template on every site

    def beats(self, other: "Point") -> bool:
        """Measured better than `other` on the search rows and no worse on any fold of them:
        a per-site plan must win on every part of the search data to replace a uniform form
        (a win on the whole that one fold contradicts is what does not carry to new inputs)."""
        if self.measured >= other.measured:
            return False
        if self.folds is None or other.folds is None or (self.uniform and other.uniform):
            return True
        return all(a <= b for a, b in zip(self.folds, other.folds))


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
                  sum(choices[sid][j].loss for sid, j in zip(order, picks)), picks, uniform=True)
        if base + p.cost <= limit + 1e-9:
            out.append(p)
    return sorted(out, key=lambda p: p.loss)


def _refine(points: list[Point], choices, order, base: float, limit: float, measure):
    """The best VERIFY predicted assignments within the limit, and the best UNIFORM_SEEDS
    uniform ones, measured on the whole model (`measure(picks)` -> (loss, per-fold losses));
    the best uniform one kept unless a per-site plan `beats` it (better on the search rows
    and on each fold of them); then up to GREEDY single-site upgrades that fit the leftover
    budget, each kept only when the whole model's measurement `beats` the plan so far."""
    def measured(p: Point) -> Point:
        p.measured, p.folds = measure(p.picks)
        return p

    under = sorted((p for p in points if base + p.cost <= limit + 1e-9), key=lambda p: p.loss)
    seeds = [measured(p) for p in under[:VERIFY]]
    tried = [measured(u) for u in _uniform(choices, order, base, limit)[:UNIFORM_SEEDS]
             if all(u.picks != p.picks for p in seeds)]
    for p in seeds:  # the DP's own uniform points count as uniform seeds
        p.uniform = p.uniform or len({choices[sid][j].template for sid, j in zip(order, p.picks)}) == 1
    uniform = [p for p in seeds + tried if p.uniform]
    best = min(uniform, key=lambda p: p.measured) if uniform else None
    for p in sorted((p for p in seeds + tried if not p.uniform), key=lambda p: p.measured):
        if best is None or p.beats(best):
            best = p
            break
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
        cand = measured(Point(best.cost - c_old.cost + c_new.cost, best.loss - gain, picks))
        tried.append(cand)
        if cand.beats(best):
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
