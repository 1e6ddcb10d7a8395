"""Reading a checkpoint's *index*: config, tensor names, dtypes, shapes and byte locations; and tensor bytes.

Safetensors headers are parsed here by hand: the safetensors library exposes names, dtypes and shapes but not
the byte offsets we need to read tensors with ``pread`` into reused buffers and to copy them file-to-file with
``copy_file_range``, and its loaders would touch (and count in RSS) whole mmapped shards.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpumerge.errors import CheckpointError

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

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

# Tensor-name endings that only quantized checkpoints have (GPTQ/AWQ, bitsandbytes 8-bit and 4-bit).
_QUANT_SUFFIXES = (".qweight", ".qzeros", ".g_idx", ".SCB", ".weight_format", ".absmax", ".quant_map",
                   ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4", ".nested_absmax")
_MAX_HEADER_BYTES = 100 * 2**20
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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


def resolve_model_dir(path: str, *, label: str) -> Path:
    """A local directory, or a hub id (``org/name``) found in the local Hugging Face cache."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local.resolve()
    if local.exists():
        raise CheckpointError(f"{label} {path!r} is a file; give the model's directory (with config.json)")
    if _HUB_ID_RE.match(path) and not path.startswith((".", "/")):
        return _from_hub_cache(path, label=label)
    raise CheckpointError(f"{label} {path!r} does not exist (expected a model directory or a cached hub id org/name)")


def _from_hub_cache(repo_id: str, *, label: str) -> Path:
    from huggingface_hub import snapshot_download  # only when a hub id is given

    try:
        return Path(snapshot_download(repo_id=repo_id, local_files_only=True)).resolve()
    except Exception as exc:  # LocalEntryNotFoundError and friends: one message, whatever the hub version says
        raise CheckpointError(
            f"{label} {repo_id!r} is not a local directory and is not in the local Hugging Face cache "
            f"({type(exc).__name__}); download it first (`hf download {repo_id}`) or give a local path"
        ) from exc


