"""Spherical interpolation per whole tensor, in the usual formula (as mergekit 0.1.5 has it): the angle between
the flattened, normalised tensors; plain lerp when they are nearly colinear.

The per-tensor reductions (|a|^2, |b|^2, a.b) are accumulated in float64 on the host, in fixed chunks and a fixed
pairwise order, so the coefficients do not depend on the machine, the device or how the blend is batched; the
blend itself is then the elementwise ``fma(s1, b, fp32(s0*a))`` in fp32 (kernels.lerp.blend_into with ``coef``,
kernels.exact's definition), so outputs are the same bytes on every machine and device.
"""

from __future__ import annotations

import math

import torch

DOT_THRESHOLD = 0.9995
EPS = 1e-8


class Reductions:
    """Running float64 sums over chunks of a pair of tensors."""

    def __init__(self) -> None:
        self.aa = 0.0
        self.bb = 0.0
        self.ab = 0.0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a64 = a.to(torch.float64)
        b64 = b.to(torch.float64)
        self.aa += fixed_sum(a64 * a64)
        self.bb += fixed_sum(b64 * b64)
        self.ab += fixed_sum(a64 * b64)


def fixed_sum(values: torch.Tensor) -> float:
    """The sum in one fixed pairwise order, made of elementwise additions only (each an IEEE addition, the same on
    every machine): torch.dot's and torch.sum's order depends on the CPU's vector width, which would move the slerp
    angle, and so the output bytes, from one machine to another."""
    flat = values.reshape(-1)
    if flat.numel() == 0:
        return 0.0
    size = 1 << (flat.numel() - 1).bit_length()
    level = torch.zeros(size, dtype=torch.float64, device=flat.device)
    level[:flat.numel()] = flat
    while level.numel() > 1:
        level = level[0::2] + level[1::2]
    return float(level[0])


def coefficients(aa: float, bb: float, ab: float, t: float, *, threshold: float = DOT_THRESHOLD,
                 eps: float = EPS) -> tuple[float, float] | None:
    """(s0, s1) with slerp = s0*a + s1*b, or None when |cos| > threshold (then it is lerp(a, b, t)).
    A tensor whose norm is <= eps is not normalised (as mergekit)."""
    norm_a, norm_b = math.sqrt(aa), math.sqrt(bb)
    dot = ab / ((norm_a if norm_a > eps else 1.0) * (norm_b if norm_b > eps else 1.0))
    if abs(dot) > threshold:
        return None
    theta_0 = math.acos(dot)
    sin_theta_0 = math.sin(theta_0)
    theta_t = theta_0 * t
    return math.sin(theta_0 - theta_t) / sin_theta_0, math.sin(theta_t) / sin_theta_0


def slerp_reference(a: torch.Tensor, b: torch.Tensor, t: float, *, threshold: float = DOT_THRESHOLD,
                    eps: float = EPS) -> torch.Tensor:
    """float64 reference of the whole formula, for tests."""
    a64 = a.to(torch.float64).reshape(-1)
    b64 = b.to(torch.float64).reshape(-1)
    coef = coefficients(float(a64 @ a64), float(b64 @ b64), float(a64 @ b64), t, threshold=threshold, eps=eps)
    if coef is None:
        return (a64 + t * (b64 - a64)).reshape(a.shape)
    return (coef[0] * a64 + coef[1] * b64).reshape(a.shape)
