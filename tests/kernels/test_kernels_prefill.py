"""Chunked-prefill Triton kernel (``attnlab.kernels.prefill``) vs an independent float64 reference
written here (planar dequantization, exact overrides per the tail rule, float64 softmax) and vs
the chunked torch reference (``attnlab.kernels.reference``) on a real ``LayerCache``: every format
per field, heterogeneous DBA, standard/GQA/DBA with odd head dims, null token, tail 0 and > 0
(ring + fresh rows), per-sequence offsets and valid counts, chunks at 0 and mid-sequence.

Fresh random inputs each case; unused memory is poisoned (NaN / random bytes: store rows past a
sequence's length, ring slots holding no position, fresh padding rows), so a read the contract
does not allow shows up. Without CUDA the kernel runs in Triton's CPU interpreter (conftest.py);
with CUDA the same cases run compiled, plus larger GPU-only cases."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'attnlab[test]')")

from attnlab.kernels import prefill as pf  # noqa: E402
from attnlab.kernels.fields import FieldData, FieldSpec  # noqa: E402
from attnlab.quant import planar  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")
# Compiled on an H200 (Triton 3.6) these failed against the float64 reference (relative error
# 0.61 and 0.16): fp16/bf16 tensor-core products, GQA groups > 1 over block-format keys, exact
# tail. Cause not found yet; the dispatcher refuses that class (prefill.unsupported_reason).
GPU_KNOWN_FAILURE = pytest.mark.xfail(CUDA, reason="compiled fp16/bf16 GQA over block formats fails parity",
                                      strict=False)
FP32_TOL = 2e-5   # fp32 queries, exact dequantization, fp32 accumulation: lands ~1e-7
LOW_TOL = 2e-2    # bf16/fp16 operands (queries, tiles, softmax weights)
FLOATS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NATIVE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _names(num_fields: int) -> list[str]:
    return {1: ["k"], 2: ["k_sem", "k_geo"]}.get(num_fields, [f"k{i}" for i in range(num_fields)])


def make_case(*, num_heads=4, num_kv=2, key_dims=(16,), v_dim=16, formats=None, offsets=(0,), valid=(9,),
              t_len=None, tail=0, rollback=3, null=False, dtype=torch.float32, q_dtype=None, device=DEVICE,
              seed=0):
    """Stores (positions 0 .. offsets[b] + valid[b] - 1 written, the rest poisoned), rings (the
    R positions before the chunk; slots holding none poisoned), the chunk's fresh rows (padding
    poisoned), strided queries. ``exact``: every position's full-precision row (float64)."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(offsets)
    t_len = t_len or max(valid)
    lengths = [o + v for o, v in zip(offsets, valid)]
    cap = max(lengths) + 7
    names = _names(len(key_dims))
    formats = dict(formats or {})
    specs = [FieldSpec(n, formats.get(n, NATIVE[dtype]), num_kv, d)
             for n, d in zip(names + ["v"], list(key_dims) + [v_dim])]
    ring_size = tail + rollback
    data, stored, exact, fresh = [], [], [], []
    for spec in specs:
        n = num_kv * spec.head_dim
        x = torch.randn(batch, cap, n, generator=gen).to(dtype)
        dead = torch.arange(cap)[None, :] >= torch.tensor(lengths)[:, None]      # (B, cap) unwritten rows
        if spec.format in FLOATS:
            d = x.to(FLOATS[spec.format])
            stored.append(d.double())
            fd = FieldData(data=d.masked_fill(dead[..., None], float("nan")))
        else:
            codes, scales = planar.quantize(x.float(), spec.format)
            stored.append(planar.dequantize(codes, scales, spec.format, n, torch.float64))
            junk = torch.randint(0, 256, codes.shape, generator=gen, dtype=torch.uint8)
            fd = FieldData(codes=torch.where(dead[..., None], junk, codes),
                           scales=scales.masked_fill(dead[..., None], float("nan")))
        exact.append(x.double())
        if tail > 0:
            ring = torch.full((batch, ring_size, n), float("nan"), dtype=dtype)
            for b, off in enumerate(offsets):
                for j in range(max(0, off - ring_size), off):
                    ring[b, j % ring_size] = x[b, j]
            fd.ring = ring.to(device)
        rows = torch.full((batch, t_len, n), float("nan"), dtype=dtype)
        for b, (off, v) in enumerate(zip(offsets, valid)):
            rows[b, :v] = x[b, off: off + v]
        fresh.append(rows.to(device))
        for attr in ("data", "codes", "scales"):
            if getattr(fd, attr) is not None:
                setattr(fd, attr, getattr(fd, attr).to(device))
        data.append(fd)
    q_dtype = q_dtype or dtype
    q = [torch.randn(batch, t_len, num_heads, d, generator=gen).to(q_dtype).to(device).transpose(1, 2)
         for d in key_dims]                                                    # strided (B, H, T, d) views
    null_k = null_v = None
    if null:
        null_k = [torch.randn(num_kv, d, generator=gen).to(dtype).to(device) for d in key_dims]
        null_v = torch.randn(num_kv, v_dim, generator=gen).to(dtype).to(device)
    nf = len(key_dims)
    return dict(q=q, keys=data[:nf], value=data[nf], key_specs=specs[:nf], value_spec=specs[nf],
                scales=[1.0 / math.sqrt(d) for d in key_dims], offsets=list(offsets), valid=list(valid),
                lengths=lengths, tail=tail, fresh_keys=fresh[:nf] if tail else None,
                fresh_value=fresh[nf] if tail else None, null_k=null_k, null_v=null_v,
                stored=stored, exact=exact)


