"""Fused quantize-on-write kernel vs its torch reference vs a per-token oracle built on
``planar.quantize`` / ``Tensor.to``, compared bit for bit over every tensor the write may touch
(storage, scales, ring, ring positions; untouched bytes must keep their sentinel values): every
format, mixed formats in one launch, T = 1 and T > 1, per-sequence offsets and valid counts,
positions beyond capacity, rings smaller than the chunk, strided inputs, values that stress
rounding. Without CUDA the kernel runs in Triton's CPU interpreter (conftest.py); with CUDA the
same cases run compiled, plus CUDA-graph capture and a model-sized layer.

Timing on a GPU: ``python tests/kernels/test_kernels_cache_write.py``."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'attnlab[test]')")

from attnlab.kernels import cache_write as cw  # noqa: E402
from attnlab.quant import planar  # noqa: E402
from attnlab.quant.nf4 import NF4_MIDPOINTS  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")
ALL = ["fp32", "fp16", "bf16", "q8_0", "q4_0", "nf4"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------ helpers
def make_targets(fields, batch, cap, ring=0, ring_dtype=torch.float32, seed=0, device=DEVICE):
    """fields: [(format, n)]. Storage, scales and rings filled with random sentinel bits."""
    g = torch.Generator().manual_seed(seed)

    def junk(shape, dtype):
        bits = torch.randint(0, 256, (*shape, torch.empty(0, dtype=dtype).element_size()), dtype=torch.uint8,
                             generator=g)
        return bits.view(dtype).squeeze(-1).to(device)

    targets = []
    for fmt, n in fields:
        r = junk((batch, ring, n), ring_dtype) if ring else None
        if fmt in DTYPES:
            targets.append(cw.WriteTarget(fmt, data=junk((batch, cap, n), DTYPES[fmt]), ring=r))
        else:
            code_bytes, nb = planar.planar_widths(fmt, n)
            targets.append(cw.WriteTarget(fmt, codes=junk((batch, cap, code_bytes), torch.uint8),
                                          scales=junk((batch, cap, nb), torch.float16), ring=r))
    positions = torch.full((batch, max(ring, 1)), -7, dtype=torch.long, device=device) if ring else None
    return targets, positions


def oracle(targets, rows, offsets, valid, positions):
    """Expected state, token by token: planar.quantize / .to of each row, on the CPU."""
    targets = [cw.WriteTarget(t.format, *(None if x is None else x.cpu().clone()
                                          for x in (t.data, t.codes, t.scales, t.ring))) for t in targets]
    positions = None if positions is None else positions.cpu().clone()
    for i, (tg, x) in enumerate(zip(targets, rows)):
        x = x.cpu()
        x = x.flatten(2) if x.ndim == 4 else x
        batch, t_len, _ = x.shape
        store = tg.data if tg.data is not None else tg.codes
        for b in range(batch):
            n_valid = min(int(valid[b]), t_len)
            for t in range(n_valid):
                pos = int(offsets[b]) + t
                if 0 <= pos < store.shape[1]:
                    if tg.data is not None:
                        tg.data[b, pos] = x[b, t].to(tg.data.dtype)
                    else:
                        tg.codes[b, pos], tg.scales[b, pos] = planar.quantize(x[b, t], tg.format)
                if tg.ring is not None and t >= n_valid - tg.ring.shape[1]:
                    tg.ring[b, pos % tg.ring.shape[1]] = x[b, t].to(tg.ring.dtype)
                    if positions is not None:
                        positions[b, pos % tg.ring.shape[1]] = pos
    return targets, positions


def _bits(t):
    if t is None:
        return None
    t = t.cpu()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_same(got, want, positions_got, positions_want, label):
    for i, (a, b) in enumerate(zip(got, want)):
        for name in ("data", "codes", "scales", "ring"):
            x, y = _bits(getattr(a, name)), _bits(getattr(b, name))
            if x is None:
                assert y is None
                continue
            if not torch.equal(x, y):
                bad = (x != y).nonzero()[:5].tolist()
                pytest.fail(f"{label}: field {i} ({a.format}) {name} differs at {bad} "
                            f"({(x != y).sum().item()} elements)")
    if positions_want is not None:
        assert torch.equal(positions_got.cpu(), positions_want), f"{label}: ring positions differ"


def check(fields, rows, offsets, valid, *, cap, ring=0, ring_dtype=torch.float32, seed=0):
    """Kernel, reference and oracle from the same sentinel state; all three must agree bitwise."""
    offsets = torch.as_tensor(offsets, device=DEVICE)
    valid = torch.as_tensor(valid, device=DEVICE)
    batch = offsets.shape[0]
    kernel_t, kernel_p = make_targets(fields, batch, cap, ring, ring_dtype, seed)
    assert cw.unsupported_reason(kernel_t, rows) is None
    ref_t, ref_p = copy.deepcopy(kernel_t), None if kernel_p is None else kernel_p.clone()
    want_t, want_p = oracle(kernel_t, rows, offsets.cpu(), valid.cpu(), kernel_p)
    cw.write_fields(kernel_t, rows, offsets, valid, ring_positions=kernel_p)
    cw.write_fields_reference(ref_t, rows, offsets, valid, ring_positions=ref_p)
    assert_same(ref_t, want_t, ref_p, want_p, "reference")
    assert_same(kernel_t, want_t, kernel_p, want_p, "kernel")
    return kernel_t


def randn(*shape, seed=0, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    mags = 10.0 ** torch.randint(-3, 4, (*shape[:-1], 1), generator=g).float()
    return (torch.randn(*shape, generator=g) * mags * scale).to(dtype).to(DEVICE)


def nasty_rows(n: int, seed: int) -> torch.Tensor:
    """(rows, n) float32, n a multiple of 64: 64-value pieces (whole q8_0/q4_0 and nf4 blocks)
    that stress the quantizers' rounding, every piece used once."""
    assert n % 64 == 0
    rng = np.random.default_rng(seed)

    def two(a, b):                                               # two 32-blocks -> one 64-piece
        return np.concatenate([a, b])

    d127 = np.float32(127) / np.float32(127)                     # q8_0 with d = 1: x * id == x
    k = np.array([127, 0.49999997, -0.49999997, 1.4999999, 0.5, -0.5, 2.5, -2.5, 126.5, -126.5, 63.5, 3, -3, 7.5,
                  -7.5, 8.5, 0.25, -0.75, 100.5, 31.5] + [0] * 12, dtype=np.float32)
    pieces = [np.zeros(64), np.full(64, -0.0), np.full(64, 3.3), np.full(64, -2.5), -np.abs(rng.standard_normal(64)),
              rng.integers(-16, 17, 64) / 2.0, two(d127 * k, np.float32(3.7) / np.float32(127) * k)]
    for m in (-8.0, 3.7):                                        # q4_0 ties: x / d on k / 2
        d = np.float32(m) / np.float32(-8)
        blk = np.concatenate([[m], d * np.arange(-8, 7.5, 0.5)[:31]])
        pieces.append(two(blk, -blk))
    ties = []
    for first in (5.0, -5.0):                                    # signed-max ties: the first one wins
        tie = rng.uniform(-1, 1, 32)
        tie[2], tie[9] = first, -first
        ties.append(tie)
    pieces.append(two(*ties))
    nf = np.zeros(64)
    nf[0] = 1.0
    nf[1:16] = np.array(NF4_MIDPOINTS, dtype=np.float32)         # on nf4's boundaries
    nf[16:31] = np.nextafter(nf[1:16].astype(np.float32), np.float32(2))
    nf[31:46] = -nf[1:16]
    pieces += [nf, np.full(64, 1e6) * rng.choice([-1, 1], 64)]   # nf4 absmax saturates
    for a in (1e-36, 1e-20, 6e-5, 1e4, 3e38):                    # tiny / huge (normal d, finite 1/d)
        b = rng.standard_normal(64)
        pieces.append(b * a / np.abs(b).max())
    h = np.float16(1.0)                                          # halfway between two fp16 scales
    mid = (np.float32(h) + np.float32(np.nextafter(h, np.float16(2)))) / 2
    for factor in (127.0, -8.0, 1.0):
        b = rng.uniform(-1, 1, 64) * 0.9 * abs(mid * factor)
        b[4] = b[36] = mid * factor
        pieces.append(b)
    flat = np.concatenate(pieces)
    flat = np.concatenate([flat, rng.standard_normal(-len(flat) % n)]).astype(np.float32)
    return torch.from_numpy(flat.reshape(-1, n))


