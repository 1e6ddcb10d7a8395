"""The output's content: streaming safetensors shards, index, aux files, merge record. Where it is written, and how
it appears at OUT atomically, is gpumerge.outdir's.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

from gpumerge.errors import GpumergeError, OutputError
from gpumerge.plan import MergePlan, ShardPlan, t_range_text

# Model 1's files that are not copied as they are: weights and their indexes (rewritten), config.json (dtype
# updated) and README.md (replaced by the merge's model card).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
_NOT_COPIED = {"config.json", "README.md", "model.safetensors.index.json", "pytorch_model.bin.index.json",
               "gpumerge_recipe.yaml", "gpumerge_digests.json", "checksums.sha256"}  # the last three: a merge's own
RECIPE_FILE = "gpumerge_recipe.yaml"
_MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own bound


def safetensors_header(shard: ShardPlan, metadata: dict[str, str]) -> bytes:
    """The shard's JSON header, padded with spaces to a multiple of 8 bytes, with the 8-byte length prefix."""
    header: dict[str, object] = {"__metadata__": metadata}
    for job in shard.jobs:
        header[job.name] = {"dtype": job.out_dtype, "shape": list(job.shape),
                            "data_offsets": [job.offset, job.offset + job.nbytes]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


class ShardWriter:
    """One output shard: the header is written first (the layout is known), then bytes land at their offsets."""

    def __init__(self, path: Path, shard: ShardPlan, metadata: dict[str, str]) -> None:
        header = safetensors_header(shard, metadata)
        self.path = path
        self.data_start = len(header)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            total = self.data_start + shard.data_bytes
            try:  # reserve the space now: a full disk fails here, not half-way through
                os.posix_fallocate(self.fd, 0, total)
            except OSError as exc:
                if exc.errno not in (95, 22):  # EOPNOTSUPP / EINVAL: filesystems without fallocate
                    raise
                os.ftruncate(self.fd, total)
            self.pwrite(memoryview(header), 0, absolute=True)
        except BaseException:
            os.close(self.fd)
            raise

    def pwrite(self, data: memoryview, offset: int, *, absolute: bool = False) -> None:
        position = offset if absolute else self.data_start + offset
        done, total = 0, len(data)
        while done < total:
            done += os.pwrite(self.fd, data[done:], position + done)

    def copy_from(self, src_fd: int, src_offset: int, nbytes: int, offset: int) -> None:
        """File-to-file copy in the kernel (copy_file_range): no user-space buffer, no RSS."""
        position = self.data_start + offset
        done = 0
        while done < nbytes:
            try:
                got = os.copy_file_range(src_fd, self.fd, nbytes - done, src_offset + done, position + done)
            except OSError:
                got = 0
            if got <= 0:  # not supported here (or across these filesystems): plain reads and writes
                self._copy_slow(src_fd, src_offset + done, nbytes - done, position + done)
                return
            done += got

    def _copy_slow(self, src_fd: int, src_offset: int, nbytes: int, position: int) -> None:
        copy_by_reads(src_fd, src_offset, nbytes, lambda data, start: self.pwrite(data, position + start,
                                                                                  absolute=True))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def copy_by_reads(src_fd: int, src_offset: int, nbytes: int, write) -> None:
    """``nbytes`` from ``src_fd`` in plain reads of 16 MiB, each handed to ``write(data, start)`` (``start`` counted
    from the first byte): where copy_file_range cannot, and for sinks that are not files."""
    step = 16 * 2**20
    for start in range(0, nbytes, step):
        data = os.pread(src_fd, min(step, nbytes - start), src_offset + start)
        if not data:
            raise OutputError("input file ended while copying")
        write(memoryview(data), start)


def open_writers(plan: MergePlan, directory: Path, metadata: dict[str, str]) -> list[ShardWriter]:
    """Every shard of the plan, header written and space reserved, ready for bytes at any offset."""
    writers: list[ShardWriter] = []
    try:
        for shard in plan.shards:
            writers.append(ShardWriter(directory / shard.filename, shard, metadata))
    except BaseException:
        close_writers(writers)
        raise
    return writers


def close_writers(writers: list[ShardWriter]) -> None:
    for writer in writers:
        writer.close()


def finish_model_dir(directory: Path, plan: MergePlan, record: dict, model_dir: Path, config: dict, *,
                     checksums: bool = False) -> list[str]:
    """Everything but the shards: the index, model 1's aux files (config.json with the output dtype), the model card
    and the recipe; then the finished shards' headers are read back and checked against the plan; the digests of
    every file (gpumerge_digests.json); with ``checksums``, checksums.sha256 of every file last. Returns the aux
    files' names."""
    from gpumerge.digests import write_digests

    check_shards(directory, plan)
    write_index(directory, plan)
    aux = copy_aux_files(model_dir, directory, plan.out_dtype_name, config)
    write_model_card(directory, record)
    write_recipe(directory, record)
    write_digests(directory, record, checksums=checksums)
    if checksums:
        from gpumerge.digests import write_checksums

        write_checksums(directory)
    return aux


def check_shards(directory: Path, plan: MergePlan) -> None:
    """Each shard as written, read back from disk (headers only: cheap): every tensor's name, dtype, shape and byte
    range as the plan has them, nothing else in the header, and the file exactly header + data long. A mismatch
    means a bug or a disk that lies; the output is then discarded, never put in place."""
    for shard in plan.shards:
        path = directory / shard.filename
        found = shard_header(path)
        problem = None
        if found is None:
            problem = "its header cannot be read back"
        else:
            length, header = found
            want = {job.name: {"dtype": job.out_dtype, "shape": list(job.shape),
                               "data_offsets": [job.offset, job.offset + job.nbytes]} for job in shard.jobs}
            got = {k: v for k, v in header.items() if k != "__metadata__"}
            if got != want:
                differ = sorted(set(got) ^ set(want)) or sorted(k for k in want if got.get(k) != want[k])
                problem = f"its header differs from the plan ({', '.join(differ[:3])})"
            elif path.stat().st_size != length + shard.data_bytes:
                problem = (f"it is {path.stat().st_size} bytes long, not the header's {length} + the plan's "
                           f"{shard.data_bytes}")
        if problem:
            raise OutputError(f"the output shard {shard.filename}, read back before it is put in place, is wrong: "
                              f"{problem}; nothing was put at the output path")


def shard_header(path: Path) -> tuple[int, dict] | None:
    """(header bytes with the length prefix, header) of a safetensors file, or None when it is not a whole one."""
    from gpumerge import fsutil

    try:
        fd = fsutil.open_regular(path, what=str(path), error=OutputError)
    except GpumergeError:
        return None
    try:
        head = os.pread(fd, 8, 0)
        if len(head) < 8:
            return None
        (length,) = struct.unpack("<Q", head)
        if length > _MAX_HEADER_BYTES:
            return None
        raw = os.pread(fd, length, 8)
        header = fsutil.load_json(raw, what=str(path), error=OutputError) if len(raw) == length else None
    except (GpumergeError, OSError):
        return None
    finally:
        os.close(fd)
    return (8 + length, header) if isinstance(header, dict) else None


def write_index(directory: Path, plan: MergePlan) -> None:
    if len(plan.shards) == 1:
        return
    weight_map = {job.name: shard.filename for shard in plan.shards for job in shard.jobs}
    index = {
        "metadata": {"total_size": plan.bytes_written,
                     "total_parameters": sum(job.numel for job in plan.jobs)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def copy_aux_files(model_dir: Path, directory: Path, out_dtype_name: str, config: dict) -> list[str]:
    """config.json (model 1's ``config`` as read when it was opened, dtype updated) and every other top-level
    regular non-weight file of model 1 (tokenizer files, generation_config.json, chat templates, licences, ...).
    Returns the names copied."""
    config = dict(config)
    config["dtype"] = out_dtype_name
    if "torch_dtype" in config:
        config["torch_dtype"] = out_dtype_name
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    copied = ["config.json"]
    for path in sorted(model_dir.iterdir()):
        name = path.name
        if name.startswith(".") or name in _NOT_COPIED or name.endswith(_WEIGHT_SUFFIXES) or not path.is_file():
            continue
        shutil.copyfile(path, directory / name)
        copied.append(name)
    return copied


# Files that hold a tokenizer's vocabulary (tokenizers' tokenizer.json, sentencepiece's tokenizer.model, GPT-2 BPE's
# vocab.json, WordPiece's vocab.txt, tiktoken's tokenizer.model/.tiktoken): a model directory without any of them
# cannot be used as it is.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "tokenizer.tiktoken")


def missing_tokenizer(model_dir: Path, *, label: str) -> str | None:
    """A notice when model 1 (whose aux files the merge copies) has no tokenizer: the output will have none."""
    try:
        if any((model_dir / name).is_file() for name in TOKENIZER_FILES):
            return None
    except OSError:
        return None
    return (f"{label} {model_dir} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}), so the merge has none "
            "either and cannot be used as it is: copy the base model's tokenizer files into the output")


def aux_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.iterdir()
               if p.is_file() and not p.name.endswith(_WEIGHT_SUFFIXES))


def write_recipe(directory: Path, record: dict) -> None:
    """The full recipe as a file `gpumerge --config` takes: the merge can be re-run from its output."""
    import yaml

    # local inputs by absolute path, so the recipe runs from anywhere; hub ids as they are (a mergekit config is
    # kept as given, under `mergekit:`, and these paths override the ones inside it)
    paths = [entry["resolved"] if Path(entry["path"]).expanduser().exists() else entry["path"]
             for entry in record["inputs"]]
    recipe = {"model_path1": paths[0], "model_path2": paths[1], **record["settings"]}
    header = (f"# Written by gpumerge {record['version']}. Re-run with:\n"
              f"#   gpumerge --config {RECIPE_FILE} --output_model_path NEW_DIR\n"
              f"# inputs' fingerprints: model 1 {record['inputs'][0]['fingerprint'][:16]}, "
              f"model 2 {record['inputs'][1]['fingerprint'][:16]}\n")
    from gpumerge.recipes import recipe_dumper

    # the dumper of the loader that reads it back: a directory or filter named "1e10" stays a string
    (directory / RECIPE_FILE).write_text(header + yaml.dump(recipe, Dumper=recipe_dumper(), sort_keys=False))


def write_model_card(directory: Path, record: dict) -> None:
    inputs = record["inputs"]
    rows = "\n".join(
        f"| {'-' if layer is None else layer} | {group} | "
        f"{t_range_text(t_min, t_max)} |"
        for layer, group, t_min, t_max in record["t_groups"])
    card = f"""---
tags:
- merge
- gpumerge
base_model:
- {inputs[0]['path']}
- {inputs[1]['path']}
---
# Merged model

Made with gpumerge {record['version']}: a blend of two checkpoints, `model1 + t * (model2 - model1)` for the
tensors below (method {record['method']}; t is model 2's share); every other tensor is model 1's.
Output dtype: {record['output_dtype']}.

| input | path | fingerprint (sha256 of headers, sizes and each tensor's first 4 KiB) |
|---|---|---|
| model 1 | `{inputs[0]['path']}` | `{inputs[0]['fingerprint'][:16]}` |
| model 2 | `{inputs[1]['path']}` | `{inputs[1]['fingerprint'][:16]}` |

| layer | tensors | model 2's share (t) |
|---|---|---|
{rows}

To re-run (the recipe is in `gpumerge_recipe.yaml` next to this file):

```bash
{record['command']}
```

The full record is below and in every shard's safetensors metadata (key `gpumerge`).

<!-- gpumerge-record
{json.dumps(record, indent=2)}
-->
"""
    (directory / "README.md").write_text(card)
