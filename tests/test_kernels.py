"""kernels: the blend against float64, across dtypes and odd shapes; overflow detection."""

from __future__ import annotations

import pytest
import torch

from gpumerge.kernels.lerp import lerp_into, lerp_reference, max_excess, new_infs

SHAPES = [(1,), (7,), (4097,), (3, 423, 213)]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [0.0, 0.1, 0.3, 0.5, 0.9, 1.0, 1.25])
def test_lerp_within_one_ulp(shape, dtype, t):
    gen = torch.Generator().manual_seed(1)
    a = (torch.randn(shape, generator=gen) * 4).to(dtype)
    b = (torch.randn(shape, generator=gen) * 4).to(dtype)
    out = torch.empty(shape, dtype=dtype)
    lerp_into(a, b, t, out)
    assert max_excess(out, a, b, t) <= 1.0
    if t == 0.0:
        assert torch.equal(out, a)
    if t == 1.0:
        assert torch.equal(out, b)


@pytest.mark.parametrize("da, db, dout", [(torch.bfloat16, torch.float16, torch.float16),
                                           (torch.float32, torch.float32, torch.float16),
                                           (torch.float16, torch.float16, torch.bfloat16)])
def test_mixed_dtypes_round_once(da, db, dout):
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(4097, generator=gen).to(da)
    b = torch.randn(4097, generator=gen).to(db)
    out = torch.empty(4097, dtype=dout)
    lerp_into(a, b, 0.37, out)
    assert max_excess(out, a, b, 0.37) <= 1.0
    # one rounding: exactly the fp32 lerp rounded once to the output dtype
    assert torch.equal(out, torch.lerp(a.float(), b.float(), 0.37).to(dout))


def test_same_dtype_path_equals_fp32_path():
    """The fused half-precision lerp and the widened path give the same bits (one rounding either way)."""
    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.float16, torch.bfloat16):
        a = torch.randn(100_003, generator=gen).to(dtype)
        b = torch.randn(100_003, generator=gen).to(dtype)
        for t in (0.1, 0.49, 0.5, 0.77):
            fused = torch.empty_like(a)
            lerp_into(a, b, t, fused)
            assert torch.equal(fused, torch.lerp(a.float(), b.float(), t).to(dtype))


def test_reference_is_float64():
    a = torch.tensor([1.0], dtype=torch.float16)
    b = torch.tensor([2.0], dtype=torch.float16)
    assert lerp_reference(a, b, 0.1).dtype == torch.float64
    assert float(lerp_reference(a, b, 0.1)) == 1.0 + 0.1 * 1.0


def test_max_excess_catches_an_error_of_two_ulps():
    a = torch.tensor([1.0, 1.5], dtype=torch.float16)
    b = torch.tensor([2.0, 1.5], dtype=torch.float16)
    out = torch.empty_like(a)
    lerp_into(a, b, 0.5, out)
    out[0] = torch.nextafter(torch.nextafter(out[0], torch.tensor(9.0, dtype=torch.float16)),
                             torch.tensor(9.0, dtype=torch.float16))
    assert max_excess(out, a, b, 0.5) > 1.0


def test_new_infs_counts_only_overflow():
    finite = torch.tensor([1.0, 7e4, 2.0])
    out = finite.to(torch.float16)
    assert new_infs(out, finite) == 1
    already = torch.tensor([float("inf"), 1.0])
    assert new_infs(already.to(torch.float16), already) == 0
    nan_in = torch.tensor([float("nan"), 7e4])
    assert new_infs(nan_in.to(torch.float16), nan_in) == 1
