"""Pass names to pass classes. `attn-opt --pass NAME[:key=value,...]` looks names up here."""

from attn_opt.passes.fuse import Fuse
from attn_opt.passes.gated import Gated
from attn_opt.passes.latent import LatentPass
from attn_opt.passes.mlpfree import Mlpfree
from attn_opt.passes.sigmoid import Sigmoid
from attn_opt.passes.sinkfree import Sinkfree
from attn_opt.passes.softplus import Softplus
from attn_opt.passes.sparse import Sparse
from attn_opt.passes.stream import Stream
from attn_opt.passes.plan import PlanPass
from attn_opt.core.errors import UserError
from attn_opt.core.passbase import Pass, parse_spec

REGISTRY: dict[str, type[Pass]] = {cls.name: cls for cls in (Fuse, Sparse, Gated, Softplus, Sinkfree, Sigmoid, Mlpfree,
                                                              Stream, LatentPass)}


def parse(spec: str) -> Pass:
    return parse_spec(spec, REGISTRY)


REGISTRY[PlanPass.name] = PlanPass  # plan:file=PLAN.json, a form per site (what --budget writes)


def check_chain(chain: list[Pass]) -> None:
    """Refuse, with the reason, a sequence of passes that cannot compose on one site
    (decided by what each pass produces, not by its name)."""
    for p in chain:
        p.check_options()
    for i, p in enumerate(chain):
        before = chain[:i]
        if p.replaces_normaliser and (other := next((b for b in before if b.replaces_normaliser), None)):
            raise UserError(f"{p.name} after {other.name}: both replace the softmax; choose one")
        if p.once and any(b.name == p.name for b in before):
            raise UserError(f"{p.name} twice: give one {p.name} pass with all its options")
        if p.sets_pattern and (other := next((b for b in before if b.sets_pattern), None)):
            raise UserError(f"{p.name} after {other.name}: both choose which pairs are kept; choose one")
        if p.produces == "fused" and (other := next((b for b in before if b.produces == "form"), None)):
            raise UserError(f"{p.name} after {other.name} would undo that form; put {p.name} first")
        if p.produces == "collapse" and p.touches_sites() and \
                (other := next((b for b in chain if b.produces == "form"), None)):
            raise UserError(f"{p.name} collapse with {other.name}: the collapse rewrites Q·Kᵀ, which {other.name}'s "
                            "form keeps in Q and K; run them in separate invocations")


__all__ = ["REGISTRY", "parse", "check_chain", "Fuse", "Sparse", "Gated", "Softplus", "Sinkfree", "Sigmoid",
           "Mlpfree", "Stream", "LatentPass", "PlanPass"]
