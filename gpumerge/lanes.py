"""A device's lane through the pipeline: its ring of buffer slots (host memory, pinned for a GPU, plus device memory
for a GPU), its queue of batches read and waiting for the blender, and its CUDA streams.

A ring is sized to the work it carries, not to the budget: a slot holds the largest batch the plan gives that device
(never more than the batch capacity), and the ring has no more slots than that device has batches (never more than
its depth). A merge of small models pins and allocates a few KiB, not the GiB a full ring of 256 MiB batches takes.
"""

from __future__ import annotations

import contextlib
import queue
import time
from dataclasses import dataclass
from typing import Iterable

import torch

from gpumerge.errors import OutputError


def ring_shape(batch_bytes: Iterable[int], *, capacity: int, depth: int) -> tuple[int, int]:
    """(bytes per slot, slots) for a lane whose batches have footprints ``batch_bytes``: the largest footprint
    (within ``capacity``) and at most one slot per batch (within ``depth``); (0, 0) for a lane without batches."""
    largest = count = 0
    for nbytes in batch_bytes:
        if nbytes > capacity:
            raise ValueError(f"a batch of {nbytes} bytes exceeds the batch capacity of {capacity} bytes")
        largest, count = max(largest, nbytes), count + 1
    return (largest, min(depth, count)) if count else (0, 0)


@dataclass(slots=True)
class Slot:
    host: torch.Tensor  # uint8, pinned for CUDA devices
    device: torch.Tensor | None  # uint8 on the GPU, None for the CPU (blends in host memory)


class HostEvent:
    """Stands in for a CUDA event when the staged path is simulated on the CPU (work is already done)."""

    def __init__(self) -> None:
        self.at = 0.0

    def record(self) -> None:
        self.at = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: "HostEvent") -> float:
        return (other.at - self.at) * 1e3


def pinned_bytes(lanes) -> tuple[int, int | None]:
    """(pinned host bytes the lanes' blocks take, each rounded up to a power of two as torch's pinned allocator
    does; all the pinned bytes that allocator holds in this process, cached blocks included, where torch reports it
    (torch.cuda.host_memory_stats), else None)."""
    cuda = [lane for lane in lanes if lane.is_cuda]
    if not cuda:
        return 0, None
    ours = sum(1 << (lane.host_block.numel() - 1).bit_length() for lane in cuda if lane.host_block.numel())
    try:
        return ours, int(torch.cuda.host_memory_stats()["allocated_bytes.current"])
    except (AttributeError, KeyError, RuntimeError):  # an older torch without the statistics
        return ours, None


def host_block(nbytes: int, *, pinned: bool, device: str) -> torch.Tensor:
    try:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    except RuntimeError as exc:  # a failed pinned allocation is a RuntimeError, not an OutOfMemoryError
        if not pinned:
            raise
        raise OutputError(f"could not pin {nbytes} bytes of host memory for {device}'s buffers; give a smaller "
                          "--max_memory cpu=... (the pinned host memory for all GPUs)") from exc


class DeviceLane:
    """One device: its ring of slots, its queue of read batches, and (for CUDA) its streams.

    ``staged`` lanes copy each batch to a device buffer, blend there and copy the result back (the GPU path);
    ``simulate_staging`` runs that same path on the CPU, with a second host buffer as the "device" and no streams,
    so the tests exercise the GPU path's buffer logic on a machine without CUDA."""

    def __init__(self, device: str, capacity: int, ring_depth: int, *, simulate_staging: bool = False) -> None:
        """``capacity`` bytes per slot and ``ring_depth`` slots (see ring_shape); a ring of no slot allocates
        nothing (a device the plan gave no batch)."""
        self.device = device
        self.is_cuda = device != "cpu"
        self.staged = self.is_cuda or simulate_staging
        self.ring: queue.Queue[Slot] = queue.Queue()
        self.ready: queue.Queue = queue.Queue()
        self.slots = []
        # one host block for the whole ring (pinned for CUDA: one power-of-two block when the ring is, see
        # plan.batch_capacity), cut into slots
        self.host_block = host_block(ring_depth * capacity, pinned=self.is_cuda and ring_depth > 0, device=device)
        for k in range(ring_depth):
            host = self.host_block[k * capacity:(k + 1) * capacity]
            staging = torch.empty(capacity, dtype=torch.uint8, device=device) if self.staged else None
            slot = Slot(host, staging)
            self.slots.append(slot)
            self.ring.put(slot)
        streams = [torch.cuda.Stream(device) for _ in range(3)] if self.is_cuda else [None] * 3
        self.h2d_stream, self.compute_stream, self.d2h_stream = streams

    def event(self):
        # blocking: a host thread that waits on it sleeps instead of spinning a core
        return torch.cuda.Event(enable_timing=True, blocking=True) if self.is_cuda else HostEvent()

    def on(self, stream):
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def wait(self, stream, event) -> None:
        if stream is not None:
            stream.wait_event(event)