# -------------------------------------------------------------------------------------- cases
@pytest.mark.parametrize("fmt", ALL)
@pytest.mark.parametrize("t_len", [1, 6])
def test_every_format(fmt, t_len):
    n = 72                                                       # not whole blocks (32 and 64)
    rows = [randn(3, t_len, n, seed=ALL.index(fmt) + 10 * t_len)]
    check([(fmt, n)], rows, offsets=[0, 4, 9], valid=[t_len, 0, max(1, t_len - 2)], cap=12, seed=t_len)


class CountLaunches:
    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.fixture
def launches(monkeypatch):
    from attnlab.kernels import cache_write_jit

    counter = CountLaunches(cache_write_jit.cache_write_kernel)
    monkeypatch.setattr(cache_write_jit, "cache_write_kernel", counter)
    return counter.grids


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mixed_formats_one_launch_with_ring(in_dtype, launches):
    """A DBA-like layer (k_sem q4_0, k_geo q8_0, v nf4, + an fp16 field) from (B, KV, T, hd)
    projections passed as transposed views; ring of 4 < T = 7; capacity cut-off; a valid count 0."""
    kv, t_len = 2, 7
    dims = [16, 32, 40, 12]
    fields = list(zip(["q4_0", "q8_0", "nf4", "fp16"], [kv * d for d in dims]))
    rows = [randn(3, kv, t_len, d, seed=d, dtype=in_dtype).transpose(1, 2) for d in dims]  # (B, T, KV, hd)
    ring_dtype = {torch.float32: torch.bfloat16, torch.bfloat16: torch.bfloat16, torch.float16: torch.float32}[in_dtype]
    check(fields, rows, offsets=[0, 6, 2], valid=[7, 5, 0], cap=9, ring=4, ring_dtype=ring_dtype)
    assert len(launches) == 1


