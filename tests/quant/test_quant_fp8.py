"""fp8 cache formats against torch's own float8 casts: the codes are the bytes of
``(x / s).to(torch.float8_*)`` with ``s = amax / fp8_max`` per row, the values ``code * s``; the
packed row is the scale's bytes then the codes; zero rows, huge and tiny rows stay finite."""

from __future__ import annotations

import pytest
import torch

from attnlab.quant import dequantize, get_format, planar, quantize, row_bytes
from attnlab.quant.fp8 import FP8_DTYPES, fp8_max

FMTS = list(FP8_DTYPES)


def _rows(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(4, 7, 96, generator=gen) * torch.logspace(-4, 3, 96)  # values over seven decades


@pytest.mark.parametrize("fmt", FMTS)
def test_codes_and_values_are_torchs_float8_cast(fmt):
    x = _rows()
    codes, scales = planar.quantize(x, fmt)
    s = x.abs().amax(-1, keepdim=True) / fp8_max(fmt)
    assert scales.dtype == torch.float32 and torch.equal(scales, s)
    cast = (x / s).to(FP8_DTYPES[fmt])
    assert torch.equal(codes, cast.view(torch.uint8))
    assert torch.equal(planar.dequantize(codes, scales, fmt, 96), cast.to(torch.float32) * s)


@pytest.mark.parametrize("fmt", FMTS)
def test_packed_row_is_the_scale_then_the_codes(fmt):
    x = _rows(1)
    packed = quantize(x, fmt)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == row_bytes(fmt, 96) == 96 + 4
    codes, scales = planar.quantize(x, fmt)
    assert torch.equal(packed[..., 4:], codes)
    assert torch.equal(packed[..., :4].contiguous().view(torch.float32), scales)
    assert torch.equal(dequantize(packed, fmt, 96), planar.dequantize(codes, scales, fmt, 96))
    assert get_format(fmt).row_bytes(1) == 5


@pytest.mark.parametrize("fmt", FMTS)
def test_error_is_bounded_by_the_mantissa(fmt):
    x = _rows(2)
    y = dequantize(quantize(x, fmt), fmt, 96)
    mantissa = torch.finfo(FP8_DTYPES[fmt]).eps  # 2^-3 (e4m3), 2^-2 (e5m2): half of it per rounding
    s = x.abs().amax(-1, keepdim=True) / fp8_max(fmt)
    tiny = torch.finfo(FP8_DTYPES[fmt]).smallest_normal * s  # below: subnormal spacing, absolute
    bound = torch.maximum(x.abs() * mantissa / 2, tiny * mantissa / 2) * (1 + 1e-6)
    assert ((y - x).abs() <= bound).all()
    assert torch.allclose(y.abs().amax(-1), x.abs().amax(-1), rtol=1e-6, atol=0.0)  # to float32 rounding


@pytest.mark.parametrize("fmt", FMTS)
def test_zero_huge_and_tiny_rows(fmt):
    x = torch.stack([torch.zeros(32), torch.full((32,), 3e38), torch.full((32,), 1e-30),
                     torch.linspace(-65504.0, 65504.0, 32)])
    y = dequantize(quantize(x, fmt), fmt, 32)
    assert torch.isfinite(y).all() and torch.equal(y[0], torch.zeros(32))
    assert torch.allclose(y[1:], x[1:], rtol=torch.finfo(FP8_DTYPES[fmt]).eps, atol=0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", FMTS)
def test_cuda_matches_cpu(fmt):
    x = _rows(3)
    for a, b in zip(planar.quantize(x, fmt), planar.quantize(x.cuda(), fmt)):
        assert torch.equal(a, b.cpu())
