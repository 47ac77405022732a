"""Strict JSON for reports and pages: a figure that is not a finite number (an option of
-inf, an error that overflowed) is written as null, and the document says which and what
it was under "non_finite", so every reader (JSON.parse, jq, Python) can load it."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

NON_FINITE_KEY = "non_finite"


def strict(obj: Any, path: str = "$", notes: dict | None = None) -> tuple[Any, dict[str, str]]:
    """(`obj` with non-finite floats as None and numpy values as Python ones, {path: what
    each None was})."""
    notes = {} if notes is None else notes
    if isinstance(obj, dict):
        return {str(k): strict(v, f"{path}.{k}", notes)[0] for k, v in obj.items()}, notes
    if isinstance(obj, (list, tuple)):
        return [strict(v, f"{path}[{i}]", notes)[0] for i, v in enumerate(obj)], notes
    if isinstance(obj, np.ndarray):
        return strict(obj.tolist(), path, notes)
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        notes[path] = "nan" if obj != obj else ("inf" if obj > 0 else "-inf")
        return None, notes
    return obj, notes


def dumps(obj: Any, **kwargs) -> str:
    """json.dumps of `strict(obj)`; a dict says what each null stood for under "non_finite"."""
    clean, notes = strict(obj)
    if notes and isinstance(clean, dict):
        clean[NON_FINITE_KEY] = {k: f"{v} (not a JSON number)" for k, v in notes.items()}
    return json.dumps(clean, allow_nan=False, **kwargs)


def for_script(obj: Any) -> str:
    """`dumps` safe inside an HTML <script> element: `<`, `>` and `&` escaped as JSON
    unicode escapes, so no string in the data (a node named `<!--<script>`) can end or
    change the element."""
    return dumps(obj).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
