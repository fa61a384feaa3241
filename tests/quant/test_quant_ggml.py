"""q8_0 / q4_0: byte-exact with gguf.quants (ggml's reference arithmetic), and error bounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnlab.quant import dequantize, quantize

gguf = pytest.importorskip("gguf")
QTYPES = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}
FMTS = list(QTYPES)


def _oracle_bytes(rows: np.ndarray, fmt: str) -> bytes:
    with np.errstate(all="ignore"):
        return gguf.quants.quantize(np.ascontiguousarray(rows, dtype=np.float32), QTYPES[fmt]).tobytes()


def _ours_bytes(rows: np.ndarray, fmt: str) -> bytes:
    return quantize(torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)), fmt).numpy().tobytes()


def _assert_same_bytes(rows: np.ndarray, fmt: str) -> None:
    ours, ref = _ours_bytes(rows, fmt), _oracle_bytes(rows, fmt)
    if ours != ref:
        block_bytes = 34 if fmt == "q8_0" else 18
        a = np.frombuffer(ours, np.uint8).reshape(-1, block_bytes)
        b = np.frombuffer(ref, np.uint8).reshape(-1, block_bytes)
        bad = np.flatnonzero((a != b).any(axis=1))
        values = rows.reshape(-1, 32)[bad[0]]
        pytest.fail(f"{fmt}: {len(bad)} blocks differ from gguf; first block {bad[0]}: values {values.tolist()}\n"
                    f"ours {a[bad[0]].tolist()}\ngguf {b[bad[0]].tolist()}")


def _tie_block_q4_0(m: float) -> np.ndarray:
    """Block whose largest magnitude is ``m``, the rest exact multiples and half-multiples of d = m / -8."""
    d = np.float32(m) / np.float32(-8)
    k = np.arange(-8, 8, 0.5, dtype=np.float32)[:31]  # x * id lands on integers and on .5 boundaries
    return np.concatenate([[np.float32(m)], d * k]).astype(np.float32)


def _tie_block_q8_0(amax: float) -> np.ndarray:
    d = np.float32(amax) / np.float32(127)
    k = np.array([127, -127, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 126.5, -126.5, 63.5, -63.5, 0.49999997, -0.49999997,
                  1.4999999, 3, -3, 100.5, -100.5, 0.25, -0.75, 7.5, -7.5, 8.5, -8.5, 9.5, 11.5, -13.5, 15.5,
                  31.5, -64.5, 99], dtype=np.float32)
    return (d * k).astype(np.float32)


def _edge_blocks(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Named (num_blocks, 32) float32 arrays covering the cases ggml's arithmetic is sensitive to."""
    cases: dict[str, list[np.ndarray]] = {}
    cases["zeros"] = [np.zeros(32)]
    cases["constant"] = [np.full(32, c) for c in (3.3, -2.5, 1.0, -1e-3, 7.0, 1e4)]
    cases["all_negative"] = [-np.abs(rng.standard_normal(32)) * s for s in (1e-3, 1.0, 50.0)]
    cases["all_positive"] = [np.abs(rng.standard_normal(32)) * s for s in (1e-3, 1.0, 50.0)]
    signs = rng.choice([-1.0, 1.0], size=(8, 32))
    cases["mixed_magnitudes"] = list(signs * 10.0 ** rng.uniform(-4, 4, size=(8, 32)))
    tie = []
    for neg_first in (True, False):
        for mag in (5.0, 0.37, 123.456, 1.0):
            b = rng.uniform(-mag / 2, mag / 2, size=32)
            first, second = (-mag, mag) if neg_first else (mag, -mag)
            b[3], b[20] = first, second
            tie.append(b)
    b = np.zeros(32)
    b[0], b[31] = 2.0, -2.0
    tie.append(b)
    b = np.full(32, -4.0)
    b[7] = 4.0
    tie.append(b)
    cases["max_tie_sign"] = tie
    cases["exact_ties_q4_0"] = [_tie_block_q4_0(m) for m in (-8.0, 8.0, 1.0, -1.0, 3.7, -3.7, 0.123, 1e3, -77.7)]
    cases["exact_ties_q8_0"] = [_tie_block_q8_0(a) for a in (127.0, 1.0, 3.7, 0.01, 1e3, 2.0 ** -5)]
    # fp16 scale rounding: amax spread over every fp16 binade incl. subnormal d, d -> 0, d -> inf
    amax = 10.0 ** rng.uniform(-9, 6.5, size=96)
    scale = []
    for a in amax:
        b = rng.standard_normal(32)
        b *= a / np.abs(b).max()
        scale.append(b)
    # amax / 127 and amax / 8 landing exactly halfway between two fp16 values
    for base in (1.0, 0.25, 3.0, 1e-3):
        h = np.float16(base)
        mid = (np.float32(h) + np.float32(np.nextafter(h, np.float16(np.inf)))) / 2
        for factor in (127.0, -8.0, 8.0):
            b = rng.uniform(-1, 1, size=32) * abs(mid * factor) * 0.9
            b[5] = mid * factor
            scale.append(b)
    cases["fp16_scale_rounding"] = scale
    return {name: np.asarray(blocks, dtype=np.float32).reshape(-1, 32) for name, blocks in cases.items()}


EDGE_NAMES = list(_edge_blocks(np.random.default_rng(0)))


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("n", [32, 64, 96, 4096])
def test_random_rows_match_gguf(fmt, n):
    rng = np.random.default_rng(n)
    rows = rng.standard_normal((7, n)).astype(np.float32)
    rows *= np.float32(10.0) ** rng.integers(-3, 4, size=(7, 1)).astype(np.float32)
    _assert_same_bytes(rows, fmt)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("case", EDGE_NAMES)
