"""Reading an ONNX file whose weights are inline without reading the weights.

protobuf has no way to parse a message while leaving some byte fields where they are, so
this walks the wire format of the three messages on the path to the weights (ModelProto
→ graph → initializer → raw_data), copies everything else, and turns each large
`raw_data` into an external-data reference to its own bytes in the file. The result is
a small graph proto whose weights ONNX Runtime and onnx_ir read from the original file
(memory-mapped), so an inline 440 MB model is never parsed, copied or spilled.
"""

from __future__ import annotations

import mmap
import os

import onnx

from attn_opt.core.errors import UserError
from attn_opt.core.ir.external import data_path

# field numbers (onnx.proto3)
MODEL_GRAPH = 7
GRAPH_INITIALIZER = 5
TENSOR_RAW_DATA = 9
TENSOR_EXTERNAL_DATA = 13
TENSOR_DATA_LOCATION = 14
EXTERNAL = 1
VARINT, I64, LEN, I32 = 0, 1, 2, 5


def _varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _enc_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _fields(buf, start: int, end: int):
    """(field number, wire type, field start, payload start, payload end) of each field."""
    pos = start
    while pos < end:
        begin = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == VARINT:
            _, nxt = _varint(buf, pos)
            yield number, wire, begin, pos, nxt
            pos = nxt
        elif wire == I64:
            yield number, wire, begin, pos, pos + 8
            pos += 8
        elif wire == LEN:
            size, pos = _varint(buf, pos)
            yield number, wire, begin, pos, pos + size
            pos += size
        elif wire == I32:
            yield number, wire, begin, pos, pos + 4
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def _len_field(number: int, payload: bytes) -> bytes:
    return _enc_varint(number << 3 | LEN) + _enc_varint(len(payload)) + payload


def _entry(key: str, value: str) -> bytes:
    return _len_field(TENSOR_EXTERNAL_DATA, _len_field(1, key.encode()) + _len_field(2, value.encode()))


def _tensor(buf, start: int, end: int, location: str, threshold: int) -> bytes:
    parts, ref = [], None
    for number, wire, begin, a, b in _fields(buf, start, end):
        if number == TENSOR_RAW_DATA and wire == LEN and b - a >= threshold:
            ref = (a, b - a)
        else:
            parts.append(bytes(buf[begin:b]))
    if ref is not None:
        parts.append(_enc_varint(TENSOR_DATA_LOCATION << 3 | VARINT) + _enc_varint(EXTERNAL))
        parts += [_entry("location", location), _entry("offset", str(ref[0])), _entry("length", str(ref[1]))]
    return b"".join(parts)


def _graph(buf, start: int, end: int, location: str, threshold: int) -> bytes:
    parts = []
    for number, wire, begin, a, b in _fields(buf, start, end):
        if number == GRAPH_INITIALIZER and wire == LEN:
            parts.append(_len_field(GRAPH_INITIALIZER, _tensor(buf, a, b, location, threshold)))
        else:
            parts.append(bytes(buf[begin:b]))
    return b"".join(parts)


