"""Safetensors headers, parsed by hand and checked exactly as the safetensors library checks them: the library exposes
names, dtypes and shapes but not the byte offsets gpumerge reads tensors at (``pread`` into reused buffers,
``copy_file_range`` file to file), and its loaders would touch (and count in RSS) whole mmapped shards.

The two reads a header needs (its length, then its JSON) and pure checks of what they returned: no index files, no
configs, no tensor data (gpumerge.checkpoint reads those)."""

from __future__ import annotations

import json
import math
import os
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpumerge.errors import CheckpointError
from gpumerge.fsutil import load_json

# safetensors dtype code -> bytes per element
ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}
FLOAT_CODES = ("F64", "F32", "F16", "BF16")
FP8_CODES = ("F8_E4M3", "F8_E5M2", "F8_E8M0")
DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}

# The safetensors library's own limits (safetensors/src/tensor.rs): a header of at most MAX_HEADER_SIZE bytes, and
# shapes, offsets and sizes that fit its 64-bit `usize`.
_MAX_HEADER_BYTES = 100_000_000
_MAX_USIZE = 2**64 - 1
_ENTRY_KEYS = ("dtype", "shape", "data_offsets")
_SHOWN_CHARS = 120
_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxlist, _BRIEF.maxdict, _BRIEF.maxstring, _BRIEF.maxlong = 3, 8, 4, 60, 40


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype code
    shape: tuple[int, ...]
    nbytes: int
    path: Path
    offset: int | None  # absolute byte offset in `path`; None for pickled .bin tensors

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_CODES


def show(name: Any) -> str:
    """A tensor or file name for a one-line message: as it is when short and printable, else quoted and escaped."""
    if isinstance(name, str) and name and name.isprintable() and len(name) <= _SHOWN_CHARS:
        return name
    text = name[:_SHOWN_CHARS] if isinstance(name, str) else name
    return repr(text) + ("..." if isinstance(name, str) and len(name) > _SHOWN_CHARS else "")


def brief_json(value: Any) -> str:
    """A JSON value for a one-line message: scalars as JSON, containers summarised (never walked deeply)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        text = json.dumps(value)
        return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "..."
    return _BRIEF.repr(value)


def json_type(value: Any) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def _is_usize(value: Any) -> bool:
    """A JSON integer the safetensors library reads as a 64-bit unsigned `usize` (bools are not integers)."""
    return type(value) is int and 0 <= value <= _MAX_USIZE


def _is_unicode(text: str) -> bool:
    """False for a string with a lone UTF-16 surrogate (JSON ``"\\ud800"``): Python reads it, the library refuses it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _has_negative_zero(text: str) -> bool:
    """Whether JSON ``text`` (already parsed once: depth and keys are fine) holds the integer -0, which Python reads
    as 0 and the library's parser as the float -0.0, refused for a shape or an offset."""
    if "-0" not in text:
        return False
    found: list[bool] = []
    json.loads(text, parse_int=lambda digits: found.append(digits == "-0") or 0)
    return any(found)


def read_safetensors_header(fd: int, path: Path, *, label: str) -> tuple[bytes, list[TensorInfo]]:
    """The header's raw bytes and its tensors, from an open safetensors file: accepted exactly when the safetensors
    library accepts it (its ``read_metadata`` and ``Metadata::validate``), except where gpumerge is stricter
    (duplicate keys, unknown entry keys, dtypes it does not read). ``label`` names the model in errors."""
    file_bytes = os.fstat(fd).st_size
    raw = _read_header_bytes(fd, path, file_bytes, label)
    header = _parse_header(path, raw, label)
    data_start = 8 + len(raw)
    _check_metadata(path, header.get("__metadata__"), label)
    infos = [_entry(path, name, entry, data_start, label) for name, entry in header.items() if name != "__metadata__"]
    _check_data_layout(path, infos, data_start=data_start, data_bytes=file_bytes - data_start, label=label)
    return raw, infos


def pread_exact(fd: int, path: Path, nbytes: int, offset: int, *, what: str, label: str) -> bytes:
    """Exactly ``nbytes`` at ``offset``; a short file is one error naming what was being read."""
    data = bytearray()
    while len(data) < nbytes:
        chunk = os.pread(fd, min(nbytes - len(data), 2**24), offset + len(data))
        if not chunk:
            raise CheckpointError(f"{label} {path}: unexpected end of file while reading {what}")
        data += chunk
    return bytes(data)


def _read_header_bytes(fd: int, path: Path, file_bytes: int, label: str) -> bytes:
    """The JSON header's bytes; its length field is checked against the limit and the file's size first."""
    if file_bytes < 8:
        raise CheckpointError(f"{label} {path}: truncated safetensors file ({file_bytes} bytes; it should "
                              "start with an 8-byte header length)")
    header_bytes = int.from_bytes(pread_exact(fd, path, 8, 0, what="the header length", label=label), "little")
    if header_bytes > _MAX_HEADER_BYTES:
        raise CheckpointError(
            f"{label} {path}: corrupt safetensors file: its header length field says {header_bytes} bytes, "
            f"more than the {_MAX_HEADER_BYTES} bytes the safetensors format allows")
    if 8 + header_bytes > file_bytes:
        raise CheckpointError(f"{label} {path}: corrupt or truncated safetensors file (header of "
                              f"{header_bytes} bytes, file of {file_bytes} bytes)")
    return pread_exact(fd, path, header_bytes, 8, what="the header", label=label)