def run_kernel(case, **kw):
    dev = case["q"][0].device
    return pf.prefill_attention(
        case["q"], case["keys"], case["value"], case["key_specs"], case["value_spec"], scales=case["scales"],
        offsets=torch.tensor(case["offsets"], dtype=torch.int32, device=dev),
        lengths=torch.tensor(case["lengths"], dtype=torch.int32, device=dev), max_length=max(case["lengths"]),
        tail=case["tail"], fresh_keys=case["fresh_keys"], fresh_value=case["fresh_value"],
        null_k=case["null_k"], null_v=case["null_v"], **kw)


def reference64(case) -> torch.Tensor:
    """Independent float64 attention: key j is visible to the query at p = offsets[b] + t iff
    j <= p and j < lengths[b]; read exactly iff tail > 0 and j > p - tail; else as stored."""
    q = [t.double().cpu() for t in case["q"]]
    batch, num_heads, t_len, _ = q[0].shape
    nf = len(q)
    num_kv = case["value_spec"].num_kv_heads
    kv_of = torch.arange(num_heads) // (num_heads // num_kv)
    tail = case["tail"]
    out = torch.zeros(batch, num_heads, t_len, case["value_spec"].head_dim, dtype=torch.float64)

    def heads(rows, length):  # (cap, n) -> (H, length, d) for each query head's kv head
        return rows[:length].view(length, num_kv, -1).permute(1, 0, 2)[kv_of]

    for b, (off, length) in enumerate(zip(case["offsets"], case["lengths"])):
        if length == 0:
            continue  # an empty sequence: no real rows
        p = off + torch.arange(t_len)
        j = torch.arange(length)
        visible = j[None, :] <= p[:, None]
        exm = (j[None, :] > p[:, None] - tail) if tail > 0 else torch.zeros_like(visible)
        s_st = s_ex = 0.0
        for f in range(nf):
            s_st = s_st + case["scales"][f] * q[f][b] @ heads(case["stored"][f][b], length).transpose(-1, -2)
            s_ex = s_ex + case["scales"][f] * q[f][b] @ heads(case["exact"][f][b], length).transpose(-1, -2)
        s = torch.where(exm, s_ex, s_st).masked_fill(~visible, float("-inf"))  # (H, T, L)
        if case["null_k"] is not None:
            ns = sum(case["scales"][f] * (q[f][b] * case["null_k"][f].double().cpu()[kv_of][:, None, :]).sum(-1)
                     for f in range(nf))
            s = torch.cat([s, ns[..., None]], dim=-1)
        w = torch.softmax(s, dim=-1)
        w_keys = w[..., :length]
        o = ((w_keys * ~exm) @ heads(case["stored"][nf][b], length)
             + (w_keys * exm) @ heads(case["exact"][nf][b], length))
        if case["null_k"] is not None:
            o = o + w[..., length:] * case["null_v"].double().cpu()[kv_of][:, None, :]
        out[b] = o
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return float((out - ref).norm() / ref.norm())