def test_more_than_four_fields(launches):
    fields = [("q8_0", 40), ("fp32", 8), ("q4_0", 64), ("bf16", 24), ("nf4", 100), ("fp16", 33)]
    rows = [randn(2, 3, n, seed=n) for _, n in fields]
    check(fields, rows, offsets=[1, 0], valid=[3, 2], cap=5, ring=2)
    assert len(launches) == 2                                    # ceil(6 / 4); positions written once


@pytest.mark.parametrize("ring", [0, 3])
def test_decode_step_offsets_and_capacity(ring):
    """T = 1 with ragged offsets: one sequence at the last slot, one at capacity (dropped from
    the store, still in the ring), one not valid; int32 offsets/valid."""
    fields = [("q4_0", 256), ("q8_0", 96), ("nf4", 64), ("bf16", 40)]
    rows = [randn(5, 1, n, seed=n + ring) for _, n in fields]
    check(fields, rows, offsets=torch.tensor([0, 7, 8, 3, 11], dtype=torch.int32),
          valid=torch.tensor([1, 1, 1, 0, 1], dtype=torch.int32), cap=8, ring=ring, ring_dtype=torch.float16)


def test_ring_larger_than_chunk_and_wrapping():
    fields = [("q8_0", 64), ("fp16", 16)]
    rows = [randn(2, 5, n, seed=n) for _, n in fields]
    check(fields, rows, offsets=[6, 1], valid=[5, 3], cap=16, ring=8)   # slots 6, 7, 0, 1, 2


