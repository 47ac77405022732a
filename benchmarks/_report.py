"""Writing a benchmark's results: the table on the terminal, Markdown and JSON in results/."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).parent / "results"


def write(name: str, title: str, cols: list[str], table_rows: list[list[str]], records, preface: list[str] = (),
          footer: str = "") -> None:
    t = Table(title=title)
    for c in cols:
        t.add_column(c)
    md = list(preface) + ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for vals in table_rows:
        t.add_row(*vals)
        md.append("| " + " | ".join(vals) + " |")
    Console(width=200).print(t)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.md").write_text("\n".join(md) + "\n" + (f"\n{footer}\n" if footer else ""))
    (RESULTS / f"{name}.json").write_text(json.dumps(records, indent=1))
