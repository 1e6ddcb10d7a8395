"""The copy stage: tensors kept exactly as model 1 stores them go file to file, in the kernel (copy_file_range),
in a thread of their own. No torch here (except for pickled .bin sources), so the copy can start while torch is
still being imported: on a CPU machine that import is as long as the whole merge."""

from __future__ import annotations

import threading
import time
from typing import Callable

from gpumerge.checkpoint import Checkpoint
from gpumerge.plan import MergePlan, TensorJob, needs_device
from gpumerge.writer import ShardWriter

_BIN_CHUNK_BYTES = 16 * 2**20


def copy_unchanged(job: TensorJob, a: Checkpoint, writer: ShardWriter) -> None:
    """A tensor kept as it is: file to file in the kernel, or in chunks for pickled sources."""
    location = a.raw_location(job.name)
    if location is not None:
        writer.copy_from(location[0], location[1], job.nbytes, job.offset)
        return
    for start in range(0, job.nbytes, _BIN_CHUNK_BYTES):
        data = a.read_bytes(job.name, start, min(_BIN_CHUNK_BYTES, job.nbytes - start))
        writer.pwrite(memoryview(data), job.offset + start)


class Copier:
    """Copies every unchanged tensor of the plan in a background thread; cancellable; keeps its first error."""

    def __init__(self, plan: MergePlan | None, a: Checkpoint, writers: list[ShardWriter] | None, *,
                 progress: Callable[[int], None] | None = None,
                 tasks: list[tuple[TensorJob, ShardWriter]] | None = None) -> None:
        """The plan's unchanged tensors into its shard ``writers``; or ``tasks``, (job, writer) pairs (a sweep's:
        each unchanged tensor into every variant that keeps it, one after the other while its bytes are cached)."""
        if tasks is None:
            tasks = [(job, writers[job.shard]) for job in plan.jobs if not needs_device(job)]
        self.tasks = tasks
        self.a = a
        self.progress = progress or (lambda n: None)
        self.busy_s = 0.0
        self.bytes = 0
        self.error: BaseException | None = None
        self.cancelled = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpumerge-copy", daemon=True)

    def start(self) -> "Copier":
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            for job, writer in self.tasks:
                if self.cancelled.is_set():
                    return
                began = time.perf_counter()
                copy_unchanged(job, self.a, writer)
                self.busy_s += time.perf_counter() - began
                self.bytes += job.nbytes
                self.progress(job.nbytes)
        except BaseException as exc:  # noqa: BLE001 - re-raised by wait() in the caller's thread
            self.error = exc

    def alive(self) -> bool:
        return self._thread.is_alive()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Join; True when finished. Raises the copier's error, if any."""
        self._thread.join(timeout_s)
        if self.error is not None:
            raise self.error
        return not self._thread.is_alive()

    def cancel(self) -> None:
        """Stop after the current tensor and join (swallowing errors: the caller is already failing)."""
        self.cancelled.set()
        if self._thread.ident is not None:
            self._thread.join()
