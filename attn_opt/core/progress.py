"""Progress of the pipeline's steps: a rich progress line on a terminal for models where
steps take time, and the seconds of every step kept for the report either way."""

from __future__ import annotations

import contextlib
import time

from rich.console import Console


class Progress:
    """`with progress.step("name"):` times a step; shown live when `console` is a terminal."""

    def __init__(self, console: Console | None, show: bool = True):
        self.console = console
        self.show = bool(show and console is not None and console.is_terminal)
        self.seconds: list[tuple[str, float]] = []

    @contextlib.contextmanager
    def step(self, name: str):
        t0 = time.perf_counter()
        status = self.console.status(f"[bold]{name}[/] …", spinner="dots") if self.show else contextlib.nullcontext()
        with status:
            yield
        dt = time.perf_counter() - t0
        self.seconds.append((name, dt))
        if self.show and dt >= 1.0:
            self.console.print(f"  [dim]{name}: {dt:.1f} s[/]")

    def total(self) -> float:
        return sum(s for _, s in self.seconds)
