"""Microbenchmarks of the blend kernels the merge runs, each writing into a preallocated output buffer.

Run from the repository root (pyproject's testpaths is ``tests``, so a plain ``pytest`` never collects these):

    python -m pytest benchmarks --benchmark-only

Every case moves 16 MiB of output (the CPU engine's batch size), t = 0.3, inputs from a seeded generator; every
case checks its result once against a float64 reference (or the exact definition) before it is timed.
``benchmark.extra_info`` holds the bytes moved (read a + read b + write out; the non-finite check reads ``out``
only) and the GB/s at the median time, printed after the timing table (pytest-benchmark's table has no column for
throughput). No conftest.py here on purpose: a second top-level ``conftest`` module would shadow tests/conftest.py
(``from conftest import ...``) in a run of ``pytest tests benchmarks``.
"""

from __future__ import annotations

import pytest
import torch

from gpumerge.kernels.exact import affine32, lerp32, native_is_fused
from gpumerge.kernels.lerp import affine_reference, blend_into, error_bound, finite, lerp_into, max_excess

T = 0.3
COEF = (0.3, 0.7)
OUT_BYTES = 16 << 20  # 16 MiB of output per case
EXACT_BYTES = 2 << 20  # the exact float64 path is far slower: a smaller output keeps the run short
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
HAS_CUDA = torch.cuda.is_available()


