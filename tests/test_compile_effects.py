"""The torch.compile backend on graphs with side effects: a graph that changes a tensor in
place passes through untouched (the reason logged) and matches eager, outputs and
effects; check=True compares on clones of the inputs and restores the random-number
state, so it repeats no effect of the user's call."""

from __future__ import annotations

import logging

import pytest

torch = pytest.importorskip("torch")

import attn_opt  # noqa: E402


class Logged(logging.Handler):
    """What the attn_opt logger said (the suite runs with pytest's logging plugin off)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def caplog():
    log, h = logging.getLogger("attn_opt"), Logged()
    old = log.level
    log.setLevel(logging.INFO)
    log.addHandler(h)
    yield h
    log.removeHandler(h)
    log.setLevel(old)


class Attn(torch.nn.Module):
    def __init__(self, effect: str = "none"):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = (torch.nn.Linear(16, 16) for _ in range(3))
        self.register_buffer("calls", torch.zeros(()))
        self.effect = effect

    def attn(self, x):
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, 2, 8).transpose(1, 2) for f in (self.q, self.k, self.v))
        p = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1)
        return (p @ v).transpose(1, 2).reshape(b, t, 16)

    def forward(self, x):
        y = self.attn(x)
        if self.effect == "mul_":
            x.mul_(2)
        elif self.effect == "setitem":
            x[:, 0] = 0.0
        elif self.effect == "iadd":
            x += 1.0
        elif self.effect == "relu-inplace":
            torch.nn.functional.relu(x, inplace=True)
        elif self.effect == "buffer":
            self.calls.add_(1)
        elif self.effect == "random":
            y = y + 0 * torch.rand_like(y)  # draws from the generator: a check must not draw again
        return y + x


EFFECTS = ["mul_", "setitem", "iadd", "relu-inplace", "buffer"]


def _compiled(m, inner="eager", check=True):
    torch._dynamo.reset()
    return torch.compile(m, backend=attn_opt.backend(inner=inner, check=check))


@pytest.mark.parametrize("effect", EFFECTS)
def test_mutating_graph_passes_through_and_matches_eager(effect, caplog):
    x0 = torch.randn(2, 6, 16)
    eager, compiled = Attn(effect).eval(), Attn(effect).eval()
    with torch.no_grad():
        xe, xc = x0.clone(), x0.clone()
        want = eager(xe)
        got = _compiled(compiled)(xc)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(xc, xe)  # the input changed once, as in eager: no replay by the check
    torch.testing.assert_close(compiled.calls, eager.calls)
    assert "changes a tensor in place" in caplog.text and "untouched" in caplog.text


def test_mutating_graph_through_inductor():
    x0 = torch.randn(2, 6, 16)
    with torch.no_grad():
        xe, xc = x0.clone(), x0.clone()
        want = Attn("mul_").eval()(xe)
        got = _compiled(Attn("mul_").eval(), inner="inductor")(xc)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(xc, xe)


def test_check_runs_on_clones_and_restores_the_generator(caplog):
    """A pure graph is rewritten (fuse) and checked; the check leaves the inputs and the
    random-number stream exactly as one eager call does."""
    x0 = torch.randn(2, 6, 16)
    m = Attn("random").eval()
    with torch.no_grad():
        torch.manual_seed(1)
        want = m(x0.clone())
        after_eager = torch.rand(4)
        x = x0.clone()
        fn = _compiled(m)
        torch.manual_seed(1)
        got = fn(x)
        after_compiled = torch.rand(4)
    assert "rewrote ['a0']" in caplog.text and "attn_opt check: max rel error" in caplog.text
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x, x0)
    torch.testing.assert_close(after_compiled, after_eager)


def test_mutation_finder_negative():
    """A graph with no in-place op is not flagged (it is rewritten)."""
    gm = torch.fx.symbolic_trace(Attn("none").eval())
    assert attn_opt.compile.mutation(gm) is None
    assert "mul_" in attn_opt.compile.mutation(torch.fx.symbolic_trace(Attn("mul_").eval()))
