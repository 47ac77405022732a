"""Pass names to pass classes. `attn-opt --pass NAME[:key=value,...]` looks names up here."""

from attn_opt.passes.fuse import Fuse
from attn_opt.passes.gated import Gated
from attn_opt.passes.sinkfree import Sinkfree
from attn_opt.passes.softplus import Softplus
from attn_opt.passes.sparse import Sparse
from attn_opt.rewriter.passbase import Pass, parse_spec

REGISTRY: dict[str, type[Pass]] = {cls.name: cls for cls in (Fuse, Sparse, Gated, Softplus, Sinkfree)}


def parse(spec: str) -> Pass:
    return parse_spec(spec, REGISTRY)


__all__ = ["REGISTRY", "parse", "Fuse", "Sparse", "Gated", "Softplus", "Sinkfree"]
