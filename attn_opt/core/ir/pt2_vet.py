"""Vet a `.pt2` archive before `torch.export.load` reads it.

`torch.export.load` (torch 2.13) runs code from the archive in several places: it
unpickles weights and constants whose config says `use_pickle` (`torch.load(...,
weights_only=False)`), opaque and custom-object constants (`pickle.loads`), the legacy
`.pt` payloads and the sample inputs when the safe loader refuses them; it `sympify`s
(evaluates) the symbolic shape strings; it resolves node targets by `getattr` chains from
`torch`, `operator` and `math` (so `torch.os.system` is a target); `ep.module()` compiles
the `guards_code` strings; and it loads AOTInductor shared libraries. An archive from
`torch.export.save` needs none of that beyond tensors, `torch.ops` targets, symbol
expressions and size guards, so everything else is refused here, in one line, before
torch reads the file; `guarded()` then loads with the unpicklers disabled as a second
line of defence.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import re
import zipfile
from pathlib import Path, PurePosixPath

from attn_opt.core.errors import UserError

MAX_ENTRIES = 100_000
MAX_JSON_BYTES = 256 << 20  # a models/*.json larger than this is not a graph we read

# Python's `operator` and `math` functions an exported graph calls (symbolic sizes).
OPERATOR_OK = frozenset("""getitem add sub mul truediv floordiv mod pow neg pos abs eq ne lt le gt ge and_ or_
    xor not_ invert lshift rshift""".split())
MATH_OK = frozenset("ceil floor trunc sqrt log exp pi".split())
TORCH_SYM_OK = frozenset("""sym_int sym_float sym_max sym_min sym_not sym_sqrt sym_ite sym_sum sym_fresh_size
    _sym_sqrt""".split())
# Names a symbolic expression may use: sympy's constructors and the functions the
# deserializer passes to sympify (torch.utils._sympy.functions).
SYMPY_OK = frozenset("""Symbol Integer Rational Float Max Min Mod Abs floor ceiling Eq Ne Lt Le Gt Ge And Or Not
    Piecewise ITE oo zoo nan true false True False None positive integer nonnegative negative real finite
    FloorDiv ModularIndexing Where PythonMod CleanDiv CeilToInt FloorToInt CeilDiv LShift RShift PowByNatural
    FloatPow FloatTrueDiv IntTrueDiv IsNonOverlappingAndDenseIndicator TruncToFloat TruncToInt RoundToInt
    RoundDecimal ToFloat Identity BitwiseFn_bitwise_and BitwiseFn_bitwise_or OpaqueUnaryFn_sqrt""".split())
_SYMBOL = re.compile(r"[a-z]+\d+\Z")  # s0, s77, u3: torch's symbol names
_TOKEN = re.compile(r"\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<num>\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
                    r"|(?P<str>'[A-Za-z0-9_]*')|(?P<op>\*\*|==|!=|<=|>=|//|[-+*/%(),<>=~&|]))")
# What a size guard (`ep.guards_code`) may call and read.
GUARD_CALLS = frozenset({"size", "stride", "dim", "storage_offset", "numel"})
GUARD_NAMES = frozenset({"L", "torch", "math", "Max", "Min", "FloorDiv", "Mod", "True", "False", "None"})


def refuse(path, what: str):
    raise UserError(f"{path}: refused: {what} (attn-opt never runs code from a model file)")


def vet(path: str | Path) -> None:
    """Raise UserError (one line) unless `path` is a torch.export archive holding only
    what loads without running code from the file."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"{path} is not a readable torch.export program ({e})") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_ENTRIES:
            refuse(path, f"{len(infos)} archive entries")
        names = {i.filename: i for i in infos}
        prefix = _root(path, names)
        rel = {n[len(prefix):]: i for n, i in names.items() if n.startswith(prefix)}
        for name in rel:
            parts = PurePosixPath(name).parts
            if name.startswith("data/aotinductor/") or name.endswith((".so", ".dll", ".dylib", ".pyd")):
                refuse(path, f"compiled code in the archive ({name})")
            if ".." in parts or name.startswith("/"):
                refuse(path, f"an archive entry outside the archive ({name})")
        models = [n for n in rel if n.startswith("models/") and n.endswith(".json")]
        if not models:
            refuse(path, "not the current torch.export format (the legacy format loads through pickle)")
        for legacy in ("data/weights/", "data/constants/"):
            if any(n.startswith(legacy) and n.endswith(".pt") for n in rel):
                refuse(path, f"legacy pickled payload under {legacy}")
        for name in rel:
            if name.startswith(("data/weights/", "data/constants/")) and name.endswith("config.json"):
                _vet_payloads(path, name, _json(path, zf, prefix + name, rel[name]))
        for name in models:
            _vet_program(path, name, _json(path, zf, prefix + name, rel[name]))
        for name in rel:
            if name.startswith("data/sample_inputs/"):
                _vet_torch_save(path, name, zf.read(prefix + name))


def _root(path, names: dict) -> str:
    """The archive's top folder ("model/"), where torch.export.save put everything."""
    tops = {n.split("/", 1)[0] + "/" for n in names if "/" in n}
    for top in tops:
        if top + "archive_format" in names or any(n.startswith(top + "models/") for n in names):
            return top
    return ""


def _json(path, zf, name: str, info) -> object:
    if info.file_size > MAX_JSON_BYTES:
        refuse(path, f"{name} declares {info.file_size} bytes")
    try:
        return json.loads(zf.read(name))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: {name} is not valid JSON ({e})") from None