def test_edge_blocks_match_gguf(fmt, case):
    blocks = _edge_blocks(np.random.default_rng(1))[case]
    _assert_same_bytes(blocks.reshape(1, -1), fmt)        # all blocks in one row
    _assert_same_bytes(blocks, fmt)                       # one block per row


@pytest.mark.parametrize("fmt", FMTS)
def test_fuzz_many_blocks_match_gguf(fmt):
    rng = np.random.default_rng(2)
    n_blocks = 4000
    kind = rng.integers(0, 4, size=(n_blocks, 1))
    scale = 10.0 ** rng.uniform(-6, 5, size=(n_blocks, 1))
    normal = rng.standard_normal((n_blocks, 32))
    uniform = rng.uniform(-1, 1, (n_blocks, 32))
    grid = rng.integers(-16, 17, size=(n_blocks, 32)) / 2.0          # many exact ties
    heavy = rng.standard_cauchy((n_blocks, 32))
    blocks = np.choose(kind, [normal, uniform, grid, heavy]) * scale
    _assert_same_bytes(blocks.astype(np.float32).reshape(40, -1), fmt)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("case", ["random", *EDGE_NAMES])
def test_dequantize_matches_gguf(fmt, case):
    if case == "random":
        rows = np.random.default_rng(3).standard_normal((5, 4096)).astype(np.float32)
    else:
        rows = _edge_blocks(np.random.default_rng(1))[case].reshape(1, -1)
    n = rows.shape[-1]
    packed = quantize(torch.from_numpy(rows), fmt)
    ours = dequantize(packed, fmt, n).numpy()
    with np.errstate(all="ignore"):
        ref = gguf.quants.dequantize(gguf.quants.quantize(rows, QTYPES[fmt]), QTYPES[fmt])
    np.testing.assert_array_equal(ours, ref)  # NaN (inf scale * 0) compares equal to NaN


@pytest.mark.parametrize("fmt", FMTS)
def test_block_layout(fmt):
    """First two bytes of a block are fp16(d) little-endian; then int8 quants / packed nibbles."""
    x = torch.zeros(32)
    x[0], x[16], x[1] = -8.0, 4.0, 1.0      # q4_0: d = 1 ; q8_0: d = 8 / 127
    packed = quantize(x, fmt)
    if fmt == "q4_0":
        assert packed[:2].tolist() == [0x00, 0x3C]                # fp16(1.0) = 0x3C00
        assert packed[2].item() == 0 | (12 << 4)                  # x[0] -> 0, x[16] -> 12
        assert packed[3].item() == 9 | (8 << 4)                   # x[1] -> 9, x[17] = 0 -> 8
        assert packed.shape == (18,)
    else:
        d = np.float16(np.float32(8.0) / np.float32(127))
        assert bytes(packed[:2].tolist()) == d.tobytes()
        q = packed[2:].view(torch.int8)
        assert q[0].item() == -127 and q[16].item() == 64 and q[1].item() == 16
        assert packed.shape == (34,)


def test_q8_0_error_bound():
    rng = np.random.default_rng(4)
    rows = (rng.standard_normal((16, 256)) * 10.0 ** rng.uniform(-3, 3, size=(16, 1))).astype(np.float32)
    x = torch.from_numpy(rows)
    y = dequantize(quantize(x, "q8_0"), "q8_0", 256)
    blocks = x.reshape(16, -1, 32)
    d32 = blocks.abs().amax(-1, keepdim=True) / 127
    d16 = d32.half().float()
    q = (y.reshape(16, -1, 32) / d16).round()
    # |x - q d16| <= |x - q d32| + |q| |d32 - d16|, and |x - q d32| <= d32 / 2 (+ fp32 rounding of x * id)
    bound = d32 / 2 * (1 + 1e-5) + q.abs() * (d32 - d16).abs()
    assert ((blocks - y.reshape(16, -1, 32)).abs() <= bound).all()
    # with an exactly representable scale the bound is exactly d / 2
    z = torch.from_numpy(rng.uniform(-127, 127, size=(4, 64)).astype(np.float32))
    z[:, 0], z[:, 32] = 127.0, -127.0                             # d = 1
    assert ((z - dequantize(quantize(z, "q8_0"), "q8_0", 64)).abs() <= 0.5).all()


def test_q4_0_error_bound_except_clamped_top_code():
    rng = np.random.default_rng(5)
    x = torch.from_numpy((rng.standard_normal((16, 256)) * 10.0 ** rng.uniform(-3, 3, size=(16, 1))).astype(np.float32))
    y = dequantize(quantize(x, "q4_0"), "q4_0", 256)
    blocks, deq = x.reshape(16, -1, 32), y.reshape(16, -1, 32)
    imax = blocks.abs().argmax(-1, keepdim=True)
    d32 = blocks.gather(-1, imax) / -8
    d16 = d32.half().float()
    v = blocks / d32                                              # in [-8, 8]; m maps to -8
    clamped = v + 8.5 >= 16                                       # opposite-sign values near |m|
    err = (blocks - deq).abs()
    slack = 8 * (d32 - d16).abs() + d32.abs() * 1e-5
    assert (err[~clamped] <= (d32.abs() / 2 + slack).expand_as(err)[~clamped]).all()
    assert (err[clamped] <= (d32.abs() + slack).expand_as(err)[clamped]).all()
    assert clamped.any()                                          # the clamped case was exercised