@pytest.mark.parametrize("fmt", ALL)
def test_strided_rows(fmt):
    """Row views with gaps and permuted strides: 3-d slices and 4-d (B, T, heads, hd) views."""
    base = randn(2, 9, 2 * 70, seed=3)
    sliced = base[:, ::2, 3:3 + 64]                                      # (2, 5, 64), strides (1260, 280, 1)
    heads = randn(2, 4, 5, 16, seed=4).permute(0, 2, 1, 3)               # (2, 5, 4, 16) from (B, KV, T, hd)
    rev = randn(2, 5, 2, 32, seed=5).transpose(2, 3)                     # hd stride != 1
    fields = [(fmt, 64), (fmt, 64), (fmt, 64)]
    got = check(fields, [sliced, heads, rev], offsets=[0, 2], valid=[5, 4], cap=8, ring=2)
    for tg, x in zip(got, [sliced, heads, rev]):                         # = the contiguous rows' values
        want = x.flatten(2).contiguous().cpu()
        for b, (lo, hi) in enumerate(((0, 5), (2, 6))):
            if fmt in DTYPES:
                assert torch.equal(_bits(tg.data[b, lo:hi]), _bits(want[b, : hi - lo].to(DTYPES[fmt])))
            else:
                codes, scales = planar.quantize(want[b, : hi - lo], fmt)
                assert torch.equal(tg.codes[b, lo:hi].cpu(), codes)
                assert torch.equal(_bits(tg.scales[b, lo:hi]), _bits(scales))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("fmt", ALL)
def test_values_that_stress_rounding(fmt):
    n = 192
    rows = nasty_rows(n, seed=1)                                 # (9, n)
    rows = torch.cat([rows, torch.randn(12 - rows.shape[0], n)]).reshape(3, 4, n)
    if fmt in ("fp16", "bf16"):                                  # float casts: ties, overflow, subnormals
        rows[0, 0, :6] = torch.tensor([1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 65520.0, -7e4, 3e-8, float("inf")])
        rows[0, 1, :4] = torch.tensor([1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, 3.3895e38, -1e-40])
    check([(fmt, n)], [rows.to(DEVICE)], offsets=[0, 4, 8], valid=[4, 4, 4], cap=12, ring=4)


def test_zero_valid_and_empty_batch():
    fields = [("q4_0", 32), ("fp32", 4)]
    rows = [randn(2, 3, n, seed=n) for _, n in fields]
    check(fields, rows, offsets=[0, 0], valid=[0, 0], cap=4, ring=2)     # nothing written anywhere


def test_unsupported_reason_and_errors():
    targets, _ = make_targets([("q8_0", 32)], 1, 4, ring=2)
    assert cw.unsupported_reason(targets) is None
    assert "format" in cw.unsupported_reason([cw.WriteTarget("q5_0", codes=targets[0].codes)])
    t64 = [cw.WriteTarget("fp32", data=torch.zeros(1, 4, 8, device=DEVICE),
                          ring=torch.zeros(1, 2, 8, dtype=torch.float64, device=DEVICE))]
    assert "ring dtype" in cw.unsupported_reason(t64)
    two, _ = make_targets([("fp16", 8)], 1, 4, ring=3)
    assert "different sizes" in cw.unsupported_reason(targets + two)
    assert "dtype" in cw.unsupported_reason(targets, [torch.zeros(1, 1, 32, dtype=torch.float64)])
    with pytest.raises(ValueError):                                      # storage too narrow for the rows
        cw.write_fields(targets, [torch.zeros(1, 1, 64, device=DEVICE)], torch.zeros(1, dtype=torch.long,
                        device=DEVICE), torch.ones(1, dtype=torch.long, device=DEVICE))


