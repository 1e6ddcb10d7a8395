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


def cuda_possible() -> bool:
    """False when no NVIDIA driver is loaded: then there is no CUDA device, known without importing torch."""
    from pathlib import Path

    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/proc/driver/nvidia/version").exists() or any(Path("/dev").glob("nvidia[0-9]*"))


def cuda_count() -> int:
    if not cuda_possible():
        return 0
    import torch

    try:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken driver is "no CUDA" for our purposes
        return 0


def resolve_devices(flag: str) -> tuple[list[str], str | None]:
    """``auto`` -> every visible CUDA device, else ``["cpu"]`` with a one-line notice; ``cuda`` -> all;
    ``cuda:N`` or ``cuda:0,cuda:2`` -> those. CUDA asked for but absent is an error."""
    if flag == "cpu":
        return ["cpu"], None
    count = cuda_count()
    if flag == "auto":
        if count:
            return [f"cuda:{i}" for i in range(count)], None
        return ["cpu"], "no CUDA device found; merging on the CPU"
    if count == 0:
        raise _no_cuda(flag)
    if flag == "cuda":
        return [f"cuda:{i}" for i in range(count)], None
    devices = flag.split(",")
    for device in devices:
        if int(device.split(":")[1]) >= count:
            raise SpecError(f"--device {flag}: only {count} CUDA device(s) are visible (cuda:0..cuda:{count - 1})")
    return devices, None


def _no_cuda(flag: str) -> SpecError:
    return SpecError(f"--device {flag}: no CUDA device is available here (torch.cuda.is_available() is False); "
                     "use --device cpu or auto")


def check_without_torch(flag: str, max_memory) -> None:
    """What resolve_devices and probe_budget will refuse, decided here without torch where no NVIDIA driver is
    loaded (then CUDA is absent and ``auto`` is the CPU), so that `gpumerge plan` refuses it as the merge does."""
    if flag == "cpu" or cuda_possible():
        return
    if flag != "auto":
        raise _no_cuda(flag)
    unknown = [key for key, _ in max_memory or () if key != "cpu"]
    if unknown:
        raise unused_budget_error(unknown, ["cpu"])


def _budget_key(device: str) -> int | str:
    return "cpu" if device == "cpu" else int(device.split(":")[1])


def probe_budget(devices: list[str], max_memory: Mapping[int | str, int] | None = None) -> dict[str, int]:
    """Bytes each device may hold for the merge's in-flight buffers: --max_memory where given, else a share of the
    free memory accelerate reports (torch.cuda.mem_get_info per GPU; available RAM for the CPU, capped)."""
    given = dict(max_memory or {})
    unknown = [k for k in given if k != "cpu" and f"cuda:{k}" not in devices]
    if unknown:
        raise unused_budget_error(unknown, devices)
    probed: dict[int | str, int] = {"cpu": _available_ram()}
    if any(d != "cpu" and _budget_key(d) not in given for d in devices):
        from accelerate.utils import get_max_memory  # GPU runs only: it initialises every visible device

        probed = get_max_memory()
    budget: dict[str, int] = {}
    for device in devices + (["cpu"] if "cpu" not in devices else []):
        key = _budget_key(device)
        if key in given:
            budget[device] = int(given[key])
        elif device == "cpu":  # a ring of 16 MiB is always there to take, however little RAM is free
            budget[device] = max(min(int(probed.get("cpu", CPU_DEFAULT_BUDGET_BYTES) * 0.25),
                                     CPU_DEFAULT_BUDGET_BYTES), MIN_DEVICE_BUDGET_BYTES)
        else:
            budget[device] = int(probed.get(key, 0) * FREE_MEMORY_SHARE)
            if budget[device] < MIN_DEVICE_BUDGET_BYTES:
                raise SpecError(f"{device} has {int(probed.get(key, 0))} bytes of free memory, less than the "
                                f"{MIN_DEVICE_BUDGET_BYTES // FREE_MEMORY_SHARE:.0f} bytes the merge needs on it; "
                                "free memory on it or leave it out with --device")
    return budget


def _available_ram() -> int:
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