def check(case, tol=FP32_TOL, **kw):
    out = run_kernel(case, **kw)
    ref = reference64(case)
    assert out.shape == ref.shape and out.dtype == case["q"][0].dtype
    rows = torch.arange(out.shape[2])[None, :] < torch.tensor(case["valid"])[:, None]  # (B, T) real rows
    assert torch.isfinite(out.cpu()).all(), "NaN/inf output (a poisoned read?)"
    err = rel_err(out.cpu().transpose(1, 2)[rows], ref.transpose(1, 2)[rows])
    assert err < tol, f"relative error {err:.3g} >= {tol}"
    return err


# --------------------------------------------------------------------------- formats and shapes

ALL = ["fp32", "fp16", "bf16", "q8_0", "q4_0", "nf4"]


@pytest.mark.parametrize("fmt", ALL)
@pytest.mark.parametrize("tail", [0, 4])
def test_standard_every_format(fmt, tail):
    # chunk mid-sequence, with a ragged batch: offsets 21/6, 9 and 5 real rows of 9
    case = make_case(num_heads=4, num_kv=2, key_dims=(16,), v_dim=16, formats={"k": fmt, "v": fmt},
                     offsets=(21, 6), valid=(9, 5), tail=tail, seed=ALL.index(fmt) + 10 * tail)
    check(case, block_n=16)


DBA_FORMATS = [("q4_0", "q8_0", "q4_0"), ("q8_0", "q4_0", "fp16"), ("bf16", "q4_0", "q8_0"), ("nf4", "q8_0", "nf4"),
               ("fp32", "nf4", "q4_0"), ("fp16", "fp16", "bf16")]


@pytest.mark.parametrize("fmts", DBA_FORMATS, ids=["-".join(f) for f in DBA_FORMATS])
def test_dba_heterogeneous_8_32_40(fmts):
    # per head 8 / 32 / 40 as DBA 1B (k_sem heads share q4_0 blocks, v heads straddle blocks)
    case = make_case(num_heads=4, num_kv=4, key_dims=(8, 32), v_dim=40,
                     formats=dict(zip(("k_sem", "k_geo", "v"), fmts)), offsets=(30, 0), valid=(12, 17), tail=5,
                     null=True, seed=sum(map(ord, "".join(fmts))))
    check(case, block_n=16)


@pytest.mark.parametrize("fmt", ["fp16", "q8_0", "q4_0", "nf4"])
def test_odd_head_dims_6_10_12(fmt):
    # heads straddle quantized blocks; 6/10/12 lanes padded to 16
    case = make_case(num_heads=6, num_kv=3, key_dims=(6, 10), v_dim=12, formats={"k_sem": fmt, "k_geo": fmt, "v": fmt},
                     offsets=(13, 2), valid=(7, 10), tail=3, null=True, seed=ALL.index(fmt))
    check(case, block_n=16)


@pytest.mark.parametrize("fmt", ["q4_0", "nf4", "q8_0"])
def test_head_dims_that_are_odd(fmt):
    # head dim 5: heads start in the middle of a byte (4-bit formats)
    case = make_case(num_heads=3, num_kv=3, key_dims=(5,), v_dim=7, formats={"k": fmt, "v": fmt},
                     offsets=(9,), valid=(6,), tail=2, seed=3)
    check(case, block_n=16)


