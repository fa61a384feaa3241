"""quantize/dequantize dispatch: every format, padding, shapes, dtypes, byte accounting, errors, CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnlab.quant import FORMATS, dequantize, get_format, quantize, row_bytes, storage_dtype

ALL = list(FORMATS)
PACKED = [f for f in ALL if FORMATS[f].quantized]
# worst-case |x - dequantize(quantize(x))| relative to the row's absmax, generous
TOLERANCE = {"fp64": 0.0, "fp32": 0.0, "fp16": 1e-3, "bf16": 8e-3, "q8_0": 5e-3, "q4_0": 0.13, "nf4": 0.16,
             "fp8_e4m3": 0.0625, "fp8_e5m2": 0.125}


def _rows(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fmt", ALL)
@pytest.mark.parametrize("n", [1, 20, 31, 32, 33, 40, 64, 100, 4096])
def test_byte_accounting(fmt, n):
    packed = quantize(_rows(3, n), fmt)
    assert packed.dtype == storage_dtype(fmt)
    assert packed.shape[:-1] == (3,)
    assert packed.shape[-1] * packed.element_size() == get_format(fmt).row_bytes(n) == row_bytes(fmt, n)
    assert dequantize(packed, fmt, n).shape == (3, n)


@pytest.mark.parametrize("fmt", ALL)
def test_every_format_round_trips(fmt):
    x = _rows(4, 256)
    y = dequantize(quantize(x, fmt), fmt, 256)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert ((x - y).abs() <= TOLERANCE[fmt] * x.abs().amax(-1, keepdim=True)).all()


def test_float_formats_are_casts():
    x = _rows(2, 5, 48)
    assert torch.equal(dequantize(quantize(x, "fp32"), "fp32", 48), x)
    for fmt, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        packed = quantize(x, fmt)
        assert packed.dtype == dtype and torch.equal(packed, x.to(dtype))
        assert torch.equal(dequantize(packed, fmt, 48), x.to(dtype).float())
        assert dequantize(packed, fmt, 48, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("fmt", PACKED)
@pytest.mark.parametrize("n", [20, 40])
def test_padding_round_trip(fmt, n):
    x = _rows(3, n, seed=n)
    block = get_format(fmt).block_size
    padded = torch.nn.functional.pad(x, (0, -(-n // block) * block - n))
    packed = quantize(x, fmt)
    assert torch.equal(packed, quantize(padded, fmt))            # padding is zeros, quantized like ggml
    y = dequantize(packed, fmt, n)
    assert y.shape == (3, n)
    assert torch.equal(y, dequantize(packed, fmt, padded.shape[-1])[..., :n])


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
@pytest.mark.parametrize("n", [20, 40])
def test_padded_rows_match_gguf(fmt, n):
    gguf = pytest.importorskip("gguf")
    qtype = getattr(gguf.GGMLQuantizationType, fmt.upper())
    x = _rows(3, n, seed=n)
    padded = np.zeros((3, -(-n // 32) * 32), dtype=np.float32)
    padded[:, :n] = x.numpy()
    assert quantize(x, fmt).numpy().tobytes() == gguf.quants.quantize(padded, qtype).tobytes()


@pytest.mark.parametrize("fmt", ALL)
def test_shape_generality(fmt):
    x = _rows(2, 3, 96, seed=7)                                   # (B, T, row)
    packed = quantize(x, fmt)
    assert packed.shape[:2] == (2, 3)
    per_row = torch.stack([quantize(r, fmt) for r in x.reshape(6, 96)]).reshape(packed.shape)
    assert torch.equal(packed, per_row)
    y = dequantize(packed, fmt, 96)
    assert y.shape == (2, 3, 96)
    assert torch.equal(y.reshape(6, 96)[4], dequantize(quantize(x.reshape(6, 96)[4], fmt), fmt, 96))
    # 4-D and a non-contiguous input
    x4 = _rows(2, 2, 3, 64, seed=8)
    assert torch.equal(quantize(x4.transpose(1, 2), fmt), quantize(x4.transpose(1, 2).contiguous(), fmt))
    # empty leading dims (an empty chunk of cache rows)
    empty = quantize(torch.zeros(2, 0, 96), fmt)
    assert empty.shape == (2, 0, row_bytes(fmt, 96) // empty.element_size())
    assert dequantize(empty, fmt, 96).shape == (2, 0, 96)


@pytest.mark.parametrize("fmt", PACKED)
def test_dequantize_noncontiguous_slice(fmt):
    """Reading positions start:end of a (B, capacity, row_bytes) store, as the cache does."""
    x = _rows(2, 10, 80, seed=9)
    store = quantize(x, fmt)
    chunk = store[:, 3:7]
    assert not chunk.is_contiguous()
    assert torch.equal(dequantize(chunk, fmt, 80), dequantize(store, fmt, 80)[:, 3:7])


@pytest.mark.parametrize("fmt", ALL)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_input_and_output_dtypes(fmt, dtype):
    x = _rows(3, 64, seed=10).to(dtype)
    packed = quantize(x, fmt)
    assert torch.equal(packed, quantize(x.float(), fmt))          # fp16/bf16 widen exactly
    y = dequantize(packed, fmt, 64, dtype=dtype)
    assert y.dtype == dtype
    assert torch.equal(y, dequantize(packed, fmt, 64).to(dtype))


def test_unknown_format_is_named():
    x = _rows(2, 32)
    with pytest.raises(ValueError, match="q3_k"):
        quantize(x, "q3_k")
    with pytest.raises(ValueError, match="int4"):
        dequantize(torch.zeros(2, 18, dtype=torch.uint8), "int4", 32)
    with pytest.raises(ValueError, match="fp8"):
        row_bytes("fp8", 32)


def test_bad_inputs():
    with pytest.raises(ValueError, match="q4_0"):
        dequantize(torch.zeros(2, 17, dtype=torch.uint8), "q4_0", 32)   # wrong width
    with pytest.raises(ValueError, match="uint8"):
        dequantize(torch.zeros(2, 34), "q8_0", 32)                      # not bytes
    with pytest.raises(ValueError, match="fp16"):
        dequantize(torch.zeros(2, 31, dtype=torch.float16), "fp16", 32)
    with pytest.raises(ValueError, match="floating"):
        quantize(torch.zeros(2, 32, dtype=torch.int32), "q8_0")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ALL)
def test_cuda_matches_cpu_bit_for_bit(fmt):
    g = torch.Generator().manual_seed(11)
    scales = 10.0 ** torch.empty(64, 1).uniform_(-6, 5, generator=g)
    x = torch.randn(64, 4096, generator=g) * scales
    x[0] = torch.arange(4096) % 17 - 8.0                          # exact ties
    x[1, :32] = torch.linspace(-1, 1, 32) * 127 / 127.5           # round-half cases for q8_0
    x[2, :64] = 0.0
    x = x.reshape(4, 16, 4096)
    cpu = quantize(x, fmt)
    gpu = quantize(x.cuda(), fmt)
    assert gpu.device.type == "cuda"
    assert torch.equal(gpu.cpu(), cpu)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(dequantize(gpu, fmt, 4096, dtype).cpu(), dequantize(cpu, fmt, 4096, dtype))
    odd = _rows(2, 3, 40).cuda()                                  # padded rows on CUDA
    assert torch.equal(dequantize(quantize(odd, fmt), fmt, 40).cpu(), dequantize(quantize(odd.cpu(), fmt), fmt, 40))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_cuda_matches_gguf(fmt):
    gguf = pytest.importorskip("gguf")
    qtype = getattr(gguf.GGMLQuantizationType, fmt.upper())
    rng = np.random.default_rng(12)
    rows = (rng.standard_normal((256, 1024)) * 10.0 ** rng.uniform(-6, 5, size=(256, 1))).astype(np.float32)
    rows[0] = (rng.integers(-16, 17, size=1024) / 2.0).astype(np.float32)
    with np.errstate(all="ignore"):
        ref = gguf.quants.quantize(rows, qtype).tobytes()
    assert quantize(torch.from_numpy(rows).cuda(), fmt).cpu().numpy().tobytes() == ref
