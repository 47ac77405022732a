"""An IR-neutral view of a dataflow graph.

Each IR adapter (`core.ir.onnx`, `core.ir.fx`) translates its graph into these
records, spelling ops in ONNX's vocabulary (MatMul, Softmax, Transpose, Where, ...), so
that patterns are written once. Every `Node` keeps a reference to the native node it
came from; one native node may become several view nodes (torch's `baddbmm` is a MatMul
and an Add), and the rewriters work on the native nodes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np

Dim = int | str | None  # a static size, a symbolic name, or unknown

# What attn-opt leaves on the nodes it emits (ONNX metadata_props, FX node meta):
SITE_TAG = "attn_opt.site"  # the site a node computes (its FLOPs are attention FLOPs)
PASS_TAG = "attn_opt.pass"  # the pass that emitted it
FORM_KEY = "attn_opt.form"  # on a rewritten site's output: its record (form and operands, JSON)
EPILOGUE_TAG = "attn_opt.epilogue"  # an op applied to a site's output (a gate), not part of the site
SELECTION_TAG = "attn_opt.selection"  # part of a content pattern's selection (pooling, block scores, top-k)


def param_name(site_id: str, name: str, ir: str = "onnx") -> str:
    """The name of a weight attn-opt adds for a site: `attn_opt.<site>.<name>` as an ONNX
    initializer, `attn_opt_<site>_<name>` as a module attribute (no dots there)."""
    if ir == "onnx":
        return f"attn_opt.{site_id}.{name}"
    return re.sub(r"\W", "_", f"attn_opt_{site_id}_{name}")


@dataclass(eq=False)
class Value:
    name: str
    producer: "Node | None" = None
    users: list["Node"] = field(default_factory=list)
    shape: tuple[Dim, ...] | None = None
    dtype: str | None = None  # numpy dtype name ("float32", "bool", "int64")
    const: np.ndarray | None = None  # known at compile time (initializer, literal, Constant)
    is_input: bool = False
    is_output: bool = False
    native: Any = None

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    def __repr__(self) -> str:
        return f"Value({self.name})"


@dataclass(eq=False)
class Node:
    name: str
    op: str
    inputs: list[Value | None]
    outputs: list[Value]
    attrs: dict[str, Any] = field(default_factory=dict)
    scope: str | None = None  # module path, e.g. "model.encoder.layer.0.attention.self"
    native: Any = None
    meta: dict[str, str] = field(default_factory=dict)  # the IR's node metadata
    region: str = ""  # the graph it is in: "" the model's, else a path (core/ir/onnx_regions.py)

    def input(self, i: int) -> Value | None:
        return self.inputs[i] if i < len(self.inputs) else None

    def __repr__(self) -> str:
        return f"Node({self.op} {self.name})"


Probe = Callable[[list[Value], Mapping[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass
class Region:
    """A graph inside the model that its top-level node list does not show: a local
    function's body or a control-flow subgraph (an If branch, a Loop or Scan body)."""

    path: str  # "function:Attn", "pad_if/then", "loop/body", nested: "loop/body/inner_if/else"
    kind: str  # "function", "then", "else", "body" (or the attribute's name)
    what: str  # e.g. "the then branch of If pad_if", "the body of local function Attn"
    how: str  # how its values are read, e.g. "on its first iteration"
    calls: int = 1  # a function: how many nodes call it (0: never, so never probed)
    in_function: bool = False  # it is, or is inside, a function body (no initializers there)
    error: str | None = None  # why it could not be run alone (set by the probe that tried)
    scope: str | None = None  # the module path of the node holding it (a function's only call), for layers


@dataclass(eq=False)
class GraphView:
    """Nodes in topological order, the graph's inputs/outputs, and a way to run it."""

    nodes: list[Node]
    inputs: list[Value]
    outputs: list[Value]
    ir: str  # "onnx" or "fx"
    probe_fn: Probe | None = None
    sample_inputs_fn: Callable[[], dict[str, np.ndarray]] | None = None
    probed: dict[str, np.ndarray] = field(default_factory=dict)  # values from the last run ...
    probed_feeds: Mapping[str, np.ndarray] | None = None  # ... and the inputs it ran on
    regions: dict[str, Region] = field(default_factory=dict)  # path -> the graphs inside it
    region_index: Any = None  # the IR adapter's own index of them (ONNX: core/ir/onnx_regions.Regions)
    # (values, feeds) -> one probe per further call of the function `values` are in (functions only)
    call_probe_fn: Callable[[list[Value], Mapping[str, np.ndarray]], list[dict[str, np.ndarray]]] | None = None

    def value(self, name: str) -> Value | None:
        """The value called `name` (inputs, node outputs and constants they read)."""
        if not hasattr(self, "_by_name"):
            self._by_name = {}
            for n in self.nodes:
                for v in list(n.inputs) + list(n.outputs):
                    if v is not None:
                        self._by_name.setdefault(v.name, v)
            for v in self.inputs:
                self._by_name.setdefault(v.name, v)
        return self._by_name.get(name)

    def probe(self, values: Iterable[Value], feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph on `feeds` and return the named intermediate values."""
        if self.probe_fn is None:
            raise RuntimeError(f"the {self.ir} graph cannot be run here")
        values = [v for v in dict.fromkeys(values) if v.const is None]
        if feeds is self.probed_feeds and all(v.name in self.probed for v in values):
            return {v.name: self.probed[v.name] for v in values}  # the pipeline's one run had them
        return self.probe_fn(values, feeds) if values else {}

    def remember(self, feeds: Mapping[str, np.ndarray], arrays: dict[str, np.ndarray]) -> None:
        """Keep the values of a run on `feeds`, so probes on the same inputs do not run again."""
        self.probed_feeds, self.probed = feeds, dict(arrays)

    def sample_inputs(self) -> dict[str, np.ndarray]:
        if self.sample_inputs_fn is None:
            raise RuntimeError(f"no sample inputs for this {self.ir} graph")
        return self.sample_inputs_fn()


def link(nodes: list[Node]) -> None:
    """Fill in `producer` and `users` from the nodes' inputs and outputs."""
    for n in nodes:
        for v in n.outputs:
            v.producer = n
    for n in nodes:
        for v in n.inputs:
            if v is not None and n not in v.users:
                v.users.append(n)


_LAYER = re.compile(r"(?:^|[./_])(?:layers?|h|block|blocks|encoder_layers?|decoder_layers?)[./_](\d+)(?:[./_]|$)")
_ANY_INT = re.compile(r"[./_](\d+)(?:[./_]|$)")


def layer_of(scope: str | None) -> int | None:
    """The layer index in a module path ("model.encoder.layer.3.attention" -> 3)."""
    if not scope:
        return None
    m = _LAYER.search(scope) or _ANY_INT.search(scope)
    return int(m.group(1)) if m else None
