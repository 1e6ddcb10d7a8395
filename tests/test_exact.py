"""The blend's fp32 arithmetic is defined exactly (kernels.exact) and gives the same bytes on every CPU: checked
against a rational reference on hard cases, and by merging under ATEN_CPU_CAPABILITY=default (no fused
multiply-add) and under this machine's best capability in two processes."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from fractions import Fraction

import pytest
import torch
from conftest import REPO, source_env

from gpumerge.kernels.exact import affine32, fma32, lerp32, native_is_fused, sub32


def f32(value) -> float:
    """Round a Fraction or float to fp32, correctly (via the exact rational: no double rounding)."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return value
    x = Fraction(value)
    if x == 0:
        return 0.0
    candidate = struct.unpack("f", struct.pack("f", float(x)))[0]  # within one fp32 step of the answer
    steps = [candidate]
    for direction in (float("inf"), float("-inf")):
        steps.append(float(torch.nextafter(torch.tensor(candidate, dtype=torch.float32),
                                           torch.tensor(direction, dtype=torch.float32))))
    best = min(steps, key=lambda c: (abs(Fraction(c) - x), struct.unpack("I", struct.pack("f", c))[0] & 1))
    return best


def cases(n: int = 4000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random pairs, plus near-ties, cancellation, extremes, subnormals and zeros of both signs."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, generator=g) * torch.exp2(torch.randint(-30, 30, (n,), generator=g).float())
    b = a + torch.randn(n, generator=g) * torch.exp2(torch.randint(-40, 5, (n,), generator=g).float()) * a.abs()
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1.1754942e-38, 3.4e38, -3.4e38, 1.0, 1.0 + 2**-23, 0.5, 65504.0,
                            6e-8, 2**-149, 1 - 2**-24])
    a = torch.cat([a, special, special.flip(0)])
    b = torch.cat([b, special.flip(0), special])
    return a.float(), b.float()


@pytest.mark.parametrize("t", [0.0, 0.25, 0.45, 0.5, 0.75, 1.0, -0.3, 1.7])
def test_lerp32_is_the_correctly_rounded_fused_formula(t):
    a, b = cases()
    got = lerp32(a, b, t)
    w = f32(t)
    for x, y, r in zip(a.tolist(), b.tolist(), got.tolist()):
        d = f32(Fraction(y) - Fraction(x))
        if d in (float("inf"), float("-inf")):
            continue  # b - a overflows fp32: inf arithmetic, compared below with torch's own
        if abs(w) < 0.5:
            exact = Fraction(w) * Fraction(d) + Fraction(x)
        else:
            exact = Fraction(f32(w - 1)) * Fraction(d) + Fraction(y)
        expected = f32(exact) if abs(exact) <= Fraction(3.4028235677973366e38) else None
        if expected is not None:
            assert r == expected, (x, y, t, r, expected)


def test_fma32_and_sub32_round_once():
    a, b = cases(seed=1)
    c = torch.randn(a.numel(), generator=torch.Generator().manual_seed(2))
    for x, y, z, got_fma, got_sub in zip(a.tolist(), b.tolist(), c.tolist(), fma32(c, a, b).tolist(),
                                         sub32(b, a).tolist()):
        exact_fma = Fraction(z) * Fraction(x) + Fraction(y)
        exact_sub = Fraction(y) - Fraction(x)
        if abs(exact_fma) < Fraction(3.4e38):
            assert got_fma == f32(exact_fma)
        if abs(exact_sub) < Fraction(3.4e38):
            assert got_sub == f32(exact_sub)


def test_affine32_matches_torch_where_torch_fuses():
    if not native_is_fused():
        pytest.skip("this CPU's kernels are not fused")
    a, b = cases(seed=3)
    a, b = a[torch.isfinite(a) & (a.abs() < 1e30)], b[torch.isfinite(b) & (b.abs() < 1e30)]
    n = min(a.numel(), b.numel())
    out = torch.mul(a[:n], 0.37)
    out.add_(b[:n], alpha=0.71)
    assert torch.equal(out, affine32(a[:n], b[:n], (0.37, 0.71)))


def test_this_machines_best_kernels_are_fused():
    """On an x86 CPU with AVX2 (every machine these tests run on), torch's own kernels compute the definition."""
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("no vectorized capability here")
    assert native_is_fused()


_MERGES = r"""
import hashlib, json, sys, shutil
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[3])
from gpu_check import BYTE_CASES, merge, output_bytes
from gpumerge.kernels.exact import native_is_fused
pairs, work = Path(sys.argv[1]), Path(sys.argv[2])
digests = {"fused": native_is_fused(), "capability": torch.backends.cpu.get_cpu_capability()}
for k, (label, _, _, settings) in enumerate(BYTE_CASES):
    out = merge(pairs / f"{k}" / "a", pairs / f"{k}" / "b", work / f"{k}", device="cpu", **settings()).output
    state = output_bytes(out)
    digests[label] = hashlib.sha256(b"".join(state[n][1] for n in sorted(state))).hexdigest()
    shutil.rmtree(out)
print(json.dumps(digests))
"""


def test_the_same_bytes_without_fused_kernels(tmp_path):
    """Every blend path (fp16, bf16, fp32, mixed, slerp, mergekit linear with its rounding steps, a vocabulary
    mismatch) merged from the same files in a process whose CPU kernels do not fuse, and in one whose kernels do:
    the same bytes. (The inputs are written once, here: torch.randn itself differs between CPU capabilities.)"""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_check import BYTE_CASES, write_model

    for k, (_, kwargs_a, kwargs_b, _) in enumerate(BYTE_CASES):
        write_model(tmp_path / "pairs" / f"{k}" / "a", seed=1, **kwargs_a)
        write_model(tmp_path / "pairs" / f"{k}" / "b", seed=2, **kwargs_b)
    runs = {}
    best_here = torch.backends.cpu.get_cpu_capability().lower()
    for capability in ("default", "avx2", None) if best_here == "avx512" else ("default", None):
        env = source_env(**({"ATEN_CPU_CAPABILITY": capability} if capability else {}))
        if capability is None:
            env.pop("ATEN_CPU_CAPABILITY", None)
        proc = subprocess.run([sys.executable, "-c", _MERGES, str(tmp_path / "pairs"), str(tmp_path / str(capability)),
                               str(REPO / "benchmarks")], capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr
        runs[capability] = json.loads(proc.stdout.strip().splitlines()[-1])
    slow = runs.pop("default")
    assert slow.pop("capability") == "DEFAULT" and slow.pop("fused") is False
    for capability, run in runs.items():  # AVX2 and AVX-512 where the machine has it, else its best
        assert run.pop("fused") is True, capability
        run.pop("capability")
        assert run == slow, capability
    assert len(slow) == len(BYTE_CASES)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bytes_equal_cpu_bytes_on_every_path(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_check import BYTE_CASES, merge, output_bytes, write_model

    for k, (label, kwargs_a, kwargs_b, settings) in enumerate(BYTE_CASES):
        a = write_model(tmp_path / f"{k}" / "a", seed=1, **kwargs_a)
        b = write_model(tmp_path / f"{k}" / "b", seed=2, **kwargs_b)
        cpu = output_bytes(merge(a, b, tmp_path / f"{k}" / "cpu", device="cpu", **settings()).output)
        gpu = output_bytes(merge(a, b, tmp_path / f"{k}" / "gpu", device="cuda:0", **settings()).output)
        assert cpu == gpu, label
