"""Engines: bytes from the inputs, through the blend, to the output shards.

``PipelinedEngine`` (the one the CLI uses) runs the stages as threads joined by bounded rings of buffers:

    reader (one per device) -> [H2D -> blend -> D2H] (one per device) -> writer
    copier (gpumerge.copier): tensors kept as they are go file to file (copy_file_range) beside the rest

A device owns ``ring_depth`` slots (a host buffer, pinned for CUDA, plus a device buffer for CUDA); a slot goes back
to its ring only after the writer has written it, so memory is bounded and a slow writer holds the readers back.
The first error in any stage cancels every stage and is re-raised in the caller, which removes the partial output.

``SequentialEngine`` is the plain reference: one tensor at a time, one chunk at a time, no threads. Both compute
torch's fp32 lerp elementwise, so they produce the same bytes whatever the batching, device or thread count.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from gpumerge.checkpoint import DTYPE_NAMES, ITEMSIZE, Checkpoint
from gpumerge.copier import Copier, copy_unchanged
from gpumerge.errors import OutputError
from gpumerge.kernels.dtypes import torch_dtype
from gpumerge.lanes import DeviceLane, Slot, pinned_bytes, ring_shape
from gpumerge.lanes import host_block as _host_block  # noqa: F401 - the name the tests know it by
from gpumerge.kernels.lerp import blend_into, finite, lerp_into, new_infs
from gpumerge.signals import GUARD, test_pause
from gpumerge.plan import (Batch, MergePlan, Piece, TensorJob, footprint_per_element, lay_out, needs_device,
                           needs_scratch, pieces_of, ring_depth_of)
from gpumerge.writer import ShardWriter

DEFAULT_CHUNK_ELEMENTS = 4 * 2**20
STAGES = ("read", "h2d", "blend", "d2h", "write", "copy")
_POLL_S = 0.1
_READY_POLL_S = 0.0005  # the writer's look at the devices' events while batches are in flight


@dataclass(slots=True)
class StageStats:
    busy_s: float = 0.0
    bytes: int = 0

    def add(self, seconds: float, nbytes: int) -> None:
        self.busy_s += seconds
        self.bytes += nbytes

    def as_dict(self) -> dict:
        return {"busy_s": round(self.busy_s, 6), "bytes": self.bytes,
                "gbps": round(self.bytes / self.busy_s / 1e9, 3) if self.busy_s > 0 else None}


@dataclass(slots=True)
class EngineStats:
    bytes_read: int = 0
    bytes_written: int = 0
    tensors_blended: int = 0
    tensors_copied: int = 0
    elapsed_s: float = 0.0
    stages: dict[str, StageStats] = field(default_factory=lambda: {s: StageStats() for s in STAGES})
    peak_pinned_bytes: int = 0
    pinned_allocator_bytes: int | None = None  # torch's own figure for the whole process, where it reports one
    peak_host_buffer_bytes: int = 0
    peak_device_bytes: int = 0
    rings: dict[str, dict[str, int]] = field(default_factory=dict)  # per device: slot_bytes, slots
    batches: int = 0
    devices: list[str] = field(default_factory=list)

    def count(self, job: TensorJob) -> None:
        self.bytes_written += job.nbytes
        self.bytes_read += job.input_bytes
        if job.blended:
            self.tensors_blended += 1
        else:
            self.tensors_copied += 1


# ---- shared by both engines -------------------------------------------------------------------------------------

def write_piece(piece: Piece, buffer: torch.Tensor, writers: Sequence[ShardWriter], *,
                allow_nonfinite: bool = False) -> int:
    """Check a piece's output (see check_piece), then write its out region (a host buffer) at its shard offset, into
    each of ``writers`` (one for a merge; every variant that takes these bytes in a sweep). Returns bytes written."""
    job = piece.job
    check_piece(piece, buffer, allow_nonfinite=allow_nonfinite)
    nbytes = piece.count * ITEMSIZE[job.out_dtype]
    out = memoryview(buffer[piece.out_offset:piece.out_offset + nbytes].numpy())
    for writer in writers:
        writer.pwrite(out, job.offset + piece.start * ITEMSIZE[job.out_dtype])
    return nbytes * len(writers)


def check_piece(piece: Piece, buffer: torch.Tensor, *, allow_nonfinite: bool = False) -> None:
    """A blended piece whose inputs hold NaN or inf is an error naming the tensor and the model (unless
    ``allow_nonfinite``); an inf from finite inputs is an overflow error. One pass over the output region finds
    both: with finite coefficients a non-finite input always gives a non-finite output (inf*0 is NaN), so the inputs
    are looked at only when the output is not all finite. A t = 0 piece copies model 1, so model 2 is checked too."""
    job = piece.job
    if not (piece.blended or job.check_overflow):
        return
    views = piece_views(piece, buffer)
    copies_a = piece.blended and copies_model_1(job)
    if finite(views[0]) and not (copies_a and not allow_nonfinite and not finite(views[2])):
        return
    if piece.blended and not allow_nonfinite:
        for label, values in (("model 1", views[1]), ("model 2", views[2])):
            count = int((~torch.isfinite(values)).sum())
            if count:
                raise OutputError(
                    f"{job.name}: {label} holds {count} NaN or infinite value(s) in this tensor (elements "
                    f"{piece.start}..{piece.start + piece.count - 1} checked so far), which the merge blends; fix that "
                    "model, or pass --allow-nonfinite to blend them anyway in IEEE arithmetic")
    bad = new_infs(*views)
    if bad:
        raise OutputError(overflow_message(job, bad))


def overflow_message(job: TensorJob, bad: int) -> str:
    """Why a blend overflowed, and the remedy that is true for this job."""
    dtype = DTYPE_NAMES[job.out_dtype]
    head = f"{bad} value(s) of {job.name} overflow {dtype} (inf from finite inputs)"
    if job.method == "linear" and job.coef is not None:
        return head + f": the weights {job.coef[0]:g}, {job.coef[1]:g} scale the inputs beyond {dtype}'s range"
    if job.t is not None and not 0.0 <= job.t <= 1.0:
        return (head + f": t = {job.t:g} extrapolates beyond the two models (A + t*(B - A)); use a t between 0 and 1 "
                "or nearer to it")
    if job.out_dtype == "F16":
        return head + "; use --dtype bfloat16 or float32, which reach as far as the inputs"
    return head + f"; the inputs hold values near the edge of {dtype}'s range"


def copies_model_1(job: TensorJob) -> bool:
    """t = 0 with no other arithmetic: the output is model 1's value exactly (also -0.0, NaN, inf)."""
    return (job.t == 0.0 and job.coef is None and job.method != "linear" and job.load_dtype is None
            and job.round_via is None)


