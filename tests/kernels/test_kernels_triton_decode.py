"""Fused Triton decode kernel vs the chunked reference (computed in float64) on fresh random
caches: every storage format per field, standard and DBA caches, GQA groups 1/2/4, head dims that
are not powers of two or smaller than a quantized block, ragged batches, null token, exact tail,
several splits. Without CUDA the kernel runs in Triton's CPU interpreter (see conftest.py);
tests marked gpu need CUDA."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'attnlab[test]')")

from decode_cases import make_case, reference64, rel_err  # noqa: E402

from attnlab.kernels import triton_decode as td  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")
FP32_TOL = 2e-5   # fp32 queries, exact dequantization, fp32 accumulation: lands ~1e-7
LOW_TOL = 2e-2    # bf16/fp16 model: the reference rounds dequantized values to the model dtype


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(td, "POISON_BUFFERS", True)


def run_kernel(case, **kw):
    return td.decode_attention(case["q"], case["cache"], case["scales"], q_positions=case["q_positions"],
                               key_lengths=case["key_lengths"], null_k=case["null_k"], null_v=case["null_v"], **kw)


def check(case, tol=FP32_TOL, **kw):
    out = run_kernel(case, **kw)
    ref = reference64(case)
    assert out.shape == ref.shape and out.dtype == case["q"][0].dtype
    assert torch.isfinite(out).all(), "unwritten or NaN output"
    err = rel_err(out, ref)
    assert err < tol, f"relative error {err:.3g} >= {tol}"
    return err


STD_FORMATS = ["fp16", "bf16", "q8_0", "q4_0"]


@pytest.mark.parametrize("k_fmt,v_fmt", list(itertools.product(STD_FORMATS, STD_FORMATS)))
def test_standard_every_format_pair(k_fmt, v_fmt):
    case = make_case(num_heads=4, num_kv=2, key_dims=(16,), v_dim=16, formats={"k": k_fmt, "v": v_fmt},
                     lengths=(45, 7), device=DEVICE, seed=4 * STD_FORMATS.index(k_fmt) + STD_FORMATS.index(v_fmt))
    check(case, num_splits=2, block_n=16)


DBA_FORMATS = [
    ("fp16", "fp16", "fp16"), ("bf16", "bf16", "bf16"), ("q8_0", "q8_0", "q8_0"), ("q4_0", "q4_0", "q4_0"),
    ("q4_0", "q8_0", "q4_0"), ("q8_0", "q4_0", "fp16"), ("bf16", "q4_0", "q8_0"), ("nf4", "q8_0", "nf4"),
    ("fp32", "nf4", "q4_0"),
]


@pytest.mark.parametrize("fmts", DBA_FORMATS, ids=["-".join(f) for f in DBA_FORMATS])
def test_dba_formats_head_dims_8_32_40(fmts):
    # per head 8 / 32 / 40, as the paper's 256/1024/1280 over 32 heads; 4 kv heads per program row
    case = make_case(num_heads=4, num_kv=4, key_dims=(8, 32), v_dim=40,
                     formats=dict(zip(("k_sem", "k_geo", "v"), fmts)), lengths=(45, 19),
                     null=True, device=DEVICE, seed=sum(map(ord, "".join(fmts))))
    check(case, num_splits=3, block_n=16)


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("fmt", ["bf16", "q4_0"])
def test_gqa_groups(group, fmt):
    case = make_case(num_heads=2 * group, num_kv=2, key_dims=(32,), v_dim=32, formats={"k": fmt, "v": fmt},
                     lengths=(70, 1, 33), device=DEVICE, seed=group)
    check(case, num_splits=2, block_n=16)


@pytest.mark.parametrize("hp,group", [(2, 1), (4, 1), (2, 2)])
def test_several_kv_heads_per_program(hp, group):
    # block-diagonal queries over the HP heads' elements, products on tensor cores
    case = make_case(num_heads=4 * group, num_kv=4, key_dims=(8, 32), v_dim=40,
                     formats={"k_sem": "q4_0", "k_geo": "q8_0", "v": "q4_0"}, lengths=(45, 20), tail=3,
                     null=True, device=DEVICE, seed=hp + 10 * group)
    check(case, num_splits=2, block_n=16, heads_per_program=hp)


@pytest.mark.parametrize("hd", [8, 20, 40, 64])
@pytest.mark.parametrize("fmt", ["fp16", "q8_0", "q4_0", "nf4"])
def test_head_dims(hd, fmt):
    # 8: four heads share one q4_0 block; 20/40: heads start and end inside blocks
    case = make_case(num_heads=6, num_kv=3, key_dims=(hd,), v_dim=hd, formats={"k": fmt, "v": fmt},
                     lengths=(29, 20), device=DEVICE, seed=hd)
    check(case, num_splits=2, block_n=16)


@pytest.mark.parametrize("tail", [0, 1, 6, 40])
@pytest.mark.parametrize("null", [False, True])
def test_tail_and_null_token(tail, null):
    # the store is q4_0, so reading the tail from it instead of the exact ring would show
    case = make_case(num_heads=4, num_kv=2, key_dims=(8, 16), v_dim=24,
                     formats={"k_sem": "q4_0", "k_geo": "q8_0", "v": "q4_0"}, lengths=(37, 3, 20),
                     tail=tail, null=null, device=DEVICE, seed=tail + 7 * null)
    check(case, num_splits=3, block_n=16)


def test_tail_ring_wraps_and_holds_only_the_newest():
    # ring of tail + rollback = 12 slots over 60 tokens: slots hold positions modulo 12
    case = make_case(num_heads=2, num_kv=2, key_dims=(16,), v_dim=16, formats={"k": "q4_0", "v": "q4_0"},
                     lengths=(60, 31), tail=8, rollback=4, device=DEVICE, seed=3)
    check(case, num_splits=2, block_n=16)


@pytest.mark.parametrize("lengths", [(1,), (16,), (17,), (5, 96, 63, 1), (130, 2)])
def test_lengths_and_splits(lengths):
    case = make_case(num_heads=2, num_kv=1, key_dims=(16,), v_dim=8, formats={"k": "q8_0", "v": "bf16"},
                     lengths=lengths, device=DEVICE, seed=len(lengths))
    for splits in (1, 3, 7):
        check(case, num_splits=splits, block_n=16)


def test_query_position_limits_the_visible_keys():
    case = make_case(num_heads=2, num_kv=2, key_dims=(16,), v_dim=16, formats={"k": "q8_0", "v": "q4_0"},
                     lengths=(40, 25), tail=4, device=DEVICE, seed=11)
    case["q_positions"] = torch.tensor([[30], [24]], device=DEVICE)  # sequence 0 sees keys 0..30 only
    check(case, num_splits=2, block_n=16)


def test_default_heuristics_and_fresh_inputs_each_time():
    for seed in range(3):
        case = make_case(num_heads=8, num_kv=2, key_dims=(16, 16), v_dim=32,
                         formats={"k_sem": "q4_0", "k_geo": "q8_0", "v": "q4_0"}, lengths=(90, 45),
                         tail=5, null=True, device=DEVICE, seed=100 + seed)
        check(case)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model(dtype):
    case = make_case(num_heads=4, num_kv=2, key_dims=(8, 32), v_dim=40,
                     formats={"k_sem": "q4_0", "k_geo": "q8_0"}, lengths=(33, 50), tail=4, null=True,
                     dtype=dtype, device=DEVICE, seed=5)
    check(case, tol=LOW_TOL, num_splits=2, block_n=16)


def test_layouts_and_split_heuristic():
    assert td.field_layout("q4_0", 8, 32).fmt == td.FMT_Q4_0_SUB      # 4 heads per block, one nibble half
    assert td.field_layout("q8_0", 8, 32).fmt == td.FMT_Q8_0_SUB
    lay = td.field_layout("q4_0", 40, 32)                               # heads straddle blocks
    assert (lay.fmt, lay.nbh, lay.nbh_pad) == (td.FMT_Q4_0, 2, 2)
    lay = td.field_layout("bf16", 40, 8)                                # virtual blocks of 8, 5 -> 8
    assert (lay.qk, lay.nbh, lay.nbh_pad) == (8, 5, 8)
    assert td.choose_num_splits(1, 32, 131072, 132) == 4 * 132 // 32             # 512 programs <= 4 per SM
    assert td.choose_num_splits(8, 8, 131072, 132) == 8
    assert td.choose_num_splits(1, 32, 131072, 132, one_wave=False) == 17       # issue-bound: oversubscribe
    assert td.choose_num_splits(8, 32, 131072, 132, one_wave=False) == 3
    assert td.choose_num_splits(32, 32, 131072, 132) == 1
    assert td.choose_num_splits(1, 8, 1000, 132) == 1000 // 256
    assert td.choose_num_splits(4, 8, 0, 132) == 1


def test_unsupported_reasons():
    case = make_case(num_heads=2, num_kv=1, key_dims=(16,), v_dim=16, lengths=(5,), dtype=torch.float64)
    assert "fp64" in td.unsupported_reason(case["q"], case["cache"])
    case = make_case(num_heads=2, num_kv=1, key_dims=(16,), v_dim=16, lengths=(5,))
    assert td.unsupported_reason(case["q"], case["cache"]) is None
    q2 = [torch.randn(1, 2, 3, 16)]
    assert "T=3" in td.unsupported_reason(q2, case["cache"])


def test_cpu_dispatch_is_the_reference_and_silent(caplog):
    from attnlab.kernels import cached_attention, cached_attention_reference

    case = make_case(num_heads=4, num_kv=2, key_dims=(16,), v_dim=16, formats={"k": "q4_0"}, lengths=(9,))
    args = dict(q_positions=case["q_positions"], key_lengths=case["key_lengths"])
    with caplog.at_level(logging.WARNING, logger="attnlab.kernels"):
        out = cached_attention(case["q"], case["cache"], case["scales"], **args)
    torch.testing.assert_close(out, cached_attention_reference(case["q"], case["cache"], case["scales"], **args))
    assert not caplog.records


# ------------------------------------------------------------------------------------------- GPU


@gpu
def test_gpu_dispatch_uses_kernel_for_decode_and_logs_fallback_once(monkeypatch, caplog):
    import attnlab.kernels as kernels

    calls = []
    real = td.decode_attention
    monkeypatch.setattr(td, "decode_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(kernels, "_reported", set())
    case = make_case(num_heads=8, num_kv=2, key_dims=(8, 32), v_dim=40,
                     formats={"k_sem": "q4_0", "k_geo": "q8_0", "v": "q4_0"}, lengths=(300, 1000),
                     tail=16, null=True, dtype=torch.bfloat16, device="cuda", seed=1)
    args = dict(q_positions=case["q_positions"], key_lengths=case["key_lengths"], null_k=case["null_k"],
                null_v=case["null_v"])
    out = kernels.cached_attention(case["q"], case["cache"], case["scales"], **args)
    assert calls == [1]
    assert rel_err(out, reference64(case)) < LOW_TOL
    q3 = [torch.cat([t, t, t], dim=2) for t in case["q"]]  # T == 3: prefill -> reference, logged once
    pos3 = torch.stack([case["q_positions"][:, 0] - 2, case["q_positions"][:, 0] - 1, case["q_positions"][:, 0]], 1)
    with caplog.at_level(logging.WARNING, logger="attnlab.kernels"):
        for _ in range(3):
            kernels.cached_attention(q3, case["cache"], case["scales"], **{**args, "q_positions": pos3})
    assert calls == [1]
    assert len([r for r in caplog.records if "query tokens" in r.getMessage()]) == 1


@gpu
@pytest.mark.parametrize("fmts", [("bf16", "bf16", "bf16"), ("q4_0", "q8_0", "q4_0"), ("q8_0", "q8_0", "q8_0")])
def test_gpu_long_context_against_float64(fmts):
    case = make_case(num_heads=32, num_kv=32, key_dims=(8, 32), v_dim=40,
                     formats=dict(zip(("k_sem", "k_geo", "v"), fmts)), lengths=(20000, 3001, 1),
                     tail=64, null=True, device="cuda", seed=9)
    check(case)  # default split heuristic and block size


@gpu
def test_gpu_standard_gqa_bf16_against_float64():
    case = make_case(num_heads=32, num_kv=8, key_dims=(64,), v_dim=64, lengths=(8192, 777),
                     dtype=torch.bfloat16, device="cuda", seed=4)
    check(case, tol=LOW_TOL)


@gpu
@torch.no_grad()
def test_gpu_cached_generation_matches_reference_path(monkeypatch):
    from attnlab.cache import ModelCache
    from attnlab.config import ModelConfig
    from attnlab.model import build_model

    torch.manual_seed(0)
    cfg = ModelConfig.model_validate({"vocab_size": 97, "d_model": 128, "num_layers": 2, "block_size": 512,
                                      "attention": {"type": "decoupled", "num_heads": 4, "num_kv_heads": 2,
                                                    "sem_dim": 32, "geo_dim": 64, "v_dim": 96,
                                                    "null_token": True}})
    model = build_model(cfg).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 97, (2, 200), device="cuda")

    def decode(policy):
        cache = ModelCache.for_model(model, policy, batch=2)
        model(ids[:, :150], cache=cache)
        return torch.cat([model(ids[:, t: t + 1], cache=cache) for t in range(150, 200)], 1).float()

    policy = "k_sem=q4_0,k_geo=q8_0,v=q4_0,tail=16"
    fused = decode(policy)
    monkeypatch.setenv("ATTNLAB_DECODE_KERNEL", "reference")
    ref = decode(policy)
    assert rel_err(fused, ref) < LOW_TOL
