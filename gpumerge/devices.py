"""Probing devices: which one the merge runs on. Planning never probes; it is handed the answer."""

from __future__ import annotations

from gpumerge.errors import SpecError


def cuda_count() -> int:
    import torch

    try:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken driver is "no CUDA" for our purposes
        return 0


def resolve_device(device: str) -> tuple[str, str | None]:
    """(device to use, a one-line notice or None). ``auto`` -> ``cpu`` with a notice until the GPU pipeline lands;
    ``cuda`` without CUDA is an error."""
    count = cuda_count()
    if device == "cpu":
        return "cpu", None
    if device == "auto":
        if count:
            return "cpu", f"{count} CUDA device(s) found, but this version merges on the CPU only; using cpu"
        return "cpu", "no CUDA device found; merging on the CPU"
    if count == 0:
        raise SpecError(f"--device {device}: no CUDA device is available here (torch.cuda.is_available() is False); "
                        "use --device cpu or auto")
    if ":" in device and int(device.split(":")[1]) >= count:
        raise SpecError(f"--device {device}: only {count} CUDA device(s) are visible (cuda:0..cuda:{count - 1})")
    raise SpecError(f"--device {device}: the CUDA pipeline is not part of this version yet; use --device cpu")
