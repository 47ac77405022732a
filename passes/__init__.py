"""Pass names to pass classes. `attn-opt --pass NAME[:key=value,...]` looks names up here."""

from attn_opt.passes.fuse import Fuse
from attn_opt.passes.gated import Gated
from attn_opt.passes.mlpfree import Mlpfree
from attn_opt.passes.sinkfree import Sinkfree
from attn_opt.passes.softplus import Softplus
from attn_opt.passes.sparse import Sparse
from attn_opt.rewriter.errors import UserError
from attn_opt.rewriter.passbase import Pass, parse_spec

REGISTRY: dict[str, type[Pass]] = {cls.name: cls for cls in (Fuse, Sparse, Gated, Softplus, Sinkfree, Mlpfree)}


def parse(spec: str) -> Pass:
    return parse_spec(spec, REGISTRY)


FORMS = ("sparse", "softplus", "sinkfree")  # rewrite the site into an attn-opt form
NORMALISERS = ("softplus", "sinkfree")  # replace the softmax


def check_chain(chain: list[Pass]) -> None:
    """Refuse, with the reason, a sequence of passes that cannot compose on one site."""
    names = [p.name for p in chain]
    for p in chain:
        p.check_options()
    for i, p in enumerate(chain):
        before = names[:i]
        if p.name in NORMALISERS and any(n in NORMALISERS for n in before):
            other = next(n for n in before if n in NORMALISERS)
            raise UserError(f"{p.name} after {other}: both replace the softmax; choose one")
        if p.name in ("sparse", "gated") and p.name in before:
            raise UserError(f"{p.name} twice: give one {p.name} pass with all its options")
        if p.name == "fuse" and any(n in FORMS for n in before):
            raise UserError(f"fuse after {next(n for n in before if n in FORMS)} would undo that form; put fuse first")
        collapses = p.name == "mlpfree" and getattr(p, "collapse", ())
        if collapses and any(n in FORMS for n in names):
            other = next(n for n in names if n in FORMS)
            raise UserError(f"mlpfree collapse with {other}: the collapse rewrites Q·Kᵀ, which {other}'s form "
                            "keeps in Q and K; run them in separate invocations")


__all__ = ["REGISTRY", "parse", "check_chain", "Fuse", "Sparse", "Gated", "Softplus", "Sinkfree", "Mlpfree"]
