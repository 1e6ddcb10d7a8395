"""Reading a checkpoint's *index*: config, tensor names, dtypes, shapes and byte locations; and tensor bytes.

A safetensors file's header is parsed by gpumerge.headers (by hand, and why); here are the model directory, its
index files, its config and pickled ``.bin`` files, and the reads of tensor bytes at the offsets the headers give.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from pathlib import Path
from typing import Any

from gpumerge.errors import CheckpointError
from gpumerge.fsutil import load_json, open_regular, read_regular
# the dtype tables and TensorInfo are the headers' (named here too: most callers know them from here)
from gpumerge.headers import (DTYPE_NAMES, FLOAT_CODES, FP8_CODES, ITEMSIZE, TensorInfo, brief_json,  # noqa: F401
                              json_type, pread_exact, read_safetensors_header, show)
from gpumerge.schedule import layer_index

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

# Tensor-name endings that only quantized checkpoints have (GPTQ/AWQ, bitsandbytes 8-bit and 4-bit).
_QUANT_SUFFIXES = (".qweight", ".qzeros", ".g_idx", ".SCB", ".weight_format", ".absmax", ".quant_map",
                   ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4", ".nested_absmax")
# Keys a config.json declares its number of decoder blocks with, in the order they are believed.
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _is_plain_file_name(name: str) -> bool:
    """A file directly inside the model directory: no separator, not '.' or '..', no NUL byte."""
    return name not in ("", ".", "..") and "/" not in name and "\0" not in name


def _blocks_text(blocks: list[int]) -> str:
    """Sorted block numbers as '0..5 (6 blocks)' or '0, 1, 3, 7..9 (6 blocks)'."""
    runs: list[list[int]] = []
    for block in blocks:
        if runs and block == runs[-1][1] + 1:
            runs[-1][1] = block
        else:
            runs.append([block, block])
    shown = [f"{a}..{b}" if b - a >= 2 or len(runs) == 1 and b > a else ", ".join(map(str, range(a, b + 1)))
             for a, b in runs[:8]]
    return ", ".join(shown) + (", ..." if len(runs) > 8 else "") + f" ({len(blocks)} blocks)"


def _unusual_tensor_problem(tensor) -> str | None:
    """What makes a tensor from a .bin file something other than a dense CPU tensor, or None."""
    import torch

    if tensor.is_nested:
        return "a nested tensor"
    if tensor.layout != torch.strided:
        return f"a {str(tensor.layout).removeprefix('torch.')} tensor"
    if tensor.is_quantized:
        return f"a quantized tensor ({tensor.dtype})"
    if tensor.device.type != "cpu":
        return f"a tensor on the {tensor.device.type} device"
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        return f"a {type(tensor).__name__} (a tensor subclass)"
    return None


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
        self.tensors: dict[str, TensorInfo] = {}
        self.files: list[Path] = []
        self.index_path: Path | None = None
        self._headers: dict[Path, bytes] = {}
        self._bin_state: dict[Path, dict] = {}
        self._fds: dict[Path, int] = {}
        self._fd_lock = threading.Lock()  # readers of several devices and the copier share the descriptors
        self._fingerprint: str | None = None
        try:
            self.config = self._read_config()
            self._declared_layers = self._layer_count()
            self._index()
            self._refuse_quantized()
            self._check_stored_blocks()
        except BaseException:
            self.close()
            raise

    # ---- config ------------------------------------------------------------------------------------------
    def _read_json(self, path: Path) -> Any:
        """A small JSON file: a regular file (never a FIFO or a device), bounded in size, strict JSON."""
        what = f"{self.label} {path}"
        return load_json(read_regular(path, what=what, error=CheckpointError), what=what, error=CheckpointError)

    def _read_config(self) -> dict[str, Any]:
        path = self.root / "config.json"
        if not os.path.lexists(path):
            raise CheckpointError(f"{self.label} {self.root}: no config.json (is this a Hugging Face model directory?)")
        config = self._read_json(path)
        if not isinstance(config, dict):
            raise CheckpointError(f"{self.label} {path}: config.json is {json_type(config)}, not a JSON object")
        return config

    def _layer_count(self) -> tuple[str, int] | None:
        """(key, count): the config's number of decoder blocks, from the first of its layer keys that is set (a
        JSON null is unset); None when none is. A count that is not a positive integer is an error."""
        candidates = [(key, self.config.get(key)) for key in _LAYER_KEYS]
        text = self.config.get("text_config")
        if isinstance(text, dict):
            candidates.append(("text_config.num_hidden_layers", text.get("num_hidden_layers")))
        for key, value in candidates:
            if value is None:
                continue
            if type(value) is not int or value <= 0:
                raise CheckpointError(f"{self.label} {self.root / 'config.json'}: {key} = {brief_json(value)} is not a "
                                      "positive integer (the number of decoder blocks)")
            return key, value
        return None

    # ---- index -------------------------------------------------------------------------------------------
    def _index(self) -> None:
        root = self.root
        if os.path.lexists(root / SAFE_INDEX):
            self.format = "safetensors"
            self._index_sharded(root / SAFE_INDEX, self._index_safetensors)
        elif os.path.lexists(root / SAFE_SINGLE):
            self.format = "safetensors"
            self._index_safetensors(root / SAFE_SINGLE)
        elif os.path.lexists(root / BIN_INDEX):
            self.format = "bin"
            self._index_sharded(root / BIN_INDEX, self._index_bin)
        elif os.path.lexists(root / BIN_SINGLE):
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
        self.index_path = index_path
        weight_map = self._read_weight_map(index_path)
        shard_names = sorted(set(weight_map.values()))
        missing = [name for name in shard_names if not (self.root / name).exists()]
        if missing:
            raise CheckpointError(
                f"{self.label} {index_path.name} names {len(missing)} shard(s) that are not in {self.root}: "
                + ", ".join(map(show, missing[:5]))
            )
        for shard in shard_names:
            index_file(self.root / shard)
        absent = [name for name, shard in weight_map.items()
                  if name not in self.tensors or self.tensors[name].path.name != shard]
        if absent:
            raise CheckpointError(
                f"{self.label} {index_path.name} lists {len(absent)} tensor(s) that are not in the shard it names: "
                + ", ".join(map(show, absent[:5]))
            )

    def _read_weight_map(self, index_path: Path) -> dict[str, str]:
        """The index's weight_map: tensor name -> shard, a plain file name inside the model directory."""
        index = self._read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        where = f"{self.label} {index_path}: not a valid index"
        if not isinstance(weight_map, dict):
            found = json_type(weight_map) if isinstance(index, dict) and "weight_map" in index else "none"
            raise CheckpointError(f"{where} (expected an object with a weight_map object, found {found})")
        for name, shard in weight_map.items():
            if not isinstance(shard, str):
                raise CheckpointError(f"{where}: weight_map must map tensor names to shard file names, "
                                      f"{show(repr(name))} maps to {brief_json(shard)}")
            if not _is_plain_file_name(shard):
                raise CheckpointError(f"{where}: weight_map entry {show(repr(name))} names the shard "
                                      f"{show(repr(shard))}; a shard must be a plain file name inside {self.root}")
        return weight_map

    def _open_regular(self, path: Path) -> int:
        """A read-only descriptor of a weight file; a FIFO or a device is refused, never waited on or read."""
        return open_regular(path, what=f"{self.label} {path}", error=CheckpointError, expected="a weight file must be a regular file")

    def _index_safetensors(self, path: Path) -> None:
        fd = self._fds[path] = self._open_regular(path)
        raw, infos = read_safetensors_header(fd, path, label=self.label)
        for info in sorted(infos, key=lambda t: t.offset):  # on-disk order
            if info.name in self.tensors:
                raise CheckpointError(f"{self.label}: tensor {show(info.name)} is stored twice "
                                      f"({show(self.tensors[info.name].path.name)}, {show(path.name)})")
            self.tensors[info.name] = info
        self.files.append(path)
        self._headers[path] = raw

    def _index_bin(self, path: Path) -> None:
        import torch  # pickled checkpoints need torch to be read at all

        os.close(self._open_regular(path))  # a FIFO or a device is refused before torch opens it by name
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

        file_bytes = path.stat().st_size
        copied_bytes = 0  # what making views contiguous allocates, bounded by the file's size
        for name, tensor in state.items():
            where = f"{self.label} {path}: tensor {show(name)}"
            if not isinstance(name, str):
                raise CheckpointError(f"{self.label} {path}: entry {show(name)} has a name that is not a string")
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(f"{self.label} {path}: entry {show(name)} is not a tensor")
            problem = _unusual_tensor_problem(tensor)
            if problem:
                raise CheckpointError(f"{where} is {problem}; gpumerge reads dense CPU tensors only")
            code = code_of(tensor.dtype)
            if code is None:
                raise CheckpointError(f"{where} has unsupported dtype {tensor.dtype}")
            if not tensor.is_contiguous():
                copied_bytes += tensor.numel() * tensor.element_size()
                if copied_bytes > file_bytes:
                    raise CheckpointError(
                        f"{where} is a view whose elements overlap or repeat in storage: made contiguous, this "
                        f"file's views would take {copied_bytes} bytes, more than the file's {file_bytes}")
            if name in self.tensors:
                raise CheckpointError(f"{self.label}: tensor {show(name)} is stored twice "
                                      f"({show(self.tensors[name].path.name)}, {show(path.name)})")
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
            reason = f"its config.json has quantization_config ({show(str(method))})"
        else:
            for info in self.tensors.values():
                if info.name.endswith(_QUANT_SUFFIXES) or info.dtype in FP8_CODES:
                    reason = f"it stores quantized tensors such as {show(info.name)} ({info.dtype})"
                    break
        if reason:
            raise CheckpointError(
                f"{self.label} {self.root} is a quantized checkpoint: {reason}. gpumerge blends full-precision "
                "weights only; merge the unquantized models, then quantize the result"
            )

    def _check_stored_blocks(self) -> None:
        """When numbered decoder blocks are stored, they are exactly 0..L-1 for the config's L (plus the
        multi-token-prediction blocks a config declares with num_nextn_predict_layers)."""
        if self._declared_layers is None:
            return
        key, count = self._declared_layers
        blocks = sorted({block for block in map(layer_index, self.tensors) if block is not None})
        if not blocks:
            return
        extra = self.config.get("num_nextn_predict_layers")
        allowed = {count, count + extra} if type(extra) is int and extra > 0 else {count}
        if blocks[0] == 0 and blocks[-1] == len(blocks) - 1 and len(blocks) in allowed:
            return
        raise CheckpointError(f"{self.label} {self.root}: config.json says {key} = {count}, the weights store "
                              f"decoder blocks {_blocks_text(blocks)}")

    def input_files(self) -> list[Path]:
        """Every file this checkpoint reads: config.json, the index if any, every weight file, named under ``root``
        as they are there (symlinks, such as a hub cache's, are not followed)."""
        return [self.root / "config.json", *([self.index_path] if self.index_path else []), *self.files]

    # ---- facts -------------------------------------------------------------------------------------------
    def num_layers(self) -> int | None:
        """The config's number of decoder blocks (checked against the stored blocks), or None when it has none."""
        return self._declared_layers[1] if self._declared_layers else None

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)

    def fingerprint(self) -> str:
        """sha256 of every weight file's name, size and header, and of the first 4 KiB of every tensor: cheap
        (no full read), and it tells apart two fine-tunes with the same layout. Computed once per opened checkpoint."""
        if self._fingerprint is not None:
            return self._fingerprint
        digest = hashlib.sha256()
        for path in sorted(self.files):
            digest.update(path.name.encode())
            digest.update(str(path.stat().st_size).encode())
            digest.update(self._headers[path])
        for info in self.tensors.values():
            digest.update(self.read_bytes(info.name, 0, min(4096, info.nbytes)))
        self._fingerprint = digest.hexdigest()
        return self._fingerprint

    # ---- bytes -------------------------------------------------------------------------------------------
    def fd(self, path: Path) -> int:
        with self._fd_lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = self._open_regular(path)
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
        return pread_exact(self.fd(info.path), info.path, nbytes, info.offset + start, what=show(name), label=self.label)

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
                raise CheckpointError(f"{self.label} {info.path}: unexpected end of file while reading {show(name)}")
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