_PTX_SCRIPT = r"""
import os, re, sys
os.environ.pop("TRITON_INTERPRET", None)
import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

class StandIn:  # reports an sm_90 target; launches nothing
    target = GPUTarget("cuda", 90, 32)
    def get_current_device(self): return 0
    def get_current_stream(self, device=None): return 0
    def get_current_target(self): return self.target
    def get_active_torch_device(self): return torch.device("cpu")
    def is_active(self): return True

driver.set_active(StandIn())
from attnlab.kernels import cache_write as cw, cache_write_jit as cj
from attnlab.quant import planar
k = cj.cache_write_kernel
run = k.run
k.run = lambda *a, grid, warmup, **kw: run(*a, grid=grid, warmup=True, **kw)
for t_len, dtype in ((1, torch.bfloat16), (5, torch.float32)):
    ts, rows = [], []
    for fmt, n in (("q4_0", 256), ("q8_0", 1024), ("nf4", 128), ("fp16", 64), ("bf16", 64), ("fp32", 32)):
        ring = torch.zeros(2, 8, n, dtype=dtype)
        if fmt in planar.PLANAR_FORMATS:
            cb, nb = planar.planar_widths(fmt, n)
            ts.append(cw.WriteTarget(fmt, codes=torch.zeros(2, 16, cb, dtype=torch.uint8),
                                     scales=torch.zeros(2, 16, nb, dtype=torch.float16), ring=ring))
        else:
            ts.append(cw.WriteTarget(fmt, data=torch.zeros(2, 16, n, dtype=cw.FLOAT_FORMATS[fmt]), ring=ring))
        rows.append(torch.zeros(2, n // 32, t_len, 32, dtype=dtype).transpose(1, 2))
    try:
        cw.write_fields(ts, rows, torch.zeros(2, dtype=torch.int32), torch.zeros(2, dtype=torch.int32),
                        ring_positions=torch.zeros(2, 8, dtype=torch.long))
    except Exception as e:  # the stand-in launch returns None
        if "NoneType" not in repr(e):
            raise
for compiled in k.device_caches[0][0].values():
    print("PTXOPS", " ".join(sorted(set(re.findall(r"\b(?:div|fma|rcp|mul|add|sub)\.[a-z0-9.]*f32\b",
                                                     compiled.asm["ptx"])))))
"""


def test_compiled_ptx_uses_ieee_division_and_no_fma():
    """Compile for sm_90 without a GPU (stand-in driver, as benchmarks/offline_compile.py):
    every fp32 division is div.rn (not div.full/approx), no fma contraction, no ftz arithmetic."""
    pytest.importorskip("triton.backends.nvidia")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _PTX_SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    if res.returncode != 0:
        if "ptxas" in res.stderr or "libcuda" in res.stderr:
            pytest.skip(f"cannot compile for sm_90 here: {res.stderr[-300:]}")
        pytest.fail(res.stderr[-3000:])
    kernels = [line.split()[1:] for line in res.stdout.splitlines() if line.startswith("PTXOPS")]
    assert len(kernels) == 4                                     # 2 launches (6 fields) x 2 shapes
    assert sum("div.rn.f32" in ops for ops in kernels) == 2      # the launches with block formats
    for ops in kernels:
        assert not [op for op in ops if op.startswith(("div.full", "div.approx", "fma", "rcp")) or "ftz" in op], ops


# ---------------------------------------------------------------------------------------- GPU
DBA_1B = [("q4_0", 256), ("q8_0", 1024), ("q4_0", 1280)]               # k_sem, k_geo, v (32 kv heads)