def _region(buffer: torch.Tensor, offset: int, count: int, code: str) -> torch.Tensor:
    return buffer[offset:offset + count * ITEMSIZE[code]].view(torch_dtype(code))


def blend_piece(piece: Piece, buffer: torch.Tensor) -> None:
    """Blend (or cast) one piece inside a batch buffer (host or device), out region from a/b regions."""
    job, n = piece.job, piece.count
    a = _region(buffer, piece.a_offset, n, job.dtype_a)
    out = _region(buffer, piece.out_offset, n, job.out_dtype)
    b = _region(buffer, piece.b_offset, n, job.dtype_b) if piece.blended else None
    wide = _region(buffer, piece.scratch_offset, 3 * n, "F32") if piece.scratch else None
    blend_values(job, a, out, b, wide)


def blend_values(job: TensorJob, a: torch.Tensor, out: torch.Tensor, b: torch.Tensor | None = None,
                 wide: torch.Tensor | None = None) -> None:
    """The merge's one blend of flat ``a`` and ``b`` (elements inside the job's blended ones) into ``out``, or model
    1's value cast to the output dtype when ``b`` is None (elements outside them, or a job that blends nothing).
    ``wide``: 3 x n fp32 scratch, needed when needs_scratch(job). Every engine, and the resident model of an
    evaluated sweep, blends through here: the same bytes everywhere by construction."""
    if b is None or copies_model_1(job):
        out.copy_(a)
        return
    if not needs_scratch(job):
        lerp_into(a, b, job.t, out)  # one fused torch.lerp (or its exact equal where the CPU's is not fused)
        return
    n = out.numel()
    if wide is None:
        wide = torch.empty(3 * n, dtype=torch.float32, device=out.device)
    blend_into(a, b, out, t=job.t, coef=job.coef,
               load_dtype=torch_dtype(job.load_dtype) if job.load_dtype else None,
               round_via=torch_dtype(job.round_via) if job.round_via else None,
               scratch=(wide[:n], wide[n:2 * n], wide[2 * n:]))