def load_weightless(path: str | os.PathLike, threshold: int) -> onnx.ModelProto:
    """The model in `path` with each initializer's raw_data of at least `threshold` bytes
    left in the file, referenced as external data (location: the file's own name)."""
    location = os.path.basename(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        parts = []
        try:
            for number, wire, begin, a, b in _fields(buf, 0, len(buf)):
                if b > len(buf):
                    raise IndexError
                if number == MODEL_GRAPH and wire == LEN:
                    parts.append(_len_field(MODEL_GRAPH, _graph(buf, a, b, location, threshold)))
                else:
                    parts.append(bytes(buf[begin:b]))
        except IndexError:
            raise ValueError("the file ends inside a field: truncated, or not an ONNX protobuf") from None
    return onnx.ModelProto.FromString(b"".join(parts))


def _inline_tensor(buf, start: int, end: int, folder: str, files: dict) -> tuple[list, int]:
    """A TensorProto with its external reference swapped for raw_data: (pieces, size);
    a piece is bytes, or (mmap, offset, length) copied when written."""
    pieces, info = [], {}
    for number, wire, begin, a, b in _fields(buf, start, end):
        if number == TENSOR_EXTERNAL_DATA:
            entry = {n: bytes(buf[x:y]).decode() for n, _, _, x, y in _fields(buf, a, b)}
            info[entry.get(1, "")] = entry.get(2, "")
        elif number != TENSOR_DATA_LOCATION:
            pieces.append(bytes(buf[begin:b]))
    if not info:
        return [bytes(buf[start:end])], end - start
    location, offset = info["location"], int(info.get("offset", 0) or 0)
    if location not in files:
        with open(data_path(folder, location, links=False), "rb") as f:
            files[location] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    length = int(info["length"]) if info.get("length") else len(files[location]) - offset
    if offset < 0 or length < 0 or offset + length > len(files[location]):
        raise UserError(f"external data {location!r} {offset}+{length} runs past the end of the file")
    head = _enc_varint(TENSOR_RAW_DATA << 3 | LEN) + _enc_varint(length)
    pieces += [head, (files[location], offset, length)]
    return pieces, sum(len(p) for p in pieces[:-1]) + length


def save_inline(proto: onnx.ModelProto, folder: str, dest: str | os.PathLike) -> None:
    """Write `proto` with every external tensor's bytes inline, streamed from the weight
    files in `folder`: the whole model is never held in memory."""
    buf = proto.SerializeToString()
    files: dict = {}
    out = []  # pieces of the file, in order
    try:
        for number, wire, begin, a, b in _fields(buf, 0, len(buf)):
            if number != MODEL_GRAPH or wire != LEN:
                out.append(buf[begin:b])
                continue
            graph, size = [], 0
            for n2, w2, begin2, a2, b2 in _fields(buf, a, b):
                if n2 == GRAPH_INITIALIZER and w2 == LEN:
                    pieces, tsize = _inline_tensor(buf, a2, b2, folder, files)
                    head = _enc_varint(GRAPH_INITIALIZER << 3 | LEN) + _enc_varint(tsize)
                    graph += [head] + pieces
                    size += len(head) + tsize
                else:
                    graph.append(buf[begin2:b2])
                    size += b2 - begin2
            out += [_enc_varint(MODEL_GRAPH << 3 | LEN) + _enc_varint(size)] + graph
        with open(dest, "wb") as f:
            for piece in out:
                if isinstance(piece, tuple):
                    m, offset, length = piece
                    for s in range(offset, offset + length, 64 << 20):
                        f.write(m[s:min(s + (64 << 20), offset + length)])
                else:
                    f.write(piece)
    finally:
        for m in files.values():
            m.close()


def _set_location(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del t.external_data[:]
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v


def _sources(proto: onnx.ModelProto, folder: str | None) -> dict:
    """Per external data file the model reads: the (tensor, offset, length) it reads there."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    out: dict = {}
    for t in proto.graph.initializer:
        if uses_external_data(t):
            info = ExternalDataInfo(t)
            src = data_path(folder or os.getcwd(), info.location, t.name, links=False)
            size = os.path.getsize(src)
            length = info.length if info.length else size - (info.offset or 0)
            if (info.offset or 0) + length > size:
                raise UserError(f"tensor {t.name!r}: external data runs past the end of {info.location}")
            out.setdefault(src, []).append((t, info.offset or 0, length))
    return out


def _covered(used: list) -> int:
    """Bytes of a file the (tensor, offset, length) ranges cover, overlaps counted once."""
    total, end = 0, 0
    for _, offset, length in sorted(used, key=lambda u: u[1]):
        total += max(0, offset + length - max(offset, end))
        end = max(end, offset + length)
    return total


def save_external(proto: onnx.ModelProto, folder: str | None, dest: str | os.PathLike, data_name: str,
                  threshold: int) -> None:
    """Write `proto` to `dest` with its weights in DEST's folder/`data_name`: external
    tensors are copied file to file by the kernel (nothing passes through memory): a source
    file the output reads every byte of is copied whole (a reflink where the filesystem
    has them, else `copy_file_range`), its tensors keeping their offsets; other tensors one
    by one, packed; inline ones of at least `threshold` bytes are appended."""
    dest = os.fspath(dest)
    out_path = os.path.join(os.path.dirname(dest), data_name)
    with open(out_path, "wb") as out:
        for src, used in _sources(proto, folder).items():
            size = os.path.getsize(src)
            with open(src, "rb") as f:
                if _covered(used) == size:  # no dead bytes: one copy, offsets kept
                    base = _align(out)
                    _copy_range(f, out, 0, size)
                    for t, offset, length in used:
                        _set_location(t, data_name, base + offset, length)
                    continue
                for t, offset, length in used:
                    out.flush()
                    base = out.tell()
                    _copy_range(f, out, offset, length)
                    _set_location(t, data_name, base, length)
        _append_inline(proto, out, data_name, threshold)
    with open(dest, "wb") as f:
        f.write(proto.SerializeToString())


def save_shared(proto: onnx.ModelProto, folder: str, dest: str | os.PathLike, staged_dir: str | os.PathLike,
                data_name: str, threshold: int) -> None:
    """Write `proto` to `staged_dir`/DEST's name with its external tensors referencing the
    input's data files in place (`--share-weights`; DEST is in their folder: external data
    is a file in the model's folder, and a hard link is refused as one); only inline
    tensors of at least `threshold` bytes (what the passes added) go to `data_name`,
    which is not written when there are none."""
    for src, used in _sources(proto, folder).items():
        location = os.path.relpath(src, os.path.abspath(folder))
        for t, offset, length in used:
            _set_location(t, location, offset, length)
    out_path = os.path.join(staged_dir, data_name)
    with open(out_path, "wb") as out:
        _append_inline(proto, out, data_name, threshold)
    if not os.path.getsize(out_path):
        os.unlink(out_path)
    with open(os.path.join(staged_dir, os.path.basename(dest)), "wb") as f:
        f.write(proto.SerializeToString())


def _align(out, to: int = 4096) -> int:
    """Pad the file to a multiple of `to` bytes (a whole file copied after another starts on
    a block, so it can be a reflink); the new end."""
    out.flush()
    end = out.tell()
    if end % to:
        out.write(b"\0" * (to - end % to))
        out.flush()
    return out.tell()


def _append_inline(proto: onnx.ModelProto, out, data_name: str, threshold: int) -> None:
    """Inline tensors of at least `threshold` bytes appended to `out`, referenced there."""
    for t in proto.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL and t.HasField("raw_data") and len(t.raw_data) >= threshold:
            out.flush()
            offset, length = out.tell(), len(t.raw_data)
            out.write(t.raw_data)
            t.ClearField("raw_data")
            _set_location(t, data_name, offset, length)


def _copy_range(src, dst, offset: int, length: int) -> None:
    """`length` bytes of `src` from `offset` appended to `dst` by the kernel: a reflink
    (FICLONERANGE) where the filesystem shares blocks, else copy_file_range, else a buffer."""
    dst.flush()
    if _reflink(src, dst, offset, length):
        return
    done = 0
    while done < length:
        try:
            n = os.copy_file_range(src.fileno(), dst.fileno(), length - done, offset + done)
        except (AttributeError, OSError):  # no copy_file_range here: through a buffer
            src.seek(offset + done)
            chunk = src.read(min(64 << 20, length - done))
            dst.write(chunk)
            n = len(chunk)
        if n <= 0:
            raise OSError(f"short copy from {src.name}")
        done += n


FICLONERANGE = 0x4020940D  # linux/fs.h: _IOW(0x94, 13, struct file_clone_range)


def _reflink(src, dst, offset: int, length: int) -> bool:
    """Share `src`'s blocks with `dst` (btrfs, xfs, ...); False where the filesystem or the
    alignment does not allow it (then the bytes are copied)."""
    import fcntl
    import struct

    start = dst.tell()
    if offset % 4096 or start % 4096 or not hasattr(fcntl, "ioctl"):
        return False
    try:
        fcntl.ioctl(dst.fileno(), FICLONERANGE, struct.pack("qQQQ", src.fileno(), offset, length, start))
    except OSError:
        return False
    dst.seek(start + length)
    return True