def _inputs(numel: int, dtype_a: torch.dtype, dtype_b: torch.dtype, *, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(numel, generator=g).to(dtype_a)
    b = torch.randn(numel, generator=g).to(dtype_b)
    return a, b


def _numel(dtype: torch.dtype, nbytes: int = OUT_BYTES) -> int:
    return nbytes // torch.empty((), dtype=dtype).element_size()


class _BandwidthReport:
    """Prints the GB/s each benchmark recorded in its user_properties, after pytest-benchmark's tables."""

    @pytest.hookimpl(trylast=True)
    def pytest_terminal_summary(self, terminalreporter):
        rows = [(report.nodeid.split("::")[-1], *value)
                for report in terminalreporter.stats.get("passed", [])
                if report.when == "call"
                for key, value in report.user_properties if key == "GB/s"]
        if not rows:
            return
        terminalreporter.section("bandwidth (bytes = read a + read b + write out, at the median time)")
        width = max(len(name) for name, *_ in rows)
        for name, group, nbytes, gbps in rows:
            terminalreporter.write_line(f"{name:<{width}}  {group:<16} {nbytes / 2**20:6.1f} MiB {gbps:9.2f} GB/s")


@pytest.fixture(scope="module", autouse=True)
def _bandwidth_report(request):
    manager = request.config.pluginmanager
    if not manager.has_plugin("gpumerge-kernel-bandwidth"):
        manager.register(_BandwidthReport(), "gpumerge-kernel-bandwidth")


def _record(benchmark, request, nbytes: int) -> None:
    """Bytes moved per call, and GB/s at the median time (no timing under --benchmark-disable)."""
    benchmark.extra_info["bytes"] = nbytes
    if benchmark.stats is None:
        return
    gbps = nbytes / benchmark.stats.stats.median / 1e9
    benchmark.extra_info["GB/s"] = round(gbps, 2)
    request.node.user_properties.append(("GB/s", (benchmark.group, nbytes, gbps)))


def _moved(*tensors: torch.Tensor) -> int:
    return sum(x.numel() * x.element_size() for x in tensors)


@pytest.mark.parametrize("name", list(DTYPES))
def test_lerp_into_same_dtype(benchmark, request, name):
    """The fused path: one torch.lerp into out (or the exact route where this CPU's kernels do not fuse)."""
    dtype = DTYPES[name]
    a, b = _inputs(_numel(dtype), dtype, dtype)
    out = torch.empty_like(a)
    lerp_into(a, b, T, out)
    assert max_excess(out, a, b, T) <= 1
    benchmark.group = "lerp_into cpu"
    benchmark(lerp_into, a, b, T, out)
    _record(benchmark, request, _moved(a, b, out))


def test_lerp_into_mixed_dtype(benchmark, request):
    """a bf16, b fp16 -> out fp16: widened into three preallocated fp32 scratch buffers, blended, rounded once."""
    a, b = _inputs(_numel(torch.float16), torch.bfloat16, torch.float16)
    out = torch.empty_like(b)
    scratch = tuple(torch.empty(out.shape, dtype=torch.float32) for _ in range(3))
    lerp_into(a, b, T, out, scratch=scratch)
    assert max_excess(out, a, b, T) <= 1
    benchmark.group = "lerp_into cpu"
    benchmark(lerp_into, a, b, T, out, scratch=scratch)
    _record(benchmark, request, _moved(a, b, out))


def test_blend_into_coef_fp16(benchmark, request):
    """The linear / slerp-coefficient path: coef[0]*a + coef[1]*b in fp32 scratch, rounded once to fp16."""
    a, b = _inputs(_numel(torch.float16), torch.float16, torch.float16)
    out = torch.empty_like(a)
    scratch = tuple(torch.empty(out.shape, dtype=torch.float32) for _ in range(3))
    blend_into(a, b, out, t=T, coef=COEF, scratch=scratch)
    # bit for bit the exact definition, and within the promised bound of the float64 reference
    assert torch.equal(out, affine32(a, b, COEF).to(torch.float16))
    ref = affine_reference(a, b, COEF)
    assert bool(((out.to(torch.float64) - ref).abs() <= error_bound(a, b, ref, torch.float16)).all())
    benchmark.group = "blend_into cpu"
    benchmark(blend_into, a, b, out, t=T, coef=COEF, scratch=scratch)
    _record(benchmark, request, _moved(a, b, out))


def test_finite_aminmax(benchmark, request):
    """The non-finite check on a 16 MiB fp16 output (one aminmax): reads out only."""
    a, b = _inputs(_numel(torch.float16), torch.float16, torch.float16)
    out = torch.empty_like(a)
    lerp_into(a, b, T, out)
    assert finite(out) is True
    bad = out.clone()
    bad[bad.numel() // 2] = float("nan")
    assert finite(bad) is False
    del bad
    benchmark.group = "finite cpu"
    result = benchmark(finite, out)
    assert result is True
    _record(benchmark, request, _moved(out))


def test_exact_lerp32_fp16(benchmark, request):
    """The exact (non-FMA-hardware) float64 route, kernels.exact.lerp32, on a 2 MiB fp16 output: what a CPU without
    fused kernels pays (compare with lerp_into cpu fp16 per byte)."""
    a, b = _inputs(_numel(torch.float16, EXACT_BYTES), torch.float16, torch.float16)
    out = torch.empty_like(a)

    def run():
        return out.copy_(lerp32(a, b, T))

    run()
    assert max_excess(out, a, b, T) <= 1
    if native_is_fused():  # then torch's own kernel computes the same definition
        assert torch.equal(out, torch.lerp(a, b, T))
    benchmark.group = "exact lerp32 cpu"
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    _record(benchmark, request, _moved(a, b, out))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("name", list(DTYPES))
def test_lerp_into_cuda(benchmark, request, name):
    dtype = DTYPES[name]
    a_cpu, b_cpu = _inputs(_numel(dtype), dtype, dtype)
    a, b = a_cpu.to("cuda"), b_cpu.to("cuda")
    out = torch.empty_like(a)

    def run():
        lerp_into(a, b, T, out)
        torch.cuda.synchronize()

    run()
    assert max_excess(out.cpu(), a_cpu, b_cpu, T) <= 1
    benchmark.group = "lerp_into cuda"
    benchmark.pedantic(run, rounds=50, iterations=1, warmup_rounds=3)
    _record(benchmark, request, _moved(a, b, out))
