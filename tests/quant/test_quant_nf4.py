"""nf4: QLoRA codebook, nearest-level mapping with documented ties, layout, round-trip bounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnlab.quant import NF4_CODEBOOK, dequantize, get_format, quantize
from attnlab.quant.nf4 import NF4_MIDPOINTS

CODEBOOK = torch.tensor(NF4_CODEBOOK, dtype=torch.float32)


def _codes(packed: torch.Tensor) -> torch.Tensor:
    """(nb * 34,) -> (nb, 64) codes, reading the documented layout independently of the library."""
    blocks = packed.reshape(-1, 34)[:, 2:].long()
    return torch.cat([blocks & 0xF, blocks >> 4], dim=-1)


def test_codebook_is_qlora_nf4():
    assert len(NF4_CODEBOOK) == 16 and list(NF4_CODEBOOK) == sorted(NF4_CODEBOOK)
    assert NF4_CODEBOOK[0] == -1.0 and NF4_CODEBOOK[7] == 0.0 and NF4_CODEBOOK[15] == 1.0
    assert NF4_CODEBOOK[8] == 0.07958029955625534 and NF4_CODEBOOK[1] == -0.6961928009986877
    assert get_format("nf4").block_size == 64 and get_format("nf4").block_bytes == 34


def test_hand_checked_block():
    x = torch.zeros(64)
    x[0], x[1], x[2], x[3], x[4], x[5] = 1.0, -1.0, 0.5, 0.2, -0.3, 0.04
    x[32], x[33], x[63] = 0.6, -0.6, 0.03
    packed = quantize(x, "nf4")
    assert packed.dtype == torch.uint8 and packed.shape == (34,)
    assert packed[:2].tolist() == [0x00, 0x3C]                    # absmax 1.0 as fp16, little-endian
    # 0.5 < mid(0.4407, 0.5626) = 0.5017 -> 12; 0.2 < mid(0.1609, 0.2461) -> 9; -0.3 > mid(-0.3949, -0.2844)
    # -> 4; 0.04 > mid(0, 0.0796) = 0.0398 -> 8; 0.6 -> 13 (0.5626); -0.6 -> 2 (-0.5251); 0.03 -> 7; 0 -> 7
    codes = _codes(packed)[0]
    assert codes[:6].tolist() == [15, 0, 12, 9, 4, 8]
    assert codes[32].item() == 13 and codes[33].item() == 2 and codes[63].item() == 7
    assert codes[6:32].eq(7).all()
    assert packed[2].item() == 15 | (13 << 4)                     # byte j = code[j] | code[j + 32] << 4
    assert packed[3].item() == 0 | (2 << 4)
    y = dequantize(packed, "nf4", 64)
    assert y[:6].tolist() == CODEBOOK[[15, 0, 12, 9, 4, 8]].tolist()


@pytest.mark.parametrize("scale", [1.0, 2.0, 0.5, 2.0 ** -10, 1024.0])
def test_codebook_values_round_trip_exactly(scale):
    levels = CODEBOOK * scale                                     # scale: a power of two, exact in fp16
    x = torch.cat([levels, levels.flip(0), levels[torch.randperm(16, generator=torch.Generator().manual_seed(0))],
                   levels]).reshape(1, 64)
    packed = quantize(x, "nf4")
    assert torch.equal(dequantize(packed, "nf4", 64), x)
    assert _codes(packed)[0, :16].tolist() == list(range(16))


def test_ties_take_the_lower_level():
    mids = torch.tensor(NF4_MIDPOINTS, dtype=torch.float32)      # the fp32 decision boundaries
    x = torch.zeros(64)
    x[0] = 1.0                                                    # scale 1: x / s == x exactly
    x[1:16] = mids
    x[16:31] = torch.nextafter(mids, torch.full_like(mids, 2.0))  # one ulp above -> upper level
    codes = _codes(quantize(x, "nf4"))[0]
    assert codes[1:16].tolist() == list(range(15))
    assert codes[16:31].tolist() == list(range(1, 16))


def test_nearest_level_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 64 * 4, generator=g) * torch.logspace(-3, 3, 32).unsqueeze(1)
    packed = quantize(x, "nf4")
    blocks = x.reshape(32, 4, 64)
    s = blocks.abs().amax(-1, keepdim=True).half().float()
    v = (blocks / s).reshape(-1, 1)
    dist = (v - CODEBOOK).abs()                                   # (N, 16)
    best = dist.min(-1, keepdim=True).values
    chosen = dist.gather(-1, _codes(packed).reshape(-1, 1))
    assert torch.allclose(chosen, best, rtol=0, atol=1e-6)


def test_round_trip_error_bound():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 640, generator=g) * 10.0 ** torch.empty(8, 3, 1).uniform_(-3, 3, generator=g)
    y = dequantize(quantize(x, "nf4"), "nf4", 640)
    blocks, deq = x.reshape(8, 3, 10, 64), y.reshape(8, 3, 10, 64)
    amax = blocks.abs().amax(-1, keepdim=True)
    half_gap = (CODEBOOK[1:] - CODEBOOK[:-1]).max() / 2           # 0.152: between -1 and -0.696
    assert ((blocks - deq).abs() <= amax * (half_gap + 2.0 ** -10)).all()
    # and the absmax element of every block is reproduced up to fp16 rounding of the scale
    imax = blocks.abs().argmax(-1, keepdim=True)
    assert torch.allclose(deq.gather(-1, imax), blocks.gather(-1, imax), rtol=2.0 ** -11, atol=0)
    rel_rms = ((x - y).pow(2).mean() / x.pow(2).mean()).sqrt()
    assert rel_rms < 0.12


def test_degenerate_blocks():
    x = torch.zeros(2, 128)
    x[1, 64:] = 3.0                                               # zero block, then a constant block
    x[1, :64] = 1e-9                                              # fp16 absmax underflows to 0 -> decodes to 0
    y = dequantize(quantize(x, "nf4"), "nf4", 128)
    assert torch.equal(y[0], torch.zeros(128)) and torch.equal(y[1, :64], torch.zeros(64))
    assert torch.equal(y[1, 64:], torch.full((64,), 3.0))
    big = torch.full((64,), 1e6)                                  # absmax beyond fp16: saturates, no NaN
    yb = dequantize(quantize(big, "nf4"), "nf4", 64)
    assert torch.equal(yb, torch.full((64,), 65504.0))