@pytest.mark.parametrize("group", [1, 2, 3, 4])
def test_gqa_groups(group):
    case = make_case(num_heads=2 * group, num_kv=2, key_dims=(32,), v_dim=32, formats={"k": "q4_0", "v": "q8_0"},
                     offsets=(40, 3, 0), valid=(11, 11, 4), tail=6, seed=group)
    check(case, block_n=16)


def test_three_key_fields():
    case = make_case(num_heads=4, num_kv=2, key_dims=(8, 16, 12), v_dim=24,
                     formats={"k0": "q4_0", "k1": "q8_0", "k2": "bf16", "v": "nf4"}, offsets=(17, 1), valid=(8, 6),
                     tail=4, null=True, seed=7)
    check(case, block_n=16)


@pytest.mark.parametrize("tail", [0, 1, 3, 9, 40])
@pytest.mark.parametrize("null", [False, True])
def test_tail_and_null_token(tail, null):
    # the store is 4-bit, so reading the tail from it instead of the exact sources would show
    case = make_case(num_heads=4, num_kv=2, key_dims=(8, 16), v_dim=24,
                     formats={"k_sem": "q4_0", "k_geo": "q8_0", "v": "q4_0"}, offsets=(45, 20, 0), valid=(13, 2, 13),
                     tail=tail, rollback=2, null=null, seed=tail + 50 * null)
    check(case, block_m=16, block_n=16, prefetch=tail % 2 == 1)


@pytest.mark.parametrize("offsets,valid,t_len", [((0,), (1,), 1), ((37,), (1,), 1), ((0, 5), (20, 3), 20),
                                                 ((64, 0), (16, 16), 16), ((3, 50, 0), (4, 1, 0), 5)])
def test_offsets_valid_counts_and_block_edges(offsets, valid, t_len):
    case = make_case(num_heads=2, num_kv=1, key_dims=(16,), v_dim=8, formats={"k": "q8_0", "v": "bf16"},
                     offsets=offsets, valid=valid, t_len=t_len, tail=2, seed=len(offsets) + t_len)
    if sum(valid) == 0:
        return
    for bm, bn, prefetch in ((16, 16, True), (32, 32, False)):
        check(case, block_m=bm, block_n=bn, prefetch=prefetch)


def test_default_heuristics_and_fresh_inputs_each_time():
    for seed in range(2):
        case = make_case(num_heads=8, num_kv=2, key_dims=(16, 16), v_dim=32,
                         formats={"k_sem": "q4_0", "k_geo": "q8_0", "v": "q4_0"}, offsets=(70, 10), valid=(20, 9),
                         tail=5, null=True, seed=100 + seed)
        check(case)


@GPU_KNOWN_FAILURE
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model(dtype):
    case = make_case(num_heads=4, num_kv=2, key_dims=(8, 32), v_dim=40, formats={"k_sem": "q4_0", "k_geo": "q8_0"},
                     offsets=(33, 0), valid=(9, 14), tail=4, null=True, dtype=dtype, seed=5)
    check(case, tol=LOW_TOL, block_n=16)


# --------------------------------------------------------------------- against reference.py


