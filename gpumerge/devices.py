"""Probing devices and memory into a plain budget dict; sampling GPU telemetry. Planning never probes: it is handed
the budget this module measured (or one a test made up)."""

from __future__ import annotations

import os
import threading
from typing import Mapping

from gpumerge.errors import SpecError
from gpumerge.spec import MIN_DEVICE_BUDGET_BYTES, unused_budget_error

# Share of a device's free memory the merge may use for its in-flight buffers (the rest stays for the driver,
# other processes, and allocator slack).
FREE_MEMORY_SHARE = 0.8
CPU_DEFAULT_BUDGET_BYTES = 512 * 2**20  # RSS is the user's: a bounded ring, whatever the RAM size
GPU_PINNED_BYTES = 2**30  # per GPU, on a host with >= 16 GiB of RAM: a ring of 4 batches of 256 MiB


def cuda_possible() -> bool:
    """False when there is surely no CUDA device, known without importing torch: CUDA_VISIBLE_DEVICES empty or -1,
    or no NVIDIA driver (Linux: /proc/driver/nvidia/version or /dev/nvidiaN; WSL2: /dev/dxg, the GPU paravirtual
    device, without the others). A true answer means "ask torch"."""
    from pathlib import Path

    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return (Path("/proc/driver/nvidia/version").exists() or any(Path("/dev").glob("nvidia[0-9]*"))
            or Path("/dev/dxg").exists())


def cuda_count(*, ask_torch: bool = False) -> int:
    """Visible CUDA devices. Without ``ask_torch`` the cheap probe may answer 0 without importing torch; a user who
    asks for CUDA gets torch's own answer (a driver layout the probe does not know must not turn into "no CUDA")."""
    if not ask_torch and not cuda_possible():
        return 0
    import torch

    try:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken driver is "no CUDA" for our purposes
        return 0


def resolve_devices(flag: str, *, scoring: bool = False, gpu_budgets: bool = False) -> tuple[list[str], str | None]:
    """``cpu``; ``cuda`` -> every visible CUDA device; ``cuda:N`` or ``cuda:0,cuda:2`` -> those (CUDA asked for but
    absent is an error). ``auto``:

    - a merge or a write-mode sweep (not ``scoring``): the CPU, unless --max_memory gives a GPU a budget
      (``gpu_budgets``). Blending is a few arithmetic operations per byte, so a merge is bound by reading and
      writing; a GPU adds two PCIe copies of every blended byte and a pinned ring, and on the H200 machine the CPU
      path was faster (benchmarks/RESULTS.md, the device command's e2e and sweep rows). The CPU is chosen without
      importing torch.
    - scoring (an evaluated sweep's forward passes): every visible CUDA device, else the CPU with a one-line notice.
    """
    if flag == "cpu":
        return ["cpu"], None
    if flag == "auto" and not scoring and not gpu_budgets:
        if cuda_possible():
            return ["cpu"], ("--device auto: the merge runs on the CPU, which keeps up with reading and writing "
                             "(--device cuda blends on the GPU)")
        return ["cpu"], "no CUDA device found; the merge runs on the CPU"
    count = cuda_count(ask_torch=flag != "auto")
    if flag == "auto":
        if count:
            return [f"cuda:{i}" for i in range(count)], None
        return ["cpu"], "no CUDA device found; scoring runs on the CPU" if scoring else None
    if count == 0:
        raise _no_cuda(flag)
    if flag == "cuda":
        return [f"cuda:{i}" for i in range(count)], None
    devices = flag.split(",")
    for device in devices:
        if int(device.split(":")[1]) >= count:
            raise SpecError(f"--device {flag}: only {count} CUDA device(s) are visible (cuda:0..cuda:{count - 1})")
    return devices, None


def gpu_budgets(max_memory) -> bool:
    """Whether --max_memory gives a GPU a budget (then ``auto`` means the GPUs for a merge too)."""
    return any(key != "cpu" for key, _ in dict(max_memory or {}).items())


def _no_cuda(flag: str) -> SpecError:
    return SpecError(f"--device {flag}: no CUDA device is available here (torch.cuda.is_available() is False); "
                     "use --device cpu or auto")


def check_without_torch(flag: str, max_memory) -> None:
    """What resolve_devices and probe_budget will refuse, decided here so that `gpumerge plan` refuses it as the merge
    does: without torch where no NVIDIA driver is loaded and ``auto`` is asked for (then it is the CPU); with torch's
    own answer when CUDA is asked for explicitly."""
    if flag == "cpu" or cuda_possible():
        return
    if flag != "auto":
        if cuda_count(ask_torch=True) == 0:  # the user asked for CUDA: torch decides, not the cheap probe
            raise _no_cuda(flag)
        return
    unknown = [key for key, _ in max_memory or () if key != "cpu"]
    if unknown:
        raise unused_budget_error(unknown, ["cpu"])