def piece_views(piece: Piece, buffer: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(out, a[, b]) views of a piece in a host buffer, for the overflow check."""
    job, n = piece.job, piece.count
    out = _region(buffer, piece.out_offset, n, job.out_dtype)
    a = _region(buffer, piece.a_offset, n, job.dtype_a)
    if not piece.blended:
        return out, a
    return out, a, _region(buffer, piece.b_offset, n, job.dtype_b)


def slerp_prepass(plan: MergePlan, a: Checkpoint, b: Checkpoint, *,
                  chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> MergePlan:
    """Read each slerp tensor pair once to get its angle (float64 sums in fixed chunks), and turn the job into
    ``s0*A + s1*B`` (or leave it a lerp when the tensors are nearly colinear)."""
    return slerp_prepass_many([plan], a, b, chunk_elements=chunk_elements)[0]


def slerp_prepass_many(plans: list[MergePlan], a: Checkpoint, b: Checkpoint, *,
                       chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> list[MergePlan]:
    """slerp_prepass for a sweep's plans: each tensor pair's sums are read and computed once (per input rounding),
    whatever the number of variants that slerp it; each variant's coefficients follow from its own t."""
    sums: dict = {}
    return [plan.with_jobs(with_slerp_coefficients(plan.jobs, a, b, sums=sums, chunk_elements=chunk_elements))
            for plan in plans]


def with_slerp_coefficients(jobs, a: Checkpoint, b: Checkpoint, *, sums: dict | None = None,
                            chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> dict[str, TensorJob]:
    """The slerp jobs among ``jobs`` with their coefficients, by name. ``sums`` keeps each tensor pair's sums (per
    input rounding) across calls, so that they are read and computed once."""
    from dataclasses import replace

    from gpumerge.kernels.slerp import coefficients

    sums = {} if sums is None else sums
    updated: dict[str, TensorJob] = {}
    for job in jobs:
        if job.blended and job.method == "slerp":
            key = (job.name, job.load_dtype)
            if key not in sums:
                sums[key] = _slerp_sums(job, a, b, chunk_elements)
            found = sums[key]
            updated[job.name] = replace(job, coef=coefficients(found.aa, found.bb, found.ab, job.t))
    return updated


def _slerp_sums(job: TensorJob, a: Checkpoint, b: Checkpoint, chunk_elements: int):
    """The float64 sums a slerp's angle needs, over the pair's blended elements (fixed chunks: deterministic)."""
    from gpumerge.kernels.slerp import Reductions

    sums = Reductions()
    bytes_a = torch.empty(chunk_elements * ITEMSIZE[job.dtype_a], dtype=torch.uint8)
    bytes_b = torch.empty(chunk_elements * ITEMSIZE[job.dtype_b], dtype=torch.uint8)
    for first in range(0, job.blend_numel, chunk_elements):
        GUARD.poll()
        n = min(chunk_elements, job.blend_numel - first)
        chunk_a = bytes_a[:n * ITEMSIZE[job.dtype_a]]
        chunk_b = bytes_b[:n * ITEMSIZE[job.dtype_b]]
        a.read_into(job.name, chunk_a, start=first * ITEMSIZE[job.dtype_a])
        b.read_into(job.name, chunk_b, start=first * ITEMSIZE[job.dtype_b])
        va, vb = chunk_a.view(torch_dtype(job.dtype_a)), chunk_b.view(torch_dtype(job.dtype_b))
        if job.load_dtype is not None:  # mergekit blends the inputs as cast to its dtype
            va, vb = va.to(torch_dtype(job.load_dtype)), vb.to(torch_dtype(job.load_dtype))
        sums.add(va, vb)
    return sums


# ---- the reference: sequential -------------------------------------------------------------------------------------

class SequentialEngine:
    """One tensor at a time, in bounded chunks through reused buffers; no threads. The bitwise reference."""

    def __init__(self, a: Checkpoint, b: Checkpoint, *, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
                 progress: Callable[[int], None] | None = None) -> None:
        self.a, self.b = a, b
        self.chunk_elements = chunk_elements
        self.progress = progress or (lambda n: None)
        self.stats = EngineStats(devices=["cpu"])

    def run(self, plan: MergePlan, writers: list[ShardWriter]) -> EngineStats:
        started = time.perf_counter()
        scratch = torch.empty(16 * 2**20, dtype=torch.uint8)
        for job in plan.jobs:
            GUARD.poll()
            writer = writers[job.shard]
            if not needs_device(job):
                copy_unchanged(job, self.a, writer)
            else:
                chunk_bytes = self.chunk_elements * footprint_per_element(job) + 4 * 64
                for piece in pieces_of(job, chunk_bytes):
                    GUARD.poll()
                    piece = lay_out(0, "cpu", [piece]).pieces[0]
                    if piece.footprint() > scratch.numel():
                        scratch = torch.empty(piece.footprint(), dtype=torch.uint8)
                    self._piece(piece, scratch, writer, allow_nonfinite=plan.spec.allow_nonfinite)
            self.stats.count(job)
            self.progress(job.nbytes)
        self.stats.peak_host_buffer_bytes = scratch.numel()
        self.stats.elapsed_s = time.perf_counter() - started
        return self.stats

    def _piece(self, piece: Piece, buffer: torch.Tensor, writer: ShardWriter, *, allow_nonfinite: bool) -> None:
        _read_piece(piece, buffer, self.a, self.b)
        blend_piece(piece, buffer)
        write_piece(piece, buffer, (writer,), allow_nonfinite=allow_nonfinite)


def _read_piece(piece: Piece, buffer: torch.Tensor, a: Checkpoint, b: Checkpoint) -> int:
    job, n = piece.job, piece.count
    size_a = ITEMSIZE[job.dtype_a]
    a.read_into(job.name, buffer[piece.a_offset:piece.a_offset + n * size_a], start=piece.start * size_a)
    nbytes = n * size_a
    if piece.blended:
        size_b = ITEMSIZE[job.dtype_b]
        b.read_into(job.name, buffer[piece.b_offset:piece.b_offset + n * size_b], start=piece.start * size_b)
        nbytes += n * size_b
    return nbytes


read_piece = _read_piece  # the public name (verify reads pieces as the merge does); tests patch the other


# ---- the pipeline ----------------------------------------------------------------------------------------------

class _Cancelled(Exception):
    pass


class PipelinedEngine:
    def __init__(self, a: Checkpoint, b: Checkpoint, *, devices: list[str], capacity: int,
                 ring_depth: int | None = None, readers: int = 1, progress: Callable[[int], None] | None = None,
                 simulate_staging: bool = False) -> None:
        self.a, self.b = a, b
        self.readers = max(1, readers)  # reader threads per device
        self.simulate_staging = simulate_staging
        self.devices = devices
        self.capacity = capacity
        self.ring_depth = ring_depth
        self._progress = progress or (lambda n: None)
        self._progress_lock = threading.Lock()
        self.stats = EngineStats(devices=list(devices))
        self._cancel = threading.Event()
        self._error: BaseException | None = None
        self._error_lock = threading.Lock()
        self._written: queue.Queue = queue.Queue()
        self._stage_lock = threading.Lock()
        self._names: Sequence[str] | None = None
        self._sources: dict = {}

    # -- plumbing --
    def _fail(self, exc: BaseException) -> None:
        with self._error_lock:
            if self._error is None:
                self._error = exc
        self._cancel.set()

    def _guard(self, fn, *args) -> None:
        try:
            fn(*args)
        except _Cancelled:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            self._fail(exc)

    def _get(self, q: queue.Queue):
        while True:
            if self._cancel.is_set():
                raise _Cancelled
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                continue

    def _stage(self, name: str, seconds: float, nbytes: int) -> None:
        with self._stage_lock:
            self.stats.stages[name].add(seconds, nbytes)

    def _advance(self, nbytes: int) -> None:
        with self._progress_lock:
            self._progress(nbytes)

    # -- run --
    def run(self, plan: MergePlan | None, batches: tuple[Batch, ...] | Callable[[str], Iterable[Batch]],
            writers: list, copier: Copier | None = None, *, allow_nonfinite: bool | None = None,
            variant_names: Sequence[str] | None = None) -> EngineStats:
        """Run the device stages over ``batches`` into the open shard ``writers``; ``copier`` (started by the
        caller, possibly before torch was imported) copies the unchanged tensors meanwhile, else one is started
        here. On any error every stage, the copier included, is stopped before the error is re-raised.

        A sweep passes ``plan=None``, ``batches`` as a function of the device (gpumerge.plan.sweep_batches: they are
        made as they are read), ``writers`` per variant (``writers[v][shard]``), its copier and ``variant_names``
        (errors name the variants a blend was for)."""
        started = time.perf_counter()
        allow_nonfinite = plan.spec.allow_nonfinite if allow_nonfinite is None else allow_nonfinite
        self._names = variant_names
        if callable(batches):
            sources = {device: batches(device) for device in self.devices}
            sizes = {device: (b.nbytes for b in batches(device)) for device in self.devices}  # a second pass
        else:
            sources = {device: iter([b for b in batches if b.device == device]) for device in self.devices}
            sizes = {device: (b.nbytes for b in batches if b.device == device) for device in self.devices}
        self._sources = {device: (iter(source), threading.Lock()) for device, source in sources.items()}
        for device in self.devices:  # the peak of this merge, not of whatever ran before in the process
            if device != "cpu":
                torch.cuda.reset_peak_memory_stats(device)
        lanes = self._lanes(sizes)
        self.stats.peak_pinned_bytes, self.stats.pinned_allocator_bytes = pinned_bytes(lanes.values())
        self.stats.peak_host_buffer_bytes = sum(lane.host_block.numel() for lane in lanes.values())
        if copier is None:
            copier = Copier(plan, self.a, writers, progress=self._advance).start()
        # The CPU blend shares the cores with the reader, writer and copier threads: leave them one core
        # (measured on 2 cores: 1 blend thread + 16 MiB batches ~1.25 s vs 2 threads + 64 MiB ~1.6-1.8 s).
        intra_op_threads = torch.get_num_threads()
        if "cpu" in lanes:
            torch.set_num_threads(max(1, intra_op_threads - 1))
        threads = [threading.Thread(target=self._guard, args=(self._reader, lanes[d]),
                                    name=f"gpumerge-read-{d}-{k}", daemon=True)
                   for d in self.devices for k in range(self.readers)]
        threads += [threading.Thread(target=self._guard, args=(self._blender, lane), name=f"gpumerge-blend-{d}",
                                     daemon=True) for d, lane in lanes.items()]
        threads.append(threading.Thread(target=self._guard, args=(self._writer, writers, len(lanes),
                                                                  allow_nonfinite),
                                        name="gpumerge-write", daemon=True))
        try:
            for thread in threads:
                thread.start()
            self._join(threads)
            if self._error is None:
                while not self._cancel.is_set():
                    with GUARD.interruptible():  # a signal stops the copy at once
                        if copier.wait(_POLL_S):
                            break
        except BaseException as exc:  # Ctrl-C in the caller's thread, or the copier's error
            self._fail(exc)
            self._join(threads)
        finally:
            torch.set_num_threads(intra_op_threads)
            copier.cancel()
            for lane in lanes.values():
                if lane.is_cuda:
                    try:
                        torch.cuda.synchronize(lane.device)
                        self.stats.peak_device_bytes += torch.cuda.max_memory_allocated(lane.device)
                    except Exception as exc:  # noqa: BLE001 - after a sticky CUDA error: keep the first error
                        self._fail(exc)
        if self._error is not None:
            raise self._error
        self.stats.stages["copy"].add(copier.busy_s, copier.bytes)
        if plan is not None:
            for job in plan.jobs:
                self.stats.count(job)
        else:  # a sweep: what was read once, what was written per variant
            self.stats.bytes_read = self.stats.stages["read"].bytes + copier.bytes
            self.stats.bytes_written = self.stats.stages["write"].bytes + copier.bytes
        self.stats.elapsed_s = time.perf_counter() - started
        return self.stats

    def _lanes(self, sizes: dict[str, Iterable[int]]) -> dict[str, DeviceLane]:
        """Each device's lane, its ring sized to that device's batches (their footprints in ``sizes``)."""
        lanes = {}
        for device in self.devices:
            slot_bytes, depth = ring_shape(sizes[device], capacity=self.capacity,
                                           depth=ring_depth_of(device, self.ring_depth))
            self.stats.rings[device] = {"slot_bytes": slot_bytes, "slots": depth}
            try:
                lanes[device] = DeviceLane(device, slot_bytes, depth, simulate_staging=self.simulate_staging)
            except torch.cuda.OutOfMemoryError as exc:
                raise OutputError(f"out of GPU memory allocating {depth} buffers of {slot_bytes} bytes on {device}; "
                                  "give a smaller --max_memory for it") from exc
        return lanes

    def _join(self, threads: list[threading.Thread]) -> None:
        """Wait for every stage; a Ctrl-C meanwhile cancels them and waits on (files are closed only after)."""
        for thread in threads:
            while thread.is_alive():
                try:
                    with GUARD.interruptible():  # a signal lands here, in the main thread, and cancels every stage
                        thread.join(timeout=_POLL_S)
                except KeyboardInterrupt as exc:
                    self._fail(exc)

    # -- stages --
    def _next_batch(self, device: str) -> Batch | None:
        """The device's next batch to read; its readers share one sequence (made lazily for a sweep)."""
        source, lock = self._sources[device]
        with lock:
            batch = next(source, None)
            if batch is not None:
                self.stats.batches += 1
            return batch

    def _reader(self, lane: DeviceLane) -> None:
        while (batch := self._next_batch(lane.device)) is not None:
            slot = self._get(lane.ring)
            began = time.perf_counter()
            nbytes = sum(_read_piece(piece, slot.host, self.a, self.b) for piece in batch.pieces)
            self._stage("read", time.perf_counter() - began, nbytes)
            lane.ready.put((batch, slot))
        lane.ready.put(None)

    def _blender(self, lane: DeviceLane) -> None:
        if lane.is_cuda:
            torch.cuda.set_device(lane.device)
        done = 0  # readers of this lane that have finished
        while True:
            item = self._get(lane.ready)
            if item is None:
                done += 1
                if done == self.readers:
                    self._written.put(None)
                    return
                continue
            batch, slot = item
            if lane.staged:
                events = self._blend_staged(lane, batch, slot)
            else:
                began = time.perf_counter()
                for piece in batch.blends:
                    blend_piece(piece, slot.host)
                self._stage("blend", time.perf_counter() - began, batch.payload_bytes)
                events = None
            self._written.put((lane, batch, slot, events))

    def _blend_staged(self, lane: DeviceLane, batch: Batch, slot: Slot):
        """H2D on the copy stream, blend on the compute stream, D2H on its own stream; the writer waits on the
        last event before it reads the pinned output (reading it earlier would be wrong data, silently)."""
        events = [lane.event() for _ in range(6)]  # start and end of H2D, blend, D2H
        with lane.on(lane.h2d_stream):
            events[0].record()
            slot.device[:batch.in_bytes].copy_(slot.host[:batch.in_bytes], non_blocking=lane.is_cuda)
            events[1].record()
        lane.wait(lane.compute_stream, events[1])
        with lane.on(lane.compute_stream):
            events[2].record()  # after the wait: the stage's own time, not its time queued behind the last batch
            for piece in batch.blends:
                blend_piece(piece, slot.device)
            events[3].record()
        lane.wait(lane.d2h_stream, events[3])
        with lane.on(lane.d2h_stream):
            events[4].record()
            span = slice(batch.out_start, batch.out_end)
            slot.host[span].copy_(slot.device[span], non_blocking=lane.is_cuda)
            events[5].record()
        return events

    @staticmethod
    def _targets(batch: Batch, writers: list):
        """(piece, its writers, its variants or None) for each out region of a batch."""
        if not batch.outputs:
            return [(piece, (writers[piece.job.shard],), None) for piece in batch.pieces]
        return [(o.piece, tuple(writers[v][o.piece.job.shard] for v in o.variants), o.variants)
                for o in batch.outputs]

    def _write(self, piece: Piece, host: torch.Tensor, targets, variants, allow_nonfinite: bool) -> int:
        try:
            return write_piece(piece, host, targets, allow_nonfinite=allow_nonfinite)
        except OutputError as exc:
            if variants is None or self._names is None:
                raise
            names = [self._names[v] for v in variants]
            shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
            raise OutputError(f"variant{'s' if len(names) > 1 else ''} {shown}: {exc}") from None

    def _next_ready(self, pending: list, producers: int, finished: int) -> tuple[object | None, int]:
        """The first pending batch whose device work is done (any device: a slow GPU does not hold the others
        back), taking newly blended batches meanwhile; (None, finished) once every producer is done and drained."""
        while True:
            for k, item in enumerate(pending):
                events = item[3]
                if events is None or events[-1].query():
                    return pending.pop(k), finished
            if finished == producers and not pending:
                return None, finished
            if self._cancel.is_set():
                raise _Cancelled
            try:  # nothing ready: wait for a new batch, or a moment for a device to finish one
                item = self._written.get(timeout=_READY_POLL_S if pending else _POLL_S)
            except queue.Empty:
                continue
            if item is None:
                finished += 1
            else:
                pending.append(item)

    def _writer(self, writers: list[ShardWriter], producers: int, allow_nonfinite: bool) -> None:
        finished = 0
        pending: list = []
        while True:
            item, finished = self._next_ready(pending, producers, finished)
            if item is None:
                return
            lane, batch, slot, events = item
            if events is not None:
                events[-1].synchronize()
                self._stage("h2d", events[0].elapsed_time(events[1]) / 1e3, batch.in_bytes)
                self._stage("blend", events[2].elapsed_time(events[3]) / 1e3, batch.payload_bytes)
                self._stage("d2h", events[4].elapsed_time(events[5]) / 1e3, batch.out_end - batch.out_start)
            began = time.perf_counter()
            nbytes = sum(self._write(piece, slot.host, targets, variants, allow_nonfinite)
                         for piece, targets, variants in self._targets(batch, writers))
            self._stage("write", time.perf_counter() - began, nbytes)
            lane.ring.put(slot)
            self._advance(nbytes)
            test_pause("write", cancelled=self._cancel.is_set)