def _layer_case(*, num_heads, num_kv, key_dims, v_dim, formats, offsets, valid, tail, null, dtype=torch.float32,
                seed=0, device=DEVICE):
    """A real LayerCache: history written with its ring, then the chunk without (as the layer does)."""
    from attnlab.cache.kv import CacheStep, LayerCache
    from attnlab.cache.policy import CachePolicy
    from attnlab.config.attention import AttentionDims, KeyField

    gen = torch.Generator().manual_seed(seed)
    names = _names(len(key_dims))
    dims = AttentionDims(num_heads, num_kv, tuple(KeyField(n, d, n != "k_sem") for n, d in zip(names, key_dims)),
                         v_dim, null)
    cache = LayerCache(dims, CachePolicy(formats=dict(formats), tail=tail, rollback=3), len(offsets),
                       max(o + v for o, v in zip(offsets, valid)) + 4, torch.device(device), dtype)

    def fields(t_len):
        return {n: torch.randn(len(offsets), num_kv, t_len, hd, generator=gen).to(dtype).to(device)
                for n, hd in dims.cache_fields.items()}

    if max(offsets) > 0:
        cache.write(CacheStep.eager([0] * len(offsets), list(offsets), max(offsets), torch.device(device)),
                    fields(max(offsets)))
    t_len = max(valid)
    step = CacheStep.eager(list(offsets), list(valid), t_len, torch.device(device))
    chunk = fields(t_len)
    cache.write(step, chunk, include_tail=False)
    q = [torch.randn(len(offsets), num_heads, t_len, d, generator=gen).to(dtype).to(device) for d in key_dims]
    null_k = [torch.randn(num_kv, d, generator=gen).to(dtype).to(device) for d in key_dims] if null else None
    null_v = torch.randn(num_kv, v_dim, generator=gen).to(dtype).to(device) if null else None
    return dims, cache, step, chunk, q, null_k, null_v


@pytest.mark.parametrize("kind", ["dba-hetero-tail", "gqa-q8-tail", "standard-fp16-notail", "dba-nf4-tail-long"])
def test_matches_reference_path_on_a_layer_cache(kind):
    from attnlab.kernels.reference import cached_attention_reference

    cfg = {
        "dba-hetero-tail": dict(num_heads=4, num_kv=4, key_dims=(8, 32), v_dim=40,
                                formats={"k_sem": "q4_0", "k_geo": "q8_0", "v": "q4_0"}, offsets=(25, 0),
                                valid=(10, 7), tail=6, null=True),
        "gqa-q8-tail": dict(num_heads=6, num_kv=2, key_dims=(12,), v_dim=10, formats={"k": "q8_0", "v": "q4_0"},
                            offsets=(8, 19, 0), valid=(9, 4, 9), tail=3, null=False),
        "standard-fp16-notail": dict(num_heads=4, num_kv=2, key_dims=(16,), v_dim=16,
                                     formats={"k": "fp16", "v": "q8_0"}, offsets=(30, 12), valid=(5, 5), tail=0,
                                     null=True),
        "dba-nf4-tail-long": dict(num_heads=2, num_kv=2, key_dims=(6, 10), v_dim=12,
                                  formats={"k_sem": "nf4", "k_geo": "q4_0", "v": "nf4"}, offsets=(40, 33),
                                  valid=(12, 12), tail=20, null=True),
    }[kind]
    dims, cache, step, chunk, q, null_k, null_v = _layer_case(**cfg, seed=len(kind))
    names = [f.name for f in dims.key_fields]
    lengths = [o + v for o, v in zip(cfg["offsets"], cfg["valid"])]
    scales = [1.0 / math.sqrt(d) for d in cfg["key_dims"]]
    ref = cached_attention_reference(q, cache, scales, q_positions=step.positions, key_lengths=lengths,
                                     null_k=null_k, null_v=null_v, fresh=chunk, offsets=list(cfg["offsets"]),
                                     chunk_size=16)

    def data(name):
        st = cache.stores[name]
        return FieldData(data=st.data, codes=st.codes, scales=st.scales,
                         ring=cache.window.rows[name] if cache.window is not None else None)

    specs = [FieldSpec(n, cache.formats[n], dims.num_kv_heads, hd) for n, hd in dims.cache_fields.items()]
    exact = cache.tail > 0
    out = pf.prefill_attention(q, [data(n) for n in names], data("v"), specs[:-1], specs[-1], scales=scales,
                               offsets=step.offsets, lengths=step.lengths, max_length=step.max_length,
                               tail=cache.tail,
                               fresh_keys=[chunk[n].transpose(1, 2).flatten(2) for n in names] if exact else None,
                               fresh_value=chunk["v"].transpose(1, 2).flatten(2) if exact else None,
                               null_k=null_k, null_v=null_v, block_n=16)
    rows = torch.arange(out.shape[2])[None, :] < torch.tensor(cfg["valid"])[:, None]  # (B, T) real rows
    err = rel_err(out.cpu().transpose(1, 2)[rows], ref.cpu().transpose(1, 2)[rows])
    assert err < FP32_TOL, f"relative error vs reference.py {err:.3g}"


