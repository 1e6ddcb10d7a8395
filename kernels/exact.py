"""The blend's fp32 arithmetic, defined exactly, so that every machine gives the same bytes.

torch's vectorized CPU kernels (AVX2, AVX-512) and its CUDA kernels compute ``lerp`` and ``add(alpha=)`` with one
fused multiply-add in fp32; the scalar CPU path (``ATEN_CPU_CAPABILITY=default``, x86 CPUs without AVX2) rounds the
product and the sum separately, and differs in ~0.6 % of fp16 elements. The definition gpumerge promises is the
fused one:

    lerp(a, b, t):   d = fp32(b - a);  |t| < 0.5 ? fma(t, d, a) : fma(t - 1, d, b)      (t as fp32, t - 1 in fp32)
    affine(a, b, c): fma(c1, b, fp32(c0 * a))                                          (c0, c1 as fp32)

then one rounding to the output dtype. Where torch's own kernel computes exactly this (probed once per process on
inputs where the two differ), it is used as it is; elsewhere the functions here compute it exactly in float64: the
products of two fp32 values are exact there, and each sum is rounded to fp32 through float64 with "round to odd"
(the error of the float64 sum, from TwoSum, decides the last bit), which makes the double rounding correct
(53 >= 24 + 2 bits). Written by hand: no library offers a correctly rounded fp32 FMA for tensors on a CPU.
"""

from __future__ import annotations

import functools

import torch


def _round_to_odd(total: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
    """``total`` (float64, the nearest to an exact sum) moved to the float64 neighbour with an odd last bit when the
    sum was not exact and ``total``'s last bit is even, toward the exact value. Then its rounding to fp32 is the
    correct rounding of the exact sum."""
    bits = total.view(torch.int64)
    inexact = (error != 0) & ((bits & 1) == 0) & torch.isfinite(total)
    toward = torch.where(error > 0, torch.full_like(total, float("inf")), torch.full_like(total, float("-inf")))
    return torch.where(inexact, torch.nextafter(total, toward), total)


def _sum32(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The correctly rounded fp32 of x + y, for float64 x and y whose sum float64 may round (TwoSum gives the
    error exactly)."""
    total = x + y
    y_part = total - x
    error = (x - (total - y_part)) + (y - y_part)
    return _round_to_odd(total, error).to(torch.float32)


def sub32(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """fp32(b - a), correctly rounded, for fp32 (or narrower) tensors."""
    return _sum32(b.to(torch.float64), -a.to(torch.float64))


def fma32(c: torch.Tensor | float, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """fp32(c * x + y) with one rounding, for fp32 values: the product is exact in float64."""
    c64 = c.to(torch.float64) if isinstance(c, torch.Tensor) else c
    return _sum32(c64 * x.to(torch.float64), y.to(torch.float64))


def _fp32(value: float) -> float:
    return float(torch.tensor(value, dtype=torch.float32))


def lerp32(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """torch.lerp's fused formula in fp32, exactly, for a scalar weight ``t`` (a and b fp32 or narrower)."""
    w = _fp32(t)
    d = sub32(b, a)
    if abs(w) < 0.5:
        return fma32(w, d, a.to(torch.float32))
    return fma32(_fp32(w - 1.0), d, b.to(torch.float32))  # w - 1 is exact in float64: one rounding to fp32


def affine32(a: torch.Tensor, b: torch.Tensor, coef: tuple[float, float]) -> torch.Tensor:
    """torch.mul(a, c0) then add_(b, alpha=c1) with the fused add, exactly: fma(c1, b, fp32(c0 * a))."""
    scaled = (a.to(torch.float32) * _fp32(coef[0]))  # one rounding on every machine
    return fma32(_fp32(coef[1]), b.to(torch.float32), scaled)


@functools.cache
def native_is_fused() -> bool:
    """Does this process's CPU torch.lerp and add(alpha=) compute the fused definition? Probed once on inputs
    where the fused and the unfused results differ (~0.6 % of random fp16 pairs, ~0.01 % of fp32 ones)."""
    g = torch.Generator().manual_seed(1234)
    a = torch.randn(1 << 16, generator=g)
    b = torch.randn(1 << 16, generator=g)
    for t in (0.3, 0.7):
        if not torch.equal(torch.lerp(a, b, t), lerp32(a, b, t)):
            return False
        ah, bh = a.half(), b.half()
        if not torch.equal(torch.lerp(ah, bh, t), lerp32(ah, bh, t).half()):
            return False
    mixed = torch.mul(a, _fp32(0.37))
    mixed.add_(b, alpha=_fp32(0.71))
    return torch.equal(mixed, affine32(a, b, (0.37, 0.71)))


def needs_exact(tensor: torch.Tensor) -> bool:
    """The exact float64 route is needed for this tensor's device: a CPU whose kernels are not fused."""
    return tensor.device.type == "cpu" and not native_is_fused()
