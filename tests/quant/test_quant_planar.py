"""The planar (kernel-native) layout of q8_0 / q4_0 / nf4: the same values as the ggml streams
(byte for byte via ``to_ggml``, and against gguf for q8_0/q4_0), invertible, documented layout,
decoding equal to the ggml decoders, on nasty inputs (ties, zeros, -0.0, constant and
all-negative blocks, fp16 scale rounding, huge/tiny magnitudes, rows that are not whole blocks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnlab.quant import dequantize, get_format, quantize
from attnlab.quant import planar
from attnlab.quant.nf4 import NF4_MIDPOINTS

FMTS = ["q8_0", "q4_0", "nf4"]
QK = {"q8_0": 32, "q4_0": 32, "nf4": 64}


def nasty_blocks(qk: int, rng: np.random.Generator) -> np.ndarray:
    """(num_blocks, qk) float32 blocks of the cases block quantizers are sensitive to."""
    blocks = [np.zeros(qk), np.full(qk, -0.0), np.full(qk, 3.3), np.full(qk, -2.5), np.full(qk, 1e4),
              -np.abs(rng.standard_normal(qk)), np.abs(rng.standard_normal(qk)) * 50]
    z = np.zeros(qk)
    z[0] = -0.0
    z[5] = 1e-30
    blocks.append(z)
    for first, second in ((-5.0, 5.0), (5.0, -5.0), (2.0, -2.0)):   # signed-max ties: the first wins
        b = rng.uniform(-1, 1, qk)
        b[3], b[qk - 2] = first, second
        blocks.append(b)
    for m in (-8.0, 8.0, 3.7, -0.123):                               # q4_0: x * id on integers and .5
        d = np.float32(m) / np.float32(-8)
        blocks.append(np.concatenate([[m], d * np.arange(-8, 8, 16 / (qk - 1))[: qk - 1]]))
    for a in (127.0, 3.7, 0.01):                                     # q8_0: multiples of d / 2
        d = np.float32(a) / np.float32(127)
        k = np.concatenate([[127.0], np.arange(qk - 1) * 0.5 - 60.5])
        blocks.append(d * k)
    mids = np.array(NF4_MIDPOINTS, dtype=np.float32)                 # nf4: exactly on the boundaries
    b = np.zeros(qk)
    b[0] = 1.0
    b[1:16] = mids
    b[16:31] = np.nextafter(mids, np.float32(2))
    blocks.append(b)
    blocks.append(np.full(qk, 1e6) * rng.choice([-1, 1], qk))        # nf4 absmax saturates to 65504
    for amax in 10.0 ** rng.uniform(-30, 6, size=12):                # scales over every fp16 binade
        b = rng.standard_normal(qk)
        blocks.append(b * amax / np.abs(b).max())
    h = np.float16(1.0)                                              # amax / 127, / 8: halfway in fp16
    mid = (np.float32(h) + np.float32(np.nextafter(h, np.float16(2)))) / 2
    for factor in (127.0, -8.0, 1.0):
        b = rng.uniform(-1, 1, qk) * abs(mid * factor) * 0.9
        b[7] = mid * factor
        blocks.append(b)
    return np.asarray(blocks, dtype=np.float32)


def rows_for(fmt: str, n: int, seed: int) -> torch.Tensor:
    """(rows, n) float32: random rows at several magnitudes, then nasty blocks cut to length n."""
    rng = np.random.default_rng(seed)
    random = rng.standard_normal((6, n)) * 10.0 ** rng.integers(-4, 5, size=(6, 1))
    flat = nasty_blocks(QK[fmt], rng).reshape(-1)
    flat = np.concatenate([flat, np.zeros(-len(flat) % n)])
    return torch.from_numpy(np.concatenate([random, flat.reshape(-1, n)]).astype(np.float32))


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("n", [1, 20, 32, 40, 64, 100, 1280])
def test_to_ggml_is_the_ggml_stream(fmt, n):
    x = rows_for(fmt, n, seed=n)
    codes, scales = planar.quantize(x, fmt)
    code_bytes, nb = planar.planar_widths(fmt, n)
    assert codes.dtype == torch.uint8 and codes.shape == (x.shape[0], code_bytes)
    assert scales.dtype == torch.float16 and scales.shape == (x.shape[0], nb)
    assert torch.equal(planar.to_ggml(codes, scales, fmt), quantize(x, fmt))


def _gguf():
    return pytest.importorskip("gguf")


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
@pytest.mark.parametrize("n", [20, 32, 96, 1280])
def test_matches_gguf_on_zero_padded_rows(fmt, n):
    g = _gguf()
    qtype = {"q8_0": g.GGMLQuantizationType.Q8_0, "q4_0": g.GGMLQuantizationType.Q4_0}[fmt]
    x = rows_for(fmt, n, seed=100 + n)
    padded = np.zeros((x.shape[0], -(-n // 32) * 32), dtype=np.float32)
    padded[:, :n] = x.numpy()
    with np.errstate(all="ignore"):
        ref = g.quants.quantize(padded, qtype).tobytes()
    ours = planar.to_ggml(*planar.quantize(x, fmt), fmt).numpy().tobytes()
    if ours != ref:
        a = np.frombuffer(ours, np.uint8).reshape(-1, get_format(fmt).block_bytes)
        b = np.frombuffer(ref, np.uint8).reshape(-1, get_format(fmt).block_bytes)
        bad = np.flatnonzero((a != b).any(axis=1))
        pytest.fail(f"{fmt}: {len(bad)} blocks differ from gguf; first {bad[0]}: "
                    f"{padded.reshape(-1, 32)[bad[0]].tolist()}\nours {a[bad[0]].tolist()}\ngguf {b[bad[0]].tolist()}")


@pytest.mark.parametrize("fmt", FMTS)
def test_from_ggml_inverts_to_ggml(fmt):
    g = torch.Generator().manual_seed(0)
    code_bytes, nb = planar.planar_widths(fmt, 200)
    codes = torch.randint(0, 256, (2, 3, code_bytes), dtype=torch.uint8, generator=g)
    scales = torch.randint(0, 256, (2, 3, 2 * nb), dtype=torch.uint8, generator=g).view(torch.float16)  # any bits
    packed = planar.to_ggml(codes, scales, fmt)
    assert packed.shape == (2, 3, get_format(fmt).row_bytes(200))
    c2, s2 = planar.from_ggml(packed, fmt)
    assert torch.equal(c2, codes) and torch.equal(s2.view(torch.int16), scales.view(torch.int16))
    ggml_bytes = quantize(rows_for(fmt, 200, seed=1), fmt)
    assert torch.equal(planar.to_ggml(*planar.from_ggml(ggml_bytes, fmt), fmt), ggml_bytes)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_equals_ggml_decoder(fmt, dtype):
    for n in (20, 64, 100):
        x = rows_for(fmt, n, seed=7 * n)
        codes, scales = planar.quantize(x, fmt)
        ours = planar.dequantize(codes, scales, fmt, n, dtype)
        ref = dequantize(quantize(x, fmt), fmt, n, dtype)
        assert ours.dtype == dtype and ours.shape == x.shape
        same = (ours == ref) | (ours.isnan() & ref.isnan())
        assert same.all() and torch.equal(ours.signbit(), ref.signbit())


def test_documented_byte_layout():
    x = torch.zeros(64)
    x[0], x[1], x[2] = -8.0, 1.0, 3.0                       # block 0: max magnitude -8
    x[32], x[33] = -4.0, 4.0                                # block 1: tie |-4| = |4|, the first wins
    codes, scales = planar.quantize(x, "q4_0")              # d = -8 / -8 = 1 and -4 / -8 = 0.5
    assert scales.tolist() == [1.0, 0.5] and codes.shape == (32,)
    # byte i = code[2i] | code[2i + 1] << 4, code = min(15, trunc(x / d + 8.5))
    assert codes[:2].tolist() == [0 | 9 << 4, 11 | 8 << 4]
    assert codes[16].item() == 0 | 15 << 4                  # 4 / 0.5 + 8.5 = 16.5 clamps to 15
    assert planar.element_codes(codes, "q4_0")[[0, 1, 2, 3, 32, 33]].tolist() == [0, 9, 11, 8, 0, 15]
    codes, scales = planar.quantize(x, "q8_0")              # byte e = int8 code of element e
    q = planar.element_codes(codes, "q8_0")
    assert q.dtype == torch.int8 and q[[0, 32, 33]].tolist() == [-127, -127, 127] and codes[0].item() == 0x81
    assert scales[0].item() == float(np.float16(np.float32(8) / np.float32(127)))
    codes, scales = planar.quantize(x, "nf4")               # one block of 64, absmax 8
    assert scales.tolist() == [8.0] and codes.shape == (32,)
    # x / 8: -1 -> 0, 0.125 -> 9, 0.375 -> 11, 0 -> 7, -0.5 -> 2, 0.5 -> 12 (below the 12/13 midpoint)
    assert codes[[0, 1, 16]].tolist() == [0 | 9 << 4, 11 | 7 << 4, 2 | 12 << 4]


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("n", [1, 31, 32, 33, 64, 65, 256, 1280])
def test_widths(fmt, n):
    code_bytes, nb = planar.planar_widths(fmt, n)
    assert nb == -(-n // QK[fmt]) and code_bytes % 16 == 0
    assert code_bytes + 2 * nb == get_format(fmt).row_bytes(n)   # same bytes as ggml's stream
    codes, scales = planar.quantize(torch.randn(2, n), fmt)
    assert codes.shape[-1] == code_bytes and scales.shape[-1] == nb


def test_leading_dims_and_strided_input():
    base = torch.randn(3, 4, 2, 50)
    x = base.transpose(1, 2)                                # (3, 2, 4, 50) non-contiguous
    for fmt in FMTS:
        codes, scales = planar.quantize(x, fmt)
        c2, s2 = planar.quantize(x.contiguous().reshape(-1, 50), fmt)
        assert torch.equal(codes.reshape(-1, codes.shape[-1]), c2)
        assert torch.equal(scales.reshape(-1, scales.shape[-1]), s2)


def test_errors():
    with pytest.raises(ValueError):
        planar.quantize(torch.randn(4, 32), "fp16")
    with pytest.raises(ValueError):
        planar.planar_widths("q5_0", 32)
    codes, scales = planar.quantize(torch.randn(2, 64), "q4_0")
    with pytest.raises(ValueError):
        planar.to_ggml(codes[:, :-16], scales, "q4_0")
    with pytest.raises(ValueError):
        planar.to_ggml(codes.to(torch.int16), scales, "q4_0")
