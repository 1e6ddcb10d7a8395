"""One merge from spec to finished directory: open -> plan -> check output -> preflight -> stream -> finalize."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Callable

from gpumerge.checkpoint import Checkpoint
from gpumerge.plan import MergePlan, make_plan
from gpumerge.spec import MergeSpec


def version() -> str:
    try:
        return importlib_metadata.version("gpumerge")
    except importlib_metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True, slots=True)
class MergeResult:
    output: Path
    plan: MergePlan
    record: dict
    aux_files: tuple[str, ...]
    elapsed_s: float
    bytes_read: int
    bytes_written: int


def open_pair(spec: MergeSpec) -> tuple[Checkpoint, Checkpoint]:
    a = Checkpoint(spec.model_path1, label="model 1 (--model_path1)")
    try:
        b = Checkpoint(spec.model_path2, label="model 2 (--model_path2)")
    except BaseException:
        a.close()
        raise
    return a, b


def merge_record(spec: MergeSpec, plan: MergePlan, a: Checkpoint, b: Checkpoint) -> dict:
    command = ["gpumerge", "--model_path1", spec.model_path1, "--model_path2", spec.model_path2,
               "--output_model_path", str(spec.output_model_path),
               "--gradient_start", repr(spec.gradient_start), "--gradient_end", repr(spec.gradient_end),
               "--layer_start", str(spec.layer_start), "--layer_end", str(spec.layer_end),
               "--max_shard_size", spec.max_shard_size, "--dtype", spec.dtype]
    return {
        "tool": "gpumerge",
        "version": version(),
        "inputs": [
            {"role": "model_path1", "path": spec.model_path1, "resolved": str(a.root), "format": a.format,
             "bytes": a.total_bytes(), "fingerprint": a.fingerprint()},
            {"role": "model_path2", "path": spec.model_path2, "resolved": str(b.root), "format": b.format,
             "bytes": b.total_bytes(), "fingerprint": b.fingerprint()},
        ],
        "settings": spec.settings(),
        "num_layers": plan.num_layers,
        "output_dtype": plan.out_dtype_name,
        "layer_t": {str(layer): t for layer, t in plan.layer_t.items()},
        "command": shlex.join(command),
    }


def run_merge(spec: MergeSpec, *, notice: Callable[[str], None] = print,
              progress_factory=None, chunk_elements: int | None = None) -> MergeResult:
    """Everything is checked before the first output byte; the output appears at OUT only when complete."""
    from gpumerge import writer
    from gpumerge.devices import resolve_device

    device, device_notice = resolve_device(spec.device)
    a, b = open_pair(spec)
    with a, b:
        plan = make_plan(a, b, spec)
        for line in plan.notices:
            notice(line)
        out = writer.check_output_path(spec.output_model_path, inputs=[a.root, b.root], overwrite=spec.overwrite)
        output = writer.OutputDir(out)
        output.check_space(plan.bytes_written + writer.aux_bytes(a.root) + 2**20 * len(plan.shards))

        from gpumerge.pipeline import DEFAULT_CHUNK_ELEMENTS, CpuEngine

        progress = progress_factory(plan.bytes_written) if progress_factory else None
        engine = CpuEngine(a, b, chunk_elements=chunk_elements or DEFAULT_CHUNK_ELEMENTS,
                           progress=progress.update if progress else None)
        engine.preflight(plan)
        if device_notice:
            notice(device_notice)
        record = merge_record(spec, plan, a, b)
        metadata = {"format": "pt", "gpumerge": json.dumps(record, separators=(",", ":"))}
        try:
            with output:
                stats = engine.run(plan, output.tmp, metadata)
                writer.write_index(output.tmp, plan)
                aux = writer.copy_aux_files(a.root, output.tmp, plan.out_dtype_name)
                writer.write_model_card(output.tmp, record)
                output.finalize()
        finally:
            if progress:
                progress.close()
    return MergeResult(out, plan, record, tuple(aux), stats.elapsed_s, stats.bytes_read, stats.bytes_written)