class Checkpoint:
    """One model directory: its config, its tensors in on-disk order, and byte access to them."""

    def __init__(self, path: str, *, label: str) -> None:
        self.label = label
        self.source = path
        self.root = resolve_model_dir(path, label=label)
        self.config = self._read_config()
        self.tensors: dict[str, TensorInfo] = {}
        self.files: list[Path] = []
        self._headers: dict[Path, bytes] = {}
        self._bin_state: dict[Path, dict] = {}
        self._fds: dict[Path, int] = {}
        self._fd_lock = threading.Lock()  # readers of several devices and the copier share the descriptors
        self._index()
        self._refuse_quantized()

    # ---- index -------------------------------------------------------------------------------------------
    def _read_config(self) -> dict[str, Any]:
        path = self.root / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{self.label} {self.root}: no config.json (is this a Hugging Face model directory?)")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{self.label} {path}: config.json is not valid JSON ({exc})") from exc
        if not isinstance(config, dict):
            raise CheckpointError(f"{self.label} {path}: config.json is not a JSON object")
        return config

    def _index(self) -> None:
        root = self.root
        if (root / SAFE_INDEX).is_file():
            self.format = "safetensors"
            self._index_sharded(root / SAFE_INDEX, self._index_safetensors)
        elif (root / SAFE_SINGLE).is_file():
            self.format = "safetensors"
            self._index_safetensors(root / SAFE_SINGLE)
        elif (root / BIN_INDEX).is_file():
            self.format = "bin"
            self._index_sharded(root / BIN_INDEX, self._index_bin)
        elif (root / BIN_SINGLE).is_file():
            self.format = "bin"
            self._index_bin(root / BIN_SINGLE)
        else:
            raise CheckpointError(
                f"{self.label} {root}: no weights found (expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} "
                f"or {BIN_INDEX})"
            )
        if not self.tensors:
            raise CheckpointError(f"{self.label} {root}: the weight files hold no tensors")

    def _index_sharded(self, index_path: Path, index_file) -> None:
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            assert isinstance(weight_map, dict)
        except (OSError, ValueError, KeyError, TypeError, AssertionError) as exc:
            raise CheckpointError(f"{self.label} {index_path}: not a valid index (no weight_map): {exc}") from exc
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise CheckpointError(f"{self.label} {index_path}: not a valid index (weight_map must map tensor names "
                                  "to shard file names)")
        shard_names = sorted(set(weight_map.values()))
        missing = [name for name in shard_names if not (self.root / name).is_file()]
        if missing:
            raise CheckpointError(
                f"{self.label} {index_path.name} names {len(missing)} shard(s) that are not in {self.root}: "
                + ", ".join(missing[:5])
            )
        for shard in shard_names:
            index_file(self.root / shard)
        absent = [name for name, shard in weight_map.items()
                  if name not in self.tensors or self.tensors[name].path.name != shard]
        if absent:
            raise CheckpointError(
                f"{self.label} {index_path.name} lists {len(absent)} tensor(s) that are not in the shard it names: "
                + ", ".join(absent[:5])
            )

    def _index_safetensors(self, path: Path) -> None:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{self.label} {path}: truncated safetensors file ({size} bytes)")
            header_len = int.from_bytes(prefix, "little")
            if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointError(
                    f"{self.label} {path}: corrupt or truncated safetensors file (header of {header_len} bytes, "
                    f"file of {size} bytes)"
                )
            raw = fh.read(header_len)
        try:
            header = json.loads(raw)
            assert isinstance(header, dict)
        except (ValueError, AssertionError) as exc:
            raise CheckpointError(f"{self.label} {path}: corrupt safetensors header ({exc})") from exc
        data_start = 8 + header_len
        data_size = size - data_start
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            info = self._safetensors_entry(path, name, entry, data_start, data_size)
            if name in self.tensors:
                raise CheckpointError(f"{self.label}: tensor {name} is stored twice ({self.tensors[name].path.name}, "
                                      f"{path.name})")
            self.tensors[name] = info
        # keep on-disk order: by file, then by offset
        ordered = sorted((t for t in self.tensors.values() if t.path == path), key=lambda t: t.offset)
        for t in ordered:
            self.tensors.pop(t.name)
            self.tensors[t.name] = t
        self.files.append(path)
        self._headers[path] = raw

    def _safetensors_entry(self, path: Path, name: str, entry: Any, data_start: int, data_size: int) -> TensorInfo:
        def integers(values) -> bool:
            return isinstance(values, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in values)

        ok = (isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and integers(entry.get("shape"))
              and integers(entry.get("data_offsets")) and len(entry["data_offsets"]) == 2)
        if not ok:
            raise CheckpointError(f"{self.label} {path}: corrupt header entry for {name}: {str(entry)[:200]}")
        dtype = entry["dtype"]
        shape = tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        if dtype not in ITEMSIZE:
            raise CheckpointError(f"{self.label} {path}: tensor {name} has unsupported dtype {dtype}")
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        if begin < 0 or end - begin != nbytes or any(d < 0 for d in shape):
            raise CheckpointError(
                f"{self.label} {path}: corrupt header entry for {name}: {dtype}{list(shape)} needs {nbytes} bytes, "
                f"offsets say {end - begin}"
            )
        if end > data_size:
            raise CheckpointError(
                f"{self.label} {path}: truncated file: tensor {name} ends at byte {data_start + end}, the file has "
                f"{data_start + data_size} bytes"
            )
        return TensorInfo(name, dtype, shape, nbytes, path, data_start + begin)

    def _index_bin(self, path: Path) -> None:
        import torch  # pickled checkpoints need torch to be read at all

        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            try:  # legacy (non-zip) pickles cannot be mmapped
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise CheckpointError(f"{self.label} {path}: cannot read this .bin checkpoint ({exc})") from exc
        except Exception as exc:
            raise CheckpointError(f"{self.label} {path}: cannot read this .bin checkpoint safely ({exc})") from exc
        if not isinstance(state, dict):
            raise CheckpointError(f"{self.label} {path}: a .bin checkpoint must hold a dict of tensors")
        from gpumerge.kernels.dtypes import code_of

        for name, tensor in state.items():
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(f"{self.label} {path}: entry {name} is not a tensor")
            code = code_of(tensor.dtype)
            if code is None:
                raise CheckpointError(f"{self.label} {path}: tensor {name} has unsupported dtype {tensor.dtype}")
            tensor = tensor.contiguous()
            state[name] = tensor
            self.tensors[name] = TensorInfo(name, code, tuple(tensor.shape), tensor.numel() * ITEMSIZE[code], path,
                                            None)
        self.files.append(path)
        self._bin_state[path] = state
        self._headers[path] = json.dumps(
            {n: [t.dtype, list(t.shape)] for n, t in self.tensors.items() if t.path == path}).encode()

    def _refuse_quantized(self) -> None:
        qconfig = self.config.get("quantization_config")
        reason = None
        if qconfig:
            method = qconfig.get("quant_method", "unknown") if isinstance(qconfig, dict) else "unknown"
            reason = f"its config.json has quantization_config ({method})"
        else:
            for info in self.tensors.values():
                if info.name.endswith(_QUANT_SUFFIXES) or info.dtype in FP8_CODES:
                    reason = f"it stores quantized tensors such as {info.name} ({info.dtype})"
                    break
        if reason:
            raise CheckpointError(
                f"{self.label} {self.root} is a quantized checkpoint: {reason}. gpumerge blends full-precision "
                "weights only; merge the unquantized models, then quantize the result"
            )

    # ---- facts -------------------------------------------------------------------------------------------
    def num_layers(self) -> int | None:
        for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
            value = self.config.get(key)
            if isinstance(value, int) and value > 0:
                return value
        text = self.config.get("text_config")
        if isinstance(text, dict) and isinstance(text.get("num_hidden_layers"), int):
            return text["num_hidden_layers"]
        return None

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)

    def fingerprint(self) -> str:
        """sha256 of every weight file's name, size and header, and of the first 4 KiB of every tensor: cheap
        (no full read), and it tells apart two fine-tunes with the same layout."""
        digest = hashlib.sha256()
        for path in sorted(self.files):
            digest.update(path.name.encode())
            digest.update(str(path.stat().st_size).encode())
            digest.update(self._headers[path])
        for info in self.tensors.values():
            digest.update(self.read_bytes(info.name, 0, min(4096, info.nbytes)))
        return digest.hexdigest()

    # ---- bytes -------------------------------------------------------------------------------------------
    def fd(self, path: Path) -> int:
        with self._fd_lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            return fd

    def raw_location(self, name: str) -> tuple[int, int] | None:
        """(fd, absolute offset) of a tensor's bytes when they can be copied file-to-file, else None."""
        info = self.tensors[name]
        if info.offset is None:
            return None
        return self.fd(info.path), info.offset

    def read_bytes(self, name: str, start: int, nbytes: int) -> bytes:
        """``nbytes`` of a tensor's bytes from byte ``start`` (small reads; torch only for pickled sources)."""
        info = self.tensors[name]
        if info.offset is None:
            import torch

            dest = torch.empty(nbytes, dtype=torch.uint8)
            self.read_into(name, dest, start=start)
            return dest.numpy().tobytes()
        data = b""
        while len(data) < nbytes:
            chunk = os.pread(self.fd(info.path), nbytes - len(data), info.offset + start + len(data))
            if not chunk:
                raise CheckpointError(f"{self.label} {info.path}: unexpected end of file while reading {name}")
            data += chunk
        return data

    def read_into(self, name: str, dest, *, start: int = 0) -> None:
        """Fill ``dest`` (a contiguous uint8 torch tensor) with the tensor's bytes from byte ``start`` on."""
        info = self.tensors[name]
        nbytes = dest.numel()
        if start < 0 or start + nbytes > info.nbytes:
            raise ValueError(f"read of {nbytes} bytes at {start} is outside {name} ({info.nbytes} bytes)")
        if info.offset is None:
            import torch

            flat = self._bin_state[info.path][name].reshape(-1).view(torch.uint8)
            dest.copy_(flat[start:start + nbytes])
            return
        view = memoryview(dest.numpy()).cast("B")
        fd = self.fd(info.path)
        done = 0
        while done < nbytes:
            got = os.preadv(fd, [view[done:]], info.offset + start + done)
            if got <= 0:
                raise CheckpointError(f"{self.label} {info.path}: unexpected end of file while reading {name}")
            done += got

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._bin_state.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
