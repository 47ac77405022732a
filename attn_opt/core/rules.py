"""The rule engine: rules are data (a name, the ops that anchor them, a check); the
engine visits anchors in graph order, runs each rule's check and counts what matched
and what missed, keeping the reason for every miss."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from attn_opt.core.graph import GraphView, Node


@dataclass(frozen=True)
class Rule:
    name: str
    anchors: frozenset[str]  # view ops this rule starts from
    check: Callable[[GraphView, Node], Any]  # returns a match or raises a miss
    why: str  # one line: what the rule recognises


@dataclass
class MatchResult:
    matches: list[tuple[Rule, Node, Any]] = field(default_factory=list)
    misses: list[tuple[Rule, Node, Exception]] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)  # "rule:matched" / "rule:missed"


def run_rules(gv: GraphView, rules: list[Rule], miss_type: type[Exception], skip=None) -> MatchResult:
    res = MatchResult()
    by_op: dict[str, list[Rule]] = {}
    for r in rules:
        for op in r.anchors:
            by_op.setdefault(op, []).append(r)
    for node in gv.nodes:
        if skip is not None and skip(node):
            continue
        for rule in by_op.get(node.op, ()):
            try:
                m = rule.check(gv, node)
            except miss_type as e:
                res.misses.append((rule, node, e))
                res.counts[f"{rule.name}:missed"] += 1
                continue
            res.matches.append((rule, node, m))
            res.counts[f"{rule.name}:matched"] += 1
            break
    return res
