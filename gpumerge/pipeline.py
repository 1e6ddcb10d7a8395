"""The CPU engine: read -> blend -> write, tensor by tensor, in bounded chunks through reused buffers.

Memory does not grow with model size: a tensor larger than a chunk is processed in flat element ranges (lerp and
casts are elementwise), tensors copied unchanged go file-to-file in the kernel (copy_file_range), and nothing is
mmapped, so peak RSS is the chunk buffers plus torch itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from gpumerge.checkpoint import ITEMSIZE, Checkpoint
from gpumerge.errors import IncompatibleCheckpointsError, OutputError
from gpumerge.kernels.dtypes import torch_dtype
from gpumerge.kernels.lerp import lerp_into, new_infs
from gpumerge.plan import MergePlan, TensorJob
from gpumerge.writer import ShardWriter

DEFAULT_CHUNK_ELEMENTS = 4 * 2**20


@dataclass(slots=True)
class EngineStats:
    bytes_read: int = 0
    bytes_written: int = 0
    bytes_copied_in_kernel: int = 0
    tensors_blended: int = 0
    tensors_copied: int = 0
    elapsed_s: float = 0.0
    stage_s: dict[str, float] = field(default_factory=lambda: {"read": 0.0, "blend": 0.0, "write": 0.0})


class _Buffers:
    """Reused chunk buffers: raw bytes for a, b and out, and fp32 scratch for mixed-dtype blends."""

    def __init__(self, chunk_elements: int) -> None:
        self.chunk_elements = chunk_elements
        self.a = torch.empty(chunk_elements * 8, dtype=torch.uint8)
        self.b = torch.empty(chunk_elements * 8, dtype=torch.uint8)
        self.out = torch.empty(chunk_elements * 8, dtype=torch.uint8)
        self._scratch: tuple[torch.Tensor, ...] | None = None

    def scratch(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._scratch is None:
            self._scratch = tuple(torch.empty(self.chunk_elements, dtype=torch.float32) for _ in range(3))
        return tuple(s[:n] for s in self._scratch)


class CpuEngine:
    def __init__(self, a: Checkpoint, b: Checkpoint, *, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
                 progress: Callable[[int], None] | None = None) -> None:
        self.a = a
        self.b = b
        self.buffers = _Buffers(chunk_elements)
        self.progress = progress or (lambda n: None)
        self.stats = EngineStats()

    def preflight(self, plan: MergePlan) -> None:
        """Checks that need tensor bytes, before the first output byte: non-float tensors in the window."""
        differ = []
        for job in plan.jobs:
            if job.verify_equal:
                nbytes = job.numel * ITEMSIZE[job.dtype_a]
                a = torch.empty(nbytes, dtype=torch.uint8)
                b = torch.empty(nbytes, dtype=torch.uint8)
                self.a.read_into(job.name, a)
                self.b.read_into(job.name, b)
                if not torch.equal(a, b):
                    differ.append(job.name)
        if differ:
            raise IncompatibleCheckpointsError(
                f"{len(differ)} non-float tensor(s) in the layer window differ between the models and cannot be "
                "blended: " + ", ".join(differ[:8])
            )

    def run(self, plan: MergePlan, directory: Path, metadata: dict[str, str]) -> EngineStats:
        started = time.perf_counter()
        for shard in plan.shards:
            writer = ShardWriter(directory / shard.filename, shard, metadata)
            try:
                for job in shard.jobs:
                    self._job(job, writer)
            finally:
                writer.close()
        self.stats.elapsed_s = time.perf_counter() - started
        return self.stats

    def _job(self, job: TensorJob, writer: ShardWriter) -> None:
        info_a = self.a.tensors[job.name]
        if not job.blended and job.out_dtype == job.dtype_a:
            location = self.a.raw_location(job.name)
            if location is not None:
                began = time.perf_counter()
                writer.copy_from(location[0], location[1], job.nbytes, job.offset)
                self.stats.stage_s["write"] += time.perf_counter() - began
                self.stats.bytes_copied_in_kernel += job.nbytes
                self._count(job, read=job.nbytes)
                return
        size_a = ITEMSIZE[info_a.dtype]
        size_b = ITEMSIZE[job.dtype_b] if job.blended else 0
        size_out = ITEMSIZE[job.out_dtype]
        step = self.buffers.chunk_elements
        for first in range(0, job.numel, step):
            n = min(step, job.numel - first)
            self._chunk(job, first, n, size_a, size_b, size_out)
            began = time.perf_counter()
            writer.pwrite(memoryview(self.buffers.out[:n * size_out].numpy()), job.offset + first * size_out)
            self.stats.stage_s["write"] += time.perf_counter() - began
        self._count(job, read=job.numel * (size_a + size_b))

    def _chunk(self, job: TensorJob, first: int, n: int, size_a: int, size_b: int, size_out: int) -> None:
        bufs = self.buffers
        began = time.perf_counter()
        a_raw = bufs.a[:n * size_a]
        self.a.read_into(job.name, a_raw, start=first * size_a)
        if job.blended:
            b_raw = bufs.b[:n * size_b]
            self.b.read_into(job.name, b_raw, start=first * size_b)
        mid = time.perf_counter()
        self.stats.stage_s["read"] += mid - began
        a = a_raw.view(torch_dtype(job.dtype_a))
        out = bufs.out[:n * size_out].view(torch_dtype(job.out_dtype))
        if job.blended:
            b = b_raw.view(torch_dtype(job.dtype_b))
            same = a.dtype == b.dtype == out.dtype
            lerp_into(a, b, job.t, out, None if same else bufs.scratch(n))
            inputs = (a, b)
        else:
            out.copy_(a)
            inputs = (a,)
        if job.check_overflow:
            bad = new_infs(out, *inputs)
            if bad:
                raise OutputError(
                    f"{bad} value(s) of {job.name} overflow {_dtype_name(job.out_dtype)} (inf from finite inputs); "
                    "use --dtype bfloat16 (or float32), which has the range of the inputs"
                )
        self.stats.stage_s["blend"] += time.perf_counter() - mid

    def _count(self, job: TensorJob, *, read: int) -> None:
        self.stats.bytes_read += read
        self.stats.bytes_written += job.nbytes
        if job.blended:
            self.stats.tensors_blended += 1
        else:
            self.stats.tensors_copied += 1
        self.progress(job.nbytes)


def _dtype_name(code: str) -> str:
    return {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}.get(code, code)