# ------------------------------------------------------------------------------ host checks


def test_unsupported_reasons_and_heuristics():
    k = [FieldSpec("k", "q4_0", 2, 16)]
    v = FieldSpec("v", "q8_0", 2, 16)
    assert pf.unsupported_reason(k, v, q_dtype=torch.float32, num_heads=4, t_len=64) is None
    assert "fp64" in pf.unsupported_reason([FieldSpec("k", "fp64", 2, 16)], v, q_dtype=torch.float32,
                                           num_heads=4, t_len=8)
    assert "dtype" in pf.unsupported_reason(k, v, q_dtype=torch.float64, num_heads=4, t_len=8)
    assert "head dim" in pf.unsupported_reason([FieldSpec("k", "bf16", 2, 300)], v, q_dtype=torch.bfloat16,
                                               num_heads=4, t_len=8)
    assert "key fields" in pf.unsupported_reason(k * 4, v, q_dtype=torch.bfloat16, num_heads=4, t_len=8)
    assert "query heads" in pf.unsupported_reason(k, v, q_dtype=torch.bfloat16, num_heads=3, t_len=8)
    bf16, fp32 = torch.bfloat16, torch.float32
    assert pf.choose_config(1, 2048, [8, 32, 40], q_dtype=bf16, block_formats=True) == (128, 64, 8, 2, 128)
    assert pf.choose_config(1, 2048, [64, 64], q_dtype=bf16, block_formats=False) == (128, 64, 8, 3, None)
    assert pf.choose_config(4, 2, [64, 64], q_dtype=bf16, block_formats=False)[:2] == (128, 64)
    assert pf.choose_config(4, 2, [64, 64], q_dtype=fp32, block_formats=True) == (16, 64, 4, 2, None)
    assert pf.choose_config(2, 1000, [128, 128], q_dtype=fp32, block_formats=True)[:3] == (128, 32, 8)
    assert pf.choose_config(8, 1000, [256, 256], q_dtype=bf16, block_formats=False)[:3] == (64, 32, 8)


def test_dispatch_policy_keeps_to_what_passed_on_the_gpu():
    # fp16/bf16 queries: only the tensor-core shapes verified compiled (see unsupported_reason)
    bf16 = torch.bfloat16
    q4, bf = [FieldSpec("k", "q4_0", 2, 64)], [FieldSpec("k", "bf16", 2, 64)]
    v4, vb = FieldSpec("v", "q4_0", 2, 64), FieldSpec("v", "bf16", 2, 64)
    assert "GQA" in pf.unsupported_reason(q4, v4, q_dtype=bf16, num_heads=8, t_len=64)
    assert "GQA" in pf.unsupported_reason(bf, vb, q_dtype=torch.float16, num_heads=8, t_len=64)
    assert pf.unsupported_reason(bf, vb, q_dtype=bf16, num_heads=8, t_len=64) is None
    assert pf.unsupported_reason(q4, v4, q_dtype=bf16, num_heads=2, t_len=64) is None
    assert pf.unsupported_reason(q4, v4, q_dtype=torch.float32, num_heads=8, t_len=64) is None
    dba = [FieldSpec("k_sem", "q4_0", 32, 8), FieldSpec("k_geo", "q8_0", 32, 32)]
    assert pf.unsupported_reason(dba, FieldSpec("v", "q4_0", 32, 40), q_dtype=bf16, num_heads=32, t_len=9) is None
    assert "value head dim 24" in pf.unsupported_reason(dba, FieldSpec("v", "q4_0", 32, 24), q_dtype=bf16,
                                                        num_heads=32, t_len=9)
    wide = [FieldSpec("k", "bf16", 2, 128)]
    assert "128" in pf.unsupported_reason(wide, FieldSpec("v", "bf16", 2, 128), q_dtype=bf16, num_heads=2, t_len=8)


