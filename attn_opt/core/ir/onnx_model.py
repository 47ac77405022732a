"""An ONNX model whose weights stay where they are.

The graph lives in an `onnx_ir.Model`; tensors kept in external data files stay there
(onnx_ir memory-maps them and reads a page only when a pass asks for a weight). A model
whose large weights are inline has them moved once into a temporary data file, so every
later step works on a *weightless* graph proto of a few MB: shape inference, the checker,
FLOP counting and the ONNX Runtime session (which maps the weight files itself through
`session.model_external_initializers_file_folder_path`). Nothing copies the weights, and
the model is serialised with them only when it is written.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
import onnx_ir as ir
from onnx import external_data_helper

from attn_opt.core.errors import UserError, first_line as _first_line
from attn_opt.core.ir.onnx_runs import Memo
from attn_opt.core.ir.onnx_wire import load_weightless, save_external, save_inline, save_shared

SPILL_BYTES = 1024  # inline tensors at least this large go to the weight file
SPILL_MODEL_BYTES = 64 << 20  # models smaller than this keep their weights inline (no temp file)
PROTO_LIMIT = 2**31 - 1  # protobuf's limit: larger models must keep their weights outside
FOLDER_KEY = "session.model_external_initializers_file_folder_path"


def _uses_external(proto: onnx.ModelProto) -> bool:
    return any(external_data_helper.uses_external_data(t) for t in proto.graph.initializer)


class OnnxModel:
    """The graph (`ir`), the folder its weight files are in, and where it came from."""

    def __init__(self, model: ir.Model, folder: str | None, source: str = "<model>",
                 external_input: bool = False, keep: object = None):
        self.ir = model
        self.folder = folder  # base folder of every external tensor, or None
        self.source = source
        self.external_input = external_input  # the user's file had external data
        self._keep = keep  # the temporary weight folder, removed with the last model using it
        self._memo = Memo()  # what runs of this graph gave (core/ir/onnx_runs.py)

    # ---- loading -------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> "OnnxModel":
        """Read an ONNX file without its external data, or raise a one-line UserError."""
        p = Path(path)
        if not p.exists():
            raise UserError(f"no such file: {p}")
        if p.is_dir():
            raise UserError(f"{p} is a directory, not an ONNX model")
        big = p.stat().st_size >= SPILL_MODEL_BYTES
        try:  # a large inline model: its weights stay in the file, referenced where they lie
            proto = load_weightless(p, SPILL_BYTES) if big else onnx.load(str(p), load_external_data=False)
        except Exception as e:  # protobuf DecodeError, a truncated file, ...
            raise UserError(f"{p} is not a readable ONNX model ({_first_line(e)})") from None
        if not proto.graph.node and not proto.graph.output:
            raise UserError(f"{p} is not an ONNX model (no graph found)")
        external = _uses_external(proto)
        if external:  # the inline weights of a large model are referenced in its own file: `own`
            check_external(proto, p.parent, own=p.name if big else None)
        inline = big and not any(external_data_helper.uses_external_data(t) and
                                 external_data_helper.ExternalDataInfo(t).location != p.name
                                 for t in proto.graph.initializer)
        folder = str(p.parent.resolve()) if external else None
        om = cls._from_proto(proto, folder, str(p), external and not inline, size=0)
        return om

    @classmethod
    def from_proto(cls, proto: onnx.ModelProto, folder: str | None = None, source: str = "<ModelProto>"):
        """A model held in memory (its external tensors, if any, resolve against `folder`)."""
        return cls._from_proto(proto, folder, source, _uses_external(proto))

    @classmethod
    def _from_proto(cls, proto, folder, source, external, size: int | None = None) -> "OnnxModel":
        keep = None
        if not external and (size if size is not None else proto.ByteSize()) >= SPILL_MODEL_BYTES:
            keep = tempfile.TemporaryDirectory(prefix="attn-opt-weights-")
            folder = keep.name
            proto = _spill(proto, folder)
        if external and folder:
            check_external(proto, folder)
        check_names(proto)
        try:
            model = ir.serde.deserialize_model(proto)
        except Exception as e:  # onnx_ir wraps the reason: the innermost one is what to say
            while e.__cause__ is not None:
                e = e.__cause__
            raise UserError(f"{source} is not a readable ONNX model ({_first_line(e)[:300]})") from None
        if folder:
            ir.external_data.set_base_dir(model.graph, folder)
            _inline_small(model)
        return cls(model, folder, source, external, keep)

    def clone(self) -> "OnnxModel":
        """A copy of the graph that shares the weights (tensors are immutable here)."""
        return OnnxModel(self.ir.clone(), self.folder, self.source, self.external_input, self._keep)

    # ---- weightless views ----------------------------------------------------------------
    def graph_proto(self) -> onnx.ModelProto:
        """The model as a proto whose large weights are references into the weight files."""
        return ir.serde.serialize_model(self.ir)

    def weight_bytes(self) -> int:
        total = 0
        for v in self.ir.graph.initializers.values():
            if v.const_value is not None:
                total += v.const_value.nbytes
        return total

    def checkable_proto(self) -> onnx.ModelProto:
        """The weightless proto with each external weight declared as a graph input of its
        type and shape: what onnx.checker can check without the weight files."""
        proto = self.graph_proto()
        keep, moved = [], []
        for t in proto.graph.initializer:
            (moved if external_data_helper.uses_external_data(t) else keep).append(t)
        if moved:
            del proto.graph.initializer[:]
            proto.graph.initializer.extend(keep)
            have = {i.name for i in proto.graph.input}
            proto.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                                     for t in moved if t.name not in have)
        return proto

    def check(self, full: bool = True) -> None:
        """onnx.checker on the weightless proto (full: with strict shape inference)."""
        try:
            onnx.checker.check_model(self.checkable_proto(), full_check=full)
        except Exception as e:
            raise UserError(f"the rewritten model is not valid ONNX ({_first_line(e)})") from None

    # ---- running ---------------------------------------------------------------------------
    def session(self, extra: list[str] = (), threads: int | None = None, prepack: bool = False,
                proto: onnx.ModelProto | None = None, optimize: bool = True):
        """An ONNX Runtime session; `extra` names intermediate values to return as well
        (`proto`: this model's weightless proto, where the caller has it already;
        `optimize=False`: ORT's graph optimizations off).
        Weight prepacking (copies of every MatMul weight in ORT's own layout) is off unless
        asked for: the pipeline runs each session on a few small input sets, where it costs
        seconds and memory. Such a session's threads also sleep between ops instead of
        spinning, and its memory arena is off (freed with each run): on shared cores a
        spinning pool doubled each run's time (measured on BERT-base), and the arena kept
        every segment's activations. Sessions asked to prepack (timing, repeated runs)
        keep ORT's defaults."""
        import onnxruntime as ort

        ort.set_default_logger_severity(4)
        if proto is None:
            proto = self.graph_proto()
        have = {o.name for o in proto.graph.output}
        added = [onnx.ValueInfoProto(name=n) for n in dict.fromkeys(extra) if n and n not in have]
        proto.graph.output.extend(added)
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        if threads:
            opts.intra_op_num_threads = threads
        if self.folder:
            opts.add_session_config_entry(FOLDER_KEY, self.folder)
        if not prepack:
            opts.add_session_config_entry("session.disable_prepacking", "1")
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.enable_cpu_mem_arena = False
        if not optimize:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        data = proto.SerializeToString()
        if added:  # the caller's proto as it was
            del proto.graph.output[len(proto.graph.output) - len(added):]
        return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])

    def run(self, feeds: Mapping[str, np.ndarray], extra: list[str] = (), also=(),
            optimize: bool = True) -> dict[str, np.ndarray]:
        """The outputs and `extra` values of a run on `feeds`, when it fits the memory limit
        (estimated from the shapes: core/ir/onnx_memory.py). The sets in `also` are run by
        the same session and remembered, as every run of this graph is: a run it already
        made is not made again (core/ir/onnx_runs.py). Past `WHOLE_RUN_BYTES` of weights
        it runs one segment at a time. `optimize=False`: one plain run with ORT's graph
        optimizations off (an If branch run alone), not remembered."""
        feeds = split_feeds(self.ir, feeds)  # a cache a rewrite split by KV group (per-head streaming)
        if not optimize:
            from attn_opt.core.ir.onnx_memory import check_run

            check_run(self.graph_proto(), {k: np.shape(v) for k, v in feeds.items()})
            sess = self.session(extra, optimize=False)
            names = [o.name for o in sess.get_outputs()]
            wanted = {i.name for i in sess.get_inputs()}
            out = sess.run(names, {k: v for k, v in feeds.items() if k in wanted})
            del sess
            return dict(zip(names, out))
        from attn_opt.core.ir.onnx_runs import run

        return run(self, feeds, extra, [split_feeds(self.ir, f) for f in also])

    def probe(self, feeds: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        """The named values of one run (a large model's run goes one segment of weights at
        a time, so memory holds about one layer's)."""
        return self.run(feeds, names)

    # ---- writing ---------------------------------------------------------------------------
    def to_proto(self) -> onnx.ModelProto:
        """The whole model with its weights inline (small models; tests and the Python API)."""
        proto = self.graph_proto()
        if self.folder and _uses_external(proto):
            external_data_helper.load_external_data_for_model(proto, self.folder)
        return proto

    def save(self, dest: str | os.PathLike, external: bool | None = None, share: bool = False) -> Path | None:
        """Write atomically. With external data (when the input had it, or when the model is
        over protobuf's limit) the weights go to DEST.data next to DEST. Returns that path.
        `share` (--share-weights): the output references the input's weight files in place
        (DEST must be in their folder); DEST.data holds only what the passes added, and is
        not written when they added nothing."""
        from attn_opt.core.io import atomic_dir, check_space, os_errors, switch_in

        dest = Path(dest)
        if share and not (self.external_input and self.folder):
            raise UserError("--share-weights: the input model keeps its weights inline, so there is no weight "
                            "file to share; write without --share-weights")
        if share and dest.parent.resolve() != Path(self.folder).resolve():
            raise UserError(f"--share-weights: -o must be in the folder of the input's weight files ({self.folder}): "
                            "external data is read from the model's own folder")
        if external is None:
            external = share or self.external_input or self.weight_bytes() >= PROTO_LIMIT - (64 << 20)
        data = dest.with_name(dest.name + ".data") if external else None
        if data is not None and self.folder and any(
                Path(self.folder, t.location).resolve() == data.resolve() for t in self._external_tensors()):
            raise UserError(f"{data} holds the input model's weights; choose another -o")
        copied = 0 if share else sum(t.nbytes for t in self._external_tensors())
        proto = self.graph_proto()
        check_space(dest.parent, proto.ByteSize() + copied, str(dest))
        with os_errors(dest), atomic_dir(dest.parent) as tmp:
            staged = Path(tmp) / dest.name
            if share:  # the input's weight files referenced where they are
                save_shared(proto, self.folder, dest, tmp, data.name, SPILL_BYTES)
            elif data is None and self.folder:  # inline output: weights streamed from their files
                save_inline(proto, self.folder, staged)
            elif data is None:
                ir.save(self.ir, staged)
            else:  # weights copied file to file, the graph written once
                save_external(proto, self.folder, staged, data.name, SPILL_BYTES)
            pairs = [(Path(tmp) / data.name, data)] if data is not None and (Path(tmp) / data.name).exists() else []
            switch_in(pairs + [(staged, dest)])  # the weights and the graph that names them, together
        return data if pairs else None

    def _external_tensors(self):
        for v in self.ir.graph.initializers.values():
            if isinstance(v.const_value, ir.ExternalTensor):
                yield v.const_value


def _inline_small(model: ir.Model) -> None:
    """Small external tensors (shapes, axes) come inline: shape inference and ORT's
    graph-time checks read their values."""
    for v in model.graph.initializers.values():
        t = v.const_value
        if isinstance(t, ir.ExternalTensor) and t.nbytes < SPILL_BYTES:
            v.const_value = ir.Tensor(np.array(t.numpy()), name=t.name)


def check_names(proto: onnx.ModelProto) -> None:
    """Each value of the main graph named once: inputs, initializers and node outputs (an
    initializer may share its name with the input it gives a default to, as IR < 4 wrote);
    a duplicate makes every later reference ambiguous, so it is one line naming it."""
    g = proto.graph
    seen: dict[str, str] = {}

    def claim(name: str, what: str) -> None:
        if name in seen:
            raise UserError(f"the model names two values {name!r} ({seen[name]} and {what}); "
                            "each value must have its own name")
        seen[name] = what

    for i in g.input:
        claim(i.name, "a graph input")
    inputs = set(seen)
    for t in g.initializer:
        if t.name in inputs:
            inputs.discard(t.name)  # the legacy default of an input: once only
            continue
        claim(t.name, "an initializer")
    for n in g.node:
        for o in n.output:
            if o:
                claim(o, f"an output of node {n.name or n.op_type!r}")


def _tensor_bytes(t: onnx.TensorProto) -> int | None:
    """Bytes a tensor of its type and shape holds (None for strings and types numpy lacks)."""
    try:
        item = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    if t.data_type in (onnx.TensorProto.STRING,) or item == 0:
        return None
    n = 1
    for d in t.dims:
        n *= int(d)
    bits = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
    return (n + 1) // 2 if t.data_type in bits else n * item


def check_external(proto: onnx.ModelProto, folder: str | os.PathLike, own: str | None = None) -> None:
    """Every external tensor's file inside `folder` (core/ir/external.py) and its bytes inside
    that file, as many as its type needs: one line naming the tensor otherwise."""
    from attn_opt.core.ir.external import check_range, data_path

    for t in proto.graph.initializer:
        if external_data_helper.uses_external_data(t):
            try:
                info = external_data_helper.ExternalDataInfo(t)
            except ValueError as e:  # a negative or non-numeric offset/length
                raise UserError(f"tensor {t.name!r}: bad external data ({_first_line(e)})") from None
            path = data_path(folder, info.location, t.name, own)
            check_range(path, info.offset, info.length, _tensor_bytes(t), t.name)


def _spill(proto: onnx.ModelProto, folder: str) -> onnx.ModelProto:
    """The large inline initializers written to FOLDER/weights.bin; a fresh, small proto
    that references them. The caller's proto is left as it was (the spill works on a copy,
    released once the weights are written)."""
    work = onnx.ModelProto()
    work.CopyFrom(proto)
    external_data_helper.convert_model_to_external_data(
        work, all_tensors_to_one_file=True, location="weights.bin", size_threshold=SPILL_BYTES,
        convert_attribute=False)
    external_data_helper.write_external_data_tensors(work, folder)
    return onnx.ModelProto.FromString(work.SerializeToString())  # frees the arena that held the weights


SPLIT_KEY = "attn_opt.split_cache"  # model metadata: inputs a rewrite split off another (per-head streaming)


def split_feeds(model: ir.Model, feeds: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    """Feeds for the inputs a rewrite split off another (SPLIT_KEY: per input, JSON
    {"from": the input it came from, "of": its KV heads, "groups": the ones kept, "cap":
    [sinks, window] or null}), made from a feed of the original input: its KV groups, the
    first sinks and last window positions where capped. Feeds already split pass as they are."""
    spec = model.metadata_props.get(SPLIT_KEY)
    if not spec:
        return feeds
    import json

    out = dict(feeds)
    try:
        for name, s in json.loads(spec).items():
            src = feeds.get(s["from"])
            if src is None or np.ndim(src) != 4 or np.shape(src)[1] != s["of"]:
                continue
            x = np.asarray(src)[:, s["groups"]]
            if s["cap"] and x.shape[2] > sum(s["cap"]):
                x = np.concatenate([x[:, :, :s["cap"][0]], x[:, :, x.shape[2] - s["cap"][1]:]], 2)
            out[name] = x
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise UserError(f"the model's {SPLIT_KEY} metadata is not a valid cache split ({type(e).__name__}: {e})") \
            from None
    return out
