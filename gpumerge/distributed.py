"""Many processes: an evaluated sweep or a search started by ``accelerate launch --num_processes N ... -m gpumerge
sweep ...`` splits its rows (or each batch of trials) across the N processes.

accelerate starts the processes and joins them in a process group (its PartialState, always on gloo: what travels
between them is a few small Python objects a row, in host memory, and gloo lets two processes share one GPU, which
NCCL refuses); each process then scores on its own device, the GPU of its local rank (or the CPU, with --device cpu
or without CUDA). This module only names what a sweep needs of them: which process this is, its device, and
collective steps on plain Python objects (torch.distributed's object collectives): the main process's word to the
others (``broadcast``), every process's result to all (``gather``), and the end of a step where one process failed
(an error travels as the value; every process raises it, and only the main one says it). The group's timeout is a
day: a process may wait for the main one while it judges RUNS (every byte of the kept models) or loads its model.

Only the main process (rank 0) touches the output directory, the study and the kept models; the others hold their
own resident copy of the model, score their share and hand the rows back. Without accelerate (``WORLD_SIZE`` unset
or 1) a run is one process and nothing here imports torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from gpumerge.errors import GpumergeError, OutputError


def world_size() -> int:
    """The processes of this run, as the launcher (accelerate, torchrun) says in the environment; 1 without one."""
    value = os.environ.get("WORLD_SIZE", "1")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def is_worker() -> bool:
    """True in every process but the main one of a launched run: it prints nothing of its own (no notices, no
    progress, no error line; the main process says what the run did)."""
    return world_size() > 1 and os.environ.get("RANK", "0") != "0"


@dataclass
class Processes:
    """This process's place in the run: ``rank`` of ``size`` (0 is the main process), ``local_rank`` on its machine,
    and the device it scores on (None: the device the flags choose, in a single process)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: str | None = None
    sharing: int = 1  # the processes of this run on this process's device (itself included): its memory is shared
    free_bytes: int | None = None  # the device's free memory when this process started, before any process loaded
    listening: bool = True  # the others wait for the main process's next word (their work, the end, an error)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def part(self) -> int | None:
        """This process's part of its device's free memory, when processes share it (None: all of it, probed when
        needed)."""
        if self.size == 1 or self.free_bytes is None or self.sharing <= 1:
            return None
        return self.free_bytes // self.sharing

    def broadcast(self, value=None):
        """The main process's ``value``, in every process (the main one's own in a single process)."""
        if self.size == 1:
            return value
        import torch.distributed as dist

        box = [value if self.is_main else None]
        try:
            dist.broadcast_object_list(box, src=0)
        except RuntimeError as exc:  # torch.distributed's errors: a peer gone (killed, failed), a timeout
            raise _peer_lost(exc) from None
        if self.is_main:
            self.listening = False
        return box[0]

    def gather(self, value) -> list:
        """Every process's ``value``, by rank, in every process."""
        if self.size == 1:
            return [value]
        import torch.distributed as dist

        found = [None] * self.size
        try:
            dist.all_gather_object(found, value)
        except RuntimeError as exc:
            raise _peer_lost(exc) from None
        return found

    def tell_error(self, exc: BaseException) -> None:
        """The main process failed while the others wait for its word: they stop with its error."""
        if self.size > 1 and self.is_main and self.listening:
            try:
                self.broadcast(("error", as_error(exc)))
            except GpumergeError:  # the others are gone already
                pass


def told(exc: BaseException, group: Processes) -> BaseException:
    """``exc`` as a process other than the main one raises it once the main process has it (gathered from this
    process, or sent by it): marked, so that this process exits 0 and leaves the run's exit code and its one line to
    the main process (a nonzero exit would have the launcher stop the main process mid-clean-up)."""
    if not group.is_main and isinstance(exc, GpumergeError):
        exc.told = True
    return exc


def as_error(exc: BaseException) -> GpumergeError:
    """An error as another process re-raises it: a gpumerge error as it is, anything else as one line."""
    if isinstance(exc, GpumergeError):
        return exc
    if isinstance(exc, KeyboardInterrupt):
        import signal

        name = signal.Signals(getattr(exc, "signum", signal.SIGINT)).name
        return OutputError(f"a process of this run was interrupted ({name}); the rows gathered so far are kept: run "
                           "the same command again to finish")
    return OutputError(f"another process failed: {type(exc).__name__}: {exc}")


def _peer_lost(exc: RuntimeError) -> OutputError:
    first = " ".join(str(exc).split())[:200]
    return OutputError(f"another process of this run stopped before its share was done ({first}); the rows the main "
                       "process had gathered are kept: run the same command again to finish")


SINGLE = Processes()


def processes(*, device_flag: str = "auto") -> Processes:
    """This run's processes: one (no torch imported) unless a launcher started several; then accelerate's process
    group, on gloo whatever the devices (the module's docstring says why), each process scoring on the GPU of its
    local rank, or on the CPU (``--device cpu``, or no CUDA)."""
    if world_size() == 1:
        return SINGLE
    import datetime

    import torch
    from accelerate import PartialState

    cpu = device_flag == "cpu" or not torch.cuda.is_available()
    state = PartialState(cpu=True, backend="gloo", timeout=datetime.timedelta(days=1))  # cpu: the group's, on gloo
    if state.num_processes != world_size():
        raise OutputError(f"the launcher started {world_size()} processes, but accelerate joined "
                          f"{state.num_processes}: start them with `accelerate launch --multi_gpu --num_processes N` "
                          "(on a CPU machine too)")
    local = state.local_process_index
    on_machine = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if os.environ.get("LOCAL_WORLD_SIZE", "").isdigit() \
        else 1
    gpus = 0 if cpu else torch.cuda.device_count()
    device, sharing = device_of(local, max(on_machine, local + 1), gpus)
    from gpumerge.devices import free_bytes

    return Processes(state.process_index, state.num_processes, local, device, sharing, free_bytes(device))


def device_of(local_rank: int, on_machine: int, gpus: int) -> tuple[str, int]:
    """(the device of the process of ``local_rank`` among ``on_machine`` processes on a machine with ``gpus`` GPUs,
    how many of them use it): the GPU of its local rank (wrapping round when there are more processes than GPUs),
    or the CPU, which all of them share."""
    if gpus == 0:
        return "cpu", on_machine
    mine = local_rank % gpus
    return f"cuda:{mine}", sum(1 for rank in range(on_machine) if rank % gpus == mine)
