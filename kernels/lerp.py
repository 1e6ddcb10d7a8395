"""Linear blends: out = a + t * (b - a), t = share of model 2, fp32 math, one rounding to the output dtype.

The fp32 arithmetic is torch.lerp's fused formula (``|t| < 0.5 ? fma(t, b - a, a) : fma(t - 1, b - a, b)``), which
its vectorized CPU kernels and its CUDA kernel compute; where a CPU's kernel does not fuse (no AVX2), kernels.exact
computes the same values exactly, so outputs agree bit for bit on every machine and device.
Every function writes into a caller-owned buffer: out-of-place lerp on CPU spends most of its time allocating.
"""

from __future__ import annotations

import torch

from gpumerge.kernels.exact import affine32, lerp32, needs_exact


def lerp_into(a: torch.Tensor, b: torch.Tensor, t: float, out: torch.Tensor,
              scratch: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Blend into ``out`` (same shape) with the fused definition of kernels.exact. When a, b and out share one
    dtype, one fused ``torch.lerp`` does it; else a and b are widened to fp32 in ``scratch`` (three fp32 buffers of
    out's size), blended, and rounded once."""
    if a.dtype == b.dtype == out.dtype:
        if needs_exact(out):
            return out.copy_(lerp32(a, b, t))
        return torch.lerp(a, b, t, out=out)
    if scratch is None:
        scratch = tuple(torch.empty(out.shape, dtype=torch.float32, device=out.device) for _ in range(3))
    a32, b32, o32 = scratch
    a32.copy_(a)
    b32.copy_(b)
    _lerp32_into(a32, b32, t, o32)
    return out.copy_(o32)


def _lerp32_into(a32: torch.Tensor, b32: torch.Tensor, t: float, o32: torch.Tensor) -> None:
    if needs_exact(o32):
        o32.copy_(lerp32(a32, b32, t))
    else:
        torch.lerp(a32, b32, t, out=o32)


def blend_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, t: float,
               coef: tuple[float, float] | None = None, load_dtype: torch.dtype | None = None,
               round_via: torch.dtype | None = None,
               scratch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The general blend, in fp32 scratch: inputs optionally rounded to ``load_dtype`` first; then
    ``coef[0]*a + coef[1]*b`` (linear, or slerp once its angle is known) or lerp(a, b, t), each with the fused
    definition of kernels.exact; the result optionally rounded to ``round_via`` before ``out``'s dtype (mergekit's
    dtype then out_dtype)."""
    a32, b32, o32 = scratch
    a32.copy_(a)
    b32.copy_(b)
    if load_dtype is not None:
        a32.copy_(a32.to(load_dtype))
        b32.copy_(b32.to(load_dtype))
    if coef is None:
        _lerp32_into(a32, b32, t, o32)
    elif needs_exact(o32):
        o32.copy_(affine32(a32, b32, coef))
    else:
        torch.mul(a32, coef[0], out=o32)
        o32.add_(b32, alpha=coef[1])
    if round_via is not None:
        o32.copy_(o32.to(round_via))
    return out.copy_(o32)


def affine_reference(a: torch.Tensor, b: torch.Tensor, coef: tuple[float, float]) -> torch.Tensor:
    """float64 reference for coef[0]*a + coef[1]*b."""
    return coef[0] * a.to(torch.float64) + coef[1] * b.to(torch.float64)


def lerp_reference(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """float64 reference for tests: the exact blend before any rounding."""
    a64 = a.to(torch.float64)
    return a64 + t * (b.to(torch.float64) - a64)


def finite(values: torch.Tensor) -> bool:
    """All finite: aminmax runs at ~17 GB/s on a CPU, where isfinite().all() runs at ~1 GB/s; NaN propagates."""
    if values.numel() == 0:
        return True
    low, high = torch.aminmax(values)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def new_infs(out: torch.Tensor, *inputs: torch.Tensor) -> int:
    """How many elements of ``out`` are infinite although every input there is finite (an overflow)."""
    if finite(out):
        return 0
    bad = torch.isinf(out)
    for x in inputs:
        bad &= torch.isfinite(x)
    return int(bad.sum())


def ulp(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at each value of a float64 ``ref`` (subnormal spacing below the smallest normal)."""
    info = torch.finfo(dtype)
    magnitude = ref.abs().clamp_min(info.tiny)
    return torch.exp2(torch.floor(torch.log2(magnitude))) * info.eps


def error_bound(a: torch.Tensor, b: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The accuracy promised for a blend: 1 ulp of the output dtype at the float64 reference, plus
    2**-22 * max(|a|, |b|) for t held in fp32 when the result cancels to ~0."""
    scale = torch.maximum(a.to(torch.float64).abs(), b.to(torch.float64).abs())
    return ulp(ref, dtype) + 2.0 ** -22 * scale


def max_excess(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, t: float) -> float:
    """max(|out - ref| / bound) over all elements: <= 1 means every element is within the promised bound."""
    ref = lerp_reference(a, b, t)
    bound = error_bound(a, b, ref, out.dtype)
    if out.numel() == 0:
        return 0.0
    return float(((out.to(torch.float64) - ref).abs() / bound).max())