def _vet_payloads(path, name: str, cfg) -> None:
    entries = cfg.get("config") if isinstance(cfg, dict) else None
    if not isinstance(entries, dict):
        raise UserError(f"{path}: {name} is not a payload config")
    for fqn, meta in entries.items():
        if not isinstance(meta, dict):
            raise UserError(f"{path}: {name}: entry {fqn!r} is not an object")
        if meta.get("use_pickle"):
            refuse(path, f"{fqn!r} in {name} is pickled")
        pn = str(meta.get("path_name", ""))
        if not re.fullmatch(r"(weight|tensor)_\d+", pn):
            refuse(path, f"{fqn!r} in {name} is stored as {pn!r} (only plain tensors load without unpickling)")


def _walk(obj):
    """Every (key, value) pair in a JSON tree."""
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            for k, v in o.items():
                yield k, v
                stack.append(v)
        elif isinstance(o, list):
            stack.extend(o)


def _vet_program(path, name: str, prog) -> None:
    if not isinstance(prog, dict):
        raise UserError(f"{path}: {name} is not a serialized program")
    for key, value in _walk(prog):
        if key in ("target", "as_operator") and isinstance(value, str):
            _vet_target(path, value)
        elif key == "expr_str" and isinstance(value, str):
            _vet_expr(path, value)
    ranges, guards = prog.get("range_constraints") or {}, prog.get("guards_code") or []
    if not isinstance(ranges, dict) or not isinstance(guards, list) or not all(isinstance(g, str) for g in guards):
        raise UserError(f"{path}: {name} is not a serialized program (range_constraints / guards_code)")
    for sym in ranges:
        _vet_expr(path, sym)
    for guard in guards:
        _vet_guard(path, guard)


def _vet_target(path, target: str) -> None:
    import torch

    mod, _, rest = target.partition(".")
    ok = False
    if mod == "_operator":
        ok = rest in OPERATOR_OK
    elif mod == "math":
        ok = rest in MATH_OK
    elif mod == "torch" and rest in TORCH_SYM_OK:
        ok = True
    elif target.startswith("torch.ops.") and all(p.isidentifier() for p in target.split(".")):
        obj = torch.ops  # getattr only: resolving a name calls nothing
        for part in target.split(".")[2:]:
            obj = getattr(obj, part, None)
            if obj is None:
                break
        ok = isinstance(obj, (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator))
    if not ok:
        refuse(path, f"node target {target!r} is not a torch operator")


def _vet_expr(path, expr: str) -> None:
    """A symbolic expression: symbols, numbers, sympy's functions, arithmetic; no
    attribute access, no other names."""
    pos = 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m or m.end() == pos:
            if expr[pos:].strip() == "":
                break
            refuse(path, f"symbolic expression {expr[:80]!r}")
        name = m.group("name")
        if name is not None and not (name in SYMPY_OK or _SYMBOL.match(name) or _sympy_class(name)):
            refuse(path, f"symbolic expression {expr[:80]!r} names {name!r}")
        s = m.group("str")
        if s is not None and not _SYMBOL.match(s.strip("'")):
            refuse(path, f"symbolic expression {expr[:80]!r}")
        pos = m.end()


def _sympy_class(name: str) -> bool:
    """A sympy expression class (Add, Mul, Pow, ...): what torch writes expressions with
    (srepr); constructing one from numbers and symbols runs nothing else."""
    import sympy

    obj = getattr(sympy, name, None)
    return isinstance(obj, type) and issubclass(obj, sympy.Basic) and not name.startswith("_")


def _vet_guard(path, code: str) -> None:
    """A size guard such as `L['x'].size()[0] <= 1024`: comparisons of sizes and numbers."""
    try:
        tree = ast.parse(code, mode="eval")
    except SyntaxError:
        refuse(path, f"guard {code[:80]!r}")
    for node in ast.walk(tree):
        bad = None
        if isinstance(node, ast.Name):
            bad = node.id not in GUARD_NAMES and not _SYMBOL.match(node.id)
        elif isinstance(node, ast.Attribute):
            bad = node.attr.startswith("_")
        elif isinstance(node, ast.Call):
            f = node.func
            bad = not ((isinstance(f, ast.Attribute) and f.attr in GUARD_CALLS)
                       or (isinstance(f, ast.Name) and f.id in GUARD_NAMES))
        elif isinstance(node, ast.Constant):
            bad = not isinstance(node.value, (int, float, str, bool, type(None)))
        elif isinstance(node, (ast.Lambda, ast.NamedExpr, ast.comprehension, ast.Starred, ast.JoinedStr,
                               ast.FormattedValue, ast.Await, ast.Yield, ast.YieldFrom)):
            bad = True
        if bad:
            refuse(path, f"guard {code[:80]!r}")


def _vet_torch_save(path, name: str, data: bytes) -> None:
    """torch.export.load unpickles these with weights_only=True and falls back to the full
    unpickler when that fails: refuse whatever the safe loader refuses."""
    import torch

    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except Exception:
        refuse(path, f"{name} holds objects the safe loader refuses")


@contextlib.contextmanager
def guarded():
    """While torch.export.load runs: torch.load only with weights_only=True, and the plain
    unpicklers disabled (vet() already refused what would reach them)."""
    import pickle

    import torch
    from torch.export.pt2_archive import _package

    real_load = torch.load

    def safe_load(*args, **kwargs):
        kwargs["weights_only"] = True
        return real_load(*args, **kwargs)

    def no_pickle(*args, **kwargs):
        raise UserError("refused: a pickled object in the archive")

    class _NoPickle:
        def __getattr__(self, name):
            return no_pickle if name in ("loads", "load") else getattr(pickle, name)

    saved = (_package.pickle, torch._C._pickle_load_obj)
    torch.load, _package.pickle = safe_load, _NoPickle()
    torch._C._pickle_load_obj = no_pickle
    try:
        yield
    finally:
        torch.load = real_load
        _package.pickle, torch._C._pickle_load_obj = saved