def _budget_key(device: str) -> int | str:
    return "cpu" if device == "cpu" else int(device.split(":")[1])


def probe_budget(devices: list[str], max_memory: Mapping[int | str, int] | None = None) -> dict[str, int]:
    """Bytes each device may hold for the merge's in-flight buffers: --max_memory where given, else a share of the
    free memory (torch.cuda.mem_get_info of each chosen GPU; available RAM for the CPU, capped)."""
    given = dict(max_memory or {})
    unknown = [k for k in given if k != "cpu" and f"cuda:{k}" not in devices]
    if unknown:
        raise unused_budget_error(unknown, devices)
    probed: dict[int | str, int] = {"cpu": available_ram()}
    for device in devices:  # only the chosen GPUs: probing all (accelerate's get_max_memory) would make a
        if device != "cpu" and _budget_key(device) not in given:  # context on each, and fail on a broken one
            probed[_budget_key(device)] = _free_gpu_bytes(device)
    budget: dict[str, int] = {}
    for device in devices + (["cpu"] if "cpu" not in devices else []):
        key = _budget_key(device)
        if key in given:
            budget[device] = int(given[key])
        elif device == "cpu":
            budget[device] = _default_host_budget(sum(d != "cpu" for d in devices), int(probed["cpu"]))
        else:
            budget[device] = int(probed.get(key, 0) * FREE_MEMORY_SHARE)
            if budget[device] < MIN_DEVICE_BUDGET_BYTES:
                raise SpecError(f"{device} has {int(probed.get(key, 0))} bytes of free memory, less than the "
                                f"{MIN_DEVICE_BUDGET_BYTES // FREE_MEMORY_SHARE:.0f} bytes the merge needs on it; "
                                "free memory on it or leave it out with --device")
    return budget


def _default_host_budget(gpus: int, available: int) -> int:
    """The host buffers' budget when --max_memory cpu= is not given. A CPU merge: a quarter of the available RAM,
    at most 512 MiB (RSS is the user's). A GPU merge on a host with >= 16 GiB of RAM: 1 GiB of pinned buffers per
    GPU (a ring of 4 x 256 MiB), at most half the available RAM. Never under 16 MiB."""
    if gpus and _total_ram() >= 16 * 2**30:
        chosen = min(gpus * GPU_PINNED_BYTES, available // 2)
    else:
        chosen = min(available // 4, CPU_DEFAULT_BUDGET_BYTES)
    return max(chosen, MIN_DEVICE_BUDGET_BYTES)


def _total_ram() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def _free_gpu_bytes(device: str) -> int:
    import torch

    try:
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    except RuntimeError as exc:  # a GPU in a bad state: say which, not "budget too small"
        raise SpecError(f"{device} cannot be used: CUDA reports {type(exc).__name__} asking for its free memory; "
                        "leave it out with --device") from exc


def free_bytes(device: str) -> int:
    """What a device has free now: the available RAM for the CPU, a GPU's free memory."""
    return available_ram() if device == "cpu" else _free_gpu_bytes(device)


def available_ram() -> int:
    """Available RAM without importing accelerate/psutil on the CPU path (what they report, from sysconf)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 4 * CPU_DEFAULT_BUDGET_BYTES


class Telemetry:
    """Samples each GPU's memory use and utilization through NVML (nvidia-ml-py, via torch.cuda's wrappers, which
    map visible device indexes to NVML ones). Without NVML or GPUs it stays empty and quiet."""

    def __init__(self, devices: list[str], *, interval_s: float = 0.25) -> None:
        self.indexes = [int(d.split(":")[1]) for d in devices if d.startswith("cuda")]
        self.interval_s = interval_s
        self.latest: dict[int, tuple[int, int]] = {}
        self.peak_used: dict[int, int] = {}
        self.peak_util: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.indexes and self._sample():
            self._thread = threading.Thread(target=self._loop, name="gpumerge-nvml", daemon=True)

    def _sample(self) -> bool:
        try:
            import torch

            for i in self.indexes:
                used = int(torch.cuda.device_memory_used(i))
                util = int(torch.cuda.utilization(i))
                self.latest[i] = (used, util)
                self.peak_used[i] = max(self.peak_used.get(i, 0), used)
                self.peak_util[i] = max(self.peak_util.get(i, 0), util)
            return True
        except Exception:  # no NVML (nvidia-ml-py missing, or a driver without it): no telemetry
            self.latest.clear()
            return False

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            if not self._sample():
                return

    def start(self) -> "Telemetry":
        if self._thread is not None:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=2)

    def line(self) -> str:
        return " ".join(f"gpu{i} {used / 2**30:.1f}GiB {util}%" for i, (used, util) in sorted(self.latest.items()))

    def summary(self) -> list[dict]:
        return [{"index": i, "peak_memory_used_bytes": self.peak_used.get(i, 0),
                 "peak_utilization_pct": self.peak_util.get(i, 0)} for i in self.indexes if i in self.peak_used]