def test_tail_without_ring_is_an_error():
    case = make_case(formats={"k": "q8_0", "v": "q8_0"}, offsets=(5,), valid=(3,), tail=2)
    case["keys"][0].ring = None
    with pytest.raises(ValueError, match="ring"):
        run_kernel(case)


# ----------------------------------------------------------------------------------------- GPU


@gpu
@pytest.mark.parametrize("fmts", [("q4_0", "q8_0", "q4_0"), ("bf16", "bf16", "bf16")])
@pytest.mark.parametrize("tail", [0, 64])
def test_gpu_dba_long_chunk_against_float64(fmts, tail):
    case = make_case(num_heads=32, num_kv=32, key_dims=(8, 32), v_dim=40,
                     formats=dict(zip(("k_sem", "k_geo", "v"), fmts)), offsets=(3000, 0), valid=(300, 257), tail=tail,
                     null=True, dtype=torch.bfloat16, seed=9)
    check(case, tol=LOW_TOL)  # default heuristics


@gpu
def test_gpu_standard_gqa_bf16_against_float64():
    case = make_case(num_heads=32, num_kv=8, key_dims=(64,), v_dim=64, offsets=(4000, 100), valid=(512, 77),
                     dtype=torch.bfloat16, seed=4)
    check(case, tol=LOW_TOL)


@gpu
@pytest.mark.parametrize("fmts", [("bf16", "bf16"), ("q8_0", "q4_0")])
def test_gpu_head_dim_128_without_gqa(fmts):
    case = make_case(num_heads=2, num_kv=2, key_dims=(128,), v_dim=128, formats=dict(zip(("k", "v"), fmts)),
                     offsets=(700,), valid=(200,), tail=16, dtype=torch.bfloat16, seed=128)
    check(case, tol=LOW_TOL)


@gpu
@GPU_KNOWN_FAILURE
def test_gpu_gqa_head_dim_128_fp16():
    case = make_case(num_heads=8, num_kv=2, key_dims=(128,), v_dim=128, formats={"k": "q8_0", "v": "q4_0"},
                     offsets=(700,), valid=(200,), tail=16, dtype=torch.float16, seed=128)
    check(case, tol=LOW_TOL)


@gpu
def test_gpu_refuses_fp16_head_dim_256():
    # compiled, this shape made an illegal memory access (H200, Triton 3.6): refused, not run
    case = make_case(num_heads=8, num_kv=2, key_dims=(256,), v_dim=256, formats={"k": "q8_0", "v": "q4_0"},
                     offsets=(700,), valid=(200,), tail=16, dtype=torch.float16, seed=256)
    with pytest.raises(ValueError, match="head dim 256 > 128"):
        check(case, tol=LOW_TOL)


@gpu
@pytest.mark.xfail(CUDA, reason="diagnostic matrix for the open fp16/bf16 GPU parity issue (run with -rxX)",
                   strict=False)
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("block_n", [16, 32, 64])
@pytest.mark.parametrize("v_dim", [24, 40, 128])
@pytest.mark.parametrize("tail", [0, 8])
def test_gpu_tensor_core_shape_matrix(group, block_n, v_dim, tail):
    # which of key-block width, value tile, GQA group and exact tail breaks the compiled path
    case = make_case(num_heads=2 * group, num_kv=2, key_dims=(8, 32), v_dim=v_dim,
                     formats={"k_sem": "q4_0", "k_geo": "q8_0", "v": "q4_0"}, offsets=(150, 0), valid=(70, 45),
                     tail=tail, null=True, dtype=torch.bfloat16, seed=block_n + v_dim + group)
    check(case, tol=LOW_TOL, block_m=128, block_n=block_n, num_warps=8)