def _dba_rows(batch, t_len, dtype=torch.bfloat16, seed=0):
    """(B, T, KV, hd) views of (B, KV, T, hd) projections, as the attention layer has them."""
    return [randn(batch, 32, t_len, n // 32, seed=seed + n, dtype=dtype).transpose(1, 2) for _, n in DBA_1B]


@gpu
def test_gpu_model_layer_prefill_chunk():
    rows = _dba_rows(2, 300)
    check(DBA_1B, rows, offsets=[0, 100], valid=[300, 250], cap=512, ring=128, ring_dtype=torch.bfloat16)


@gpu
def test_gpu_fuzz_every_format():
    """Many blocks of mixed distributions (normal, uniform, half-integer grids: ties, Cauchy) over
    ten decades, every format, compiled."""
    rng = np.random.default_rng(0)
    shape = (2, 128, 1024)
    kind = rng.integers(0, 4, size=(*shape[:2], 32, 1))
    scale = 10.0 ** rng.uniform(-6, 5, size=(*shape[:2], 32, 1))
    draws = [rng.standard_normal((*shape[:2], 32, 32)), rng.uniform(-1, 1, (*shape[:2], 32, 32)),
             rng.integers(-16, 17, size=(*shape[:2], 32, 32)) / 2.0, rng.standard_cauchy((*shape[:2], 32, 32))]
    x = torch.from_numpy((np.choose(kind, draws) * scale).astype(np.float32).reshape(shape)).to(DEVICE)
    check([(f, 1024) for f in ALL], [x] * len(ALL), offsets=[0, 5], valid=[128, 120], cap=140, ring=16)


@gpu
def test_gpu_cuda_graph_decode_steps():
    """A captured T = 1 write, replayed with new rows and offsets (device tensors): no host sync."""
    batch, cap, ring = 4, 16, 4
    targets, positions = make_targets(DBA_1B, batch, cap, ring, torch.bfloat16)
    ref_t, ref_p = copy.deepcopy(targets), positions.clone()
    rows = [torch.zeros(batch, 1, 32, n // 32, device=DEVICE, dtype=torch.bfloat16) for _, n in DBA_1B]
    offsets = torch.zeros(batch, dtype=torch.long, device=DEVICE)
    valid = torch.ones(batch, dtype=torch.long, device=DEVICE)
    cw.write_fields(targets, rows, offsets, valid, ring_positions=positions)      # compile outside capture
    cw.write_fields_reference(ref_t, rows, offsets, valid, ring_positions=ref_p)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cw.write_fields(targets, rows, offsets, valid, ring_positions=positions)
    for step in range(1, 7):
        for i, r in enumerate(rows):
            r.copy_(randn(*r.shape, seed=10 * step + i, dtype=torch.bfloat16))
        offsets.copy_(torch.tensor([step, step + 3, 15, step], device=DEVICE))
        valid.copy_(torch.tensor([1, 1, 1, step % 2], device=DEVICE))
        graph.replay()
        cw.write_fields_reference(ref_t, rows, offsets, valid, ring_positions=ref_p)
    torch.cuda.synchronize()
    assert_same(targets, ref_t, positions, ref_p.cpu(), "graph")


# ------------------------------------------------------------------------------------- timing
def _time_us(fn, iters=200):
    """Mean GPU time of ``fn`` replayed from a CUDA graph of ``iters`` calls, and eager per call."""
    import time

    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    in_graph = start.elapsed_time(end) * 1e3 / (5 * iters)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return in_graph, (time.perf_counter() - t0) * 1e6 / iters


def main():  # pragma: no cover - GPU timing
    """One layer's write of the DBA 1B layer (bf16 model, 32 kv heads) at 1000 tokens in."""
    print(f"{'case':28s} {'graph us':>9s} {'eager us':>9s} {'MB moved':>9s}")
    for batch, t_len, ring in ((1, 1, 0), (1, 1, 128), (8, 1, 0), (8, 1, 128), (1, 2048, 0), (1, 2048, 128)):
        targets, positions = make_targets(DBA_1B, batch, 4096, ring, torch.bfloat16)
        rows = _dba_rows(batch, t_len)
        offsets = torch.full((batch,), 1000, dtype=torch.long, device=DEVICE)
        valid = torch.full((batch,), t_len, dtype=torch.long, device=DEVICE)
        moved = 0.0
        for f, n in DBA_1B:
            code_bytes, nb = planar.planar_widths(f, n)
            moved += batch * t_len * (2 * n + code_bytes + 2 * nb) + batch * min(t_len, ring) * 2 * n
        g, e = _time_us(lambda: cw.write_fields(targets, rows, offsets, valid, ring_positions=positions),
                        iters=200 if t_len == 1 else 20)
        print(f"{f'B={batch} T={t_len} ring={ring}':28s} {g:9.2f} {e:9.2f} {moved / 1e6:9.3f}")


if __name__ == "__main__":
    main()