def _parse_header(path: Path, raw: bytes, label: str) -> dict[str, Any]:
    what = f"{label} {path}: corrupt safetensors header"
    try:
        text = raw.decode("utf-8")  # strict: no byte-order mark dropped, as in the library
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{what}: it is not UTF-8 text (byte {8 + exc.start} of the file is "
                              f"{raw[exc.start:exc.start + 1]!r})") from None
    header = load_json(text, what=what, error=CheckpointError)
    if not isinstance(header, dict):
        raise CheckpointError(f"{what}: it is {json_type(header)}, not a JSON object")
    if _has_negative_zero(text):
        raise CheckpointError(f"{what}: it holds the integer -0, which the safetensors library refuses in a "
                              "shape or offset")
    return header

def _check_metadata(path: Path, metadata: Any, label: str) -> None:
    """``__metadata__``: absent, null, or an object of strings (the library's Option<HashMap<String, String>>)."""
    where = f"{label} {path}: corrupt safetensors header: __metadata__ must map strings to strings"
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{where}, found {json_type(metadata)}")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise CheckpointError(f"{where}, found {show(key)}: {json_type(value)}")
        if not (_is_unicode(key) and _is_unicode(value)):
            raise CheckpointError(f"{where}; the entry {show(key)} holds a lone UTF-16 surrogate escape")

def _entry(path: Path, name: str, entry: Any, data_start: int, label: str) -> TensorInfo:
    """One tensor's entry, with the library's types and arithmetic (64-bit, overflow refused)."""
    where = f"{label} {path}: corrupt header entry for {show(name)}"
    if not _is_unicode(name):
        raise CheckpointError(f"{where}: the name holds a lone UTF-16 surrogate escape")
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: expected an object with dtype, shape and data_offsets, found "
                              f"{json_type(entry)}")
    unexpected = [key for key in entry if key not in _ENTRY_KEYS]
    if unexpected:
        raise CheckpointError(f"{where}: unexpected key {show(repr(unexpected[0]))} (an entry has dtype, shape "
                              "and data_offsets only)")
    missing = [key for key in _ENTRY_KEYS if key not in entry]
    if missing:
        raise CheckpointError(f"{where}: it has no {missing[0]}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str):
        raise CheckpointError(f"{where}: dtype must be a string such as \"F16\", found {brief_json(dtype)}")
    if dtype not in ITEMSIZE:
        raise CheckpointError(f"{label} {path}: tensor {show(name)} has unsupported dtype {show(dtype)} "
                              f"(gpumerge reads {', '.join(ITEMSIZE)})")
    if not isinstance(shape, list) or not all(_is_usize(dim) for dim in shape):
        raise CheckpointError(f"{where}: shape must be a list of non-negative 64-bit integers, found "
                              f"{brief_json(shape)}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_usize(o) for o in offsets):
        raise CheckpointError(f"{where}: data_offsets must be two non-negative 64-bit integers [begin, end], "
                              f"found {brief_json(offsets)}")
    begin, end = offsets
    if end < begin:
        raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] ends before it begins")
    nbytes = _tensor_bytes(where, dtype, shape)
    if end - begin != nbytes:
        raise CheckpointError(f"{where}: {dtype}{brief_json(shape)} needs {nbytes} bytes, its data_offsets "
                              f"[{begin}, {end}] span {end - begin}")
    return TensorInfo(name, dtype, tuple(shape), nbytes, path, data_start + begin)

def _tensor_bytes(where: str, dtype: str, shape: list[int]) -> int:
    """prod(shape) * itemsize, refused where the library's 64-bit product (element count, then bits) overflows."""
    elements = 1
    for dim in shape:
        elements *= dim
        if elements > _MAX_USIZE:
            break
    if elements > _MAX_USIZE or elements * ITEMSIZE[dtype] * 8 > _MAX_USIZE:
        raise CheckpointError(f"{where}: the size of {dtype}{brief_json(shape)} overflows 64 bits (the safetensors "
                              "library refuses it)")
    return elements * ITEMSIZE[dtype]

def _check_data_layout(path: Path, infos: list[TensorInfo], *, data_start: int, data_bytes: int,
                       label: str) -> None:
    """Sorted by offset, the tensors tile the data buffer: the first begins at byte 0, each where the previous
    one ends, and the last ends at the end of the file."""
    where = f"{label} {path}: corrupt safetensors header"
    previous: TensorInfo | None = None
    position = 0
    for info in sorted(infos, key=lambda t: (t.offset, t.nbytes)):
        begin = info.offset - data_start
        if begin < position:
            raise CheckpointError(f"{where}: overlapping data_offsets: {show(info.name)} begins at byte {begin}, "
                                  f"inside {show(previous.name)}, which ends at byte {position}")
        if begin > position:
            before = f"{show(previous.name)} ends at byte {position}" if previous else "the data begins at byte 0"
            raise CheckpointError(f"{where}: a gap in the data: {show(info.name)} begins at byte {begin}, "
                                  f"{before}")
        previous, position = info, begin + info.nbytes
    if position < data_bytes:
        raise CheckpointError(f"{label} {path}: corrupt safetensors file: {data_bytes - position} bytes "
                              f"after the last tensor's data (the tensors hold {position} bytes, the file has "
                              f"{data_bytes} after its header)")
    if position > data_bytes:
        raise CheckpointError(f"{label} {path}: truncated file: the tensors need {position} bytes of data "
                              f"after the header, the file has {data_bytes}")
