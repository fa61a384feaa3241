"""Planar decode kernel (``attnlab.kernels.decode``) vs an independent float64 reference
(``planar.dequantize`` + dense softmax attention in float64) on fresh random inputs: every format
per field and heterogeneous mixes, standard / GQA / DBA shapes with odd head dims, one to three
key fields, null token, exact tail from a ring, per-sequence lengths, lengths shorter than the
planned maximum (graph replay), split counts 1 and several. Scratch buffers are poisoned with
NaN before every run. Without CUDA the kernel runs in Triton's CPU interpreter (conftest.py);
the ``gpu`` tests rerun cases compiled."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'attnlab[test]')")

from planar_cases import make_case, reference64, rel_err  # noqa: E402

from attnlab.kernels import decode as dk  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")
FP32_TOL = 2e-5   # fp32 queries: exact decoding, fp32 products and accumulation (lands ~1e-7)
LOW_TOL = 2e-2    # bf16/fp16 queries: fp16/bf16 tensor-core operands


def plan_for(case, **kw):
    return dk.plan_decode(case["specs"][:-1], case["specs"][-1], num_heads=case["num_heads"],
                          batch=len(case["lengths"]), max_length=case["max_length"], tail=case["tail"],
                          ring_size=case["ring_size"], has_null=case["null_k"] is not None,
                          q_dtype=case["q_dtype"], device=case["device"], ring_dtype=case["dtype"], **kw)


def run(plan, case):
    for t in plan.buffers:
        t.fill_(float("nan"))
    return dk.decode_attention(plan, case["q"], case["keys"], case["value"], scales=case["scales"],
                               lengths=case["lengths"], q_positions=case["q_positions"],
                               null_k=case["null_k"], null_v=case["null_v"])


def check(case, tol=FP32_TOL, **kw):
    plan = plan_for(case, **kw)
    out = run(plan, case)
    ref = reference64(case)
    assert out.shape == ref.shape and out.dtype == case["q_dtype"]
    assert torch.isfinite(out).all(), "unwritten or NaN output"
    err = rel_err(out, ref)
    assert err < tol, f"relative error {err:.3g} >= {tol} ({plan.describe()})"
    return plan


FORMATS = ["fp32", "fp16", "bf16", "q8_0", "q4_0", "nf4"]


@pytest.mark.parametrize("k_fmt", FORMATS)
@pytest.mark.parametrize("v_fmt", ["fp16", "q8_0", "q4_0", "nf4"])
def test_standard_every_format_pair(k_fmt, v_fmt):
    case = make_case(num_heads=4, num_kv=2, key_dims=(16,), v_dim=16, formats={"k": k_fmt, "v": v_fmt},
                     lengths=(45, 7), seed=FORMATS.index(k_fmt) * 7 + FORMATS.index(v_fmt), device=DEVICE)
    check(case, num_splits=2, block_n=16)


DBA_FORMATS = [("q4_0", "q8_0", "q4_0"), ("q8_0", "q8_0", "q8_0"), ("q4_0", "q4_0", "q4_0"),
               ("fp16", "fp16", "fp16"), ("bf16", "q4_0", "nf4"), ("nf4", "fp32", "q8_0")]


@pytest.mark.parametrize("fmts", DBA_FORMATS, ids=["-".join(f) for f in DBA_FORMATS])
def test_dba_heads_8_32_40_tail_null(fmts):
    # per head 8 / 32 / 40 as DBA's 1B shape; v heads straddle q4_0 blocks; the ring holds the tail
    case = make_case(num_heads=8, num_kv=8, key_dims=(8, 32), v_dim=40,
                     formats=dict(zip(("k_sem", "k_geo", "v"), fmts)), lengths=(45, 19), tail=5, null=True,
                     seed=sum(map(ord, "".join(fmts))), device=DEVICE)
    check(case, num_splits=3, block_n=16)


@pytest.mark.parametrize("hp", [1, 2, 4])
def test_heads_per_program_and_odd_dims(hp):
    # odd head dims 6 / 10 / 12 (float: narrower vectors); three key fields
    case = make_case(num_heads=8, num_kv=4, key_dims=(6, 10), v_dim=12,
                     formats={"k_sem": "fp16", "k_geo": "fp32", "v": "fp16"}, lengths=(33, 20), null=True,
                     seed=hp, device=DEVICE)
    check(case, num_splits=2, block_n=16, heads_per_program=hp)


def test_three_key_fields_odd_dims_blocks_straddle():
    # 6/10/12 elements per head in block formats: 3 kv heads share blocks, so one program takes the row
    case = make_case(num_heads=6, num_kv=3, key_dims=(6, 10, 12), v_dim=40,
                     formats={"k0": "q4_0", "k1": "q8_0", "k2": "fp16", "v": "nf4"}, lengths=(50, 3), tail=4,
                     null=True, seed=5, device=DEVICE)
    plan = check(case, num_splits=2, block_n=16)
    assert plan.heads_per_program == 3 and len(plan.keys) == 3


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("fmt", ["bf16", "q4_0"])
def test_gqa_groups(group, fmt):
    case = make_case(num_heads=2 * group, num_kv=2, key_dims=(32,), v_dim=32, formats={"k": fmt, "v": fmt},
                     lengths=(70, 1, 33), seed=group, device=DEVICE)
    check(case, num_splits=2, block_n=16)


@pytest.mark.parametrize("tail", [1, 6, 40])
def test_exact_tail_from_the_ring(tail):
    # the store is q4_0, so reading the tail from it instead of the ring would show
    case = make_case(num_heads=4, num_kv=2, key_dims=(8, 16), v_dim=24,
                     formats={"k_sem": "q4_0", "k_geo": "q8_0", "v": "q4_0"}, lengths=(37, 3, 20), tail=tail,
                     seed=tail, device=DEVICE)
    check(case, num_splits=3, block_n=16)


@pytest.mark.parametrize("splits", [1, 3, 7])
def test_ragged_lengths_and_splits(splits):
    case = make_case(num_heads=2, num_kv=1, key_dims=(16,), v_dim=8, formats={"k": "q8_0", "v": "bf16"},
                     lengths=(5, 96, 63, 1), seed=splits, device=DEVICE)
    check(case, num_splits=splits, block_n=16)


@pytest.mark.parametrize("fmt", ["fp32", "q8_0", "q4_0"])
def test_mla_latent_values_aliased_to_a_key_field(fmt):
    # MLA's absorbed decode: one kv head for all query heads, keys c_kv (values too) + k_rope
    case = make_case(num_heads=8, num_kv=1, key_dims=(64, 8), v_dim=64, formats={"k_sem": fmt, "k_geo": "q8_0"},
                     lengths=(41, 9), tail=2 if fmt != "fp32" else 0, seed=11, device=DEVICE, value_alias=True)
    assert case["value"] is case["keys"][0]
    check(case, num_splits=2, block_n=16)


def test_mla_latent_512_wide():
    case = make_case(num_heads=4, num_kv=1, key_dims=(512, 64), v_dim=512, formats={"k_sem": "q8_0", "k_geo": "q8_0"},
                     lengths=(20,), seed=12, device=DEVICE, value_alias=True)
    check(case, num_splits=1, block_n=16)


@gpu
@pytest.mark.parametrize("fmt", ["bf16", "q8_0"])
def test_gpu_mla_deepseek_shape(fmt):
    # DeepSeek-V2 per layer: latent 512, RoPE key 64, 16 or 32 heads, bf16 queries
    for heads in (16, 32):
        case = make_case(num_heads=heads, num_kv=1, key_dims=(512, 64), v_dim=512,
                         formats={"k_sem": fmt, "k_geo": fmt}, lengths=(3000, 777), seed=heads, device=DEVICE,
                         dtype=torch.bfloat16, value_alias=True)
        check(case, tol=LOW_TOL)


def test_output_into_a_caller_buffer_leaves_the_plan_buffer_alone():
    # what the torch.compile custom op uses: an op's output must not be the plan's reused buffer
    case = make_case(num_heads=4, num_kv=2, key_dims=(8, 16), v_dim=24,
                     formats={"k_sem": "q4_0", "k_geo": "q8_0", "v": "q4_0"}, lengths=(37, 3), seed=5, device=DEVICE)
    plan = plan_for(case, num_splits=2, block_n=16)
    own = run(plan, case).clone()
    plan.out.fill_(-7.0)
    mine = torch.full_like(plan.out, float("nan"))
    got = dk.decode_attention(plan, case["q"], case["keys"], case["value"], scales=case["scales"],
                              lengths=case["lengths"], q_positions=case["q_positions"], out=mine)
    assert got is mine and torch.equal(mine, own)
    assert (plan.out == -7.0).all()
    with pytest.raises(AssertionError):
        dk.decode_attention(plan, case["q"], case["keys"], case["value"], scales=case["scales"],
                            lengths=case["lengths"], q_positions=case["q_positions"], out=mine[:1])


def test_graph_replay_shorter_lengths_and_positions():
    # one plan for max_length 120, replayed with shorter device lengths and query positions up to the
    # rollback (ring - tail) behind the newest key
    case = make_case(num_heads=4, num_kv=4, key_dims=(8, 32), v_dim=40, capacity=120,
                     formats={"k_sem": "q4_0", "k_geo": "q8_0", "v": "q4_0"}, lengths=(120, 64), tail=4, null=True,
                     seed=11, device=DEVICE)
    plan = plan_for(case, num_splits=4, block_n=16)
    for lengths, pos in (((120, 64), (119, 63)), ((17, 90), (16, 89)), ((40, 30), (37, 28))):
        case["lengths"].copy_(torch.tensor(lengths, dtype=torch.int32))
        case["q_positions"].copy_(torch.tensor(pos).view(-1, 1))
        # the ring holds the newest positions of the new lengths
        for fd, exact in zip(case["keys"] + [case["value"]], case["exact"]):
            for b, n in enumerate(lengths):
                for j in range(max(0, n - case["ring_size"]), n):
                    fd.ring[b, j % case["ring_size"]] = exact[b, j].to(fd.ring.dtype)
        out = run(plan, case)
        assert out.data_ptr() == plan.out.data_ptr()
        assert rel_err(out, reference64(case)) < FP32_TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_queries(dtype):
    case = make_case(num_heads=8, num_kv=8, key_dims=(8, 32), v_dim=40,
                     formats={"k_sem": "q4_0", "k_geo": "q8_0", "v": "q4_0"}, lengths=(33, 50), tail=4, null=True,
                     dtype=dtype, seed=5, device=DEVICE)
    check(case, tol=LOW_TOL)


def test_heuristics_and_descriptors():
    dba = [dk.FieldSpec("k_sem", "q4_0", 32, 8), dk.FieldSpec("k_geo", "q8_0", 32, 32),
           dk.FieldSpec("v", "q4_0", 32, 40)]
    assert dk.choose_heads_per_program(dba, 1) == 8
    assert dk.choose_heads_per_program([dk.FieldSpec("k", "q4_0", 8, 64), dk.FieldSpec("v", "q4_0", 8, 64)], 4) == 2
    assert dk.choose_heads_per_program([dk.FieldSpec("k", "q4_0", 3, 6), dk.FieldSpec("v", "q4_0", 3, 6)], 1) == 3
    desc = dk.field_desc("q4_0", 40, 32, 8)             # 320 values = 10 blocks of 16 bytes -> 8 + 2
    assert dk.desc_pieces(desc) == ((0, 8, 8), (8, 2, 2)) and desc[5] == 160 and desc[6] == 10
    desc = dk.field_desc("fp16", 6, 2, 2)               # 12 values: vectors of 4, padded to 16 lanes
    assert desc[3] == 4 and dk.desc_pieces(desc) == ((0, 4, 3),)
    assert dk.choose_num_splits(4, 131072, 132) == 132
    assert dk.choose_num_splits(4, 131072, 132, waves=2) == 66
    assert dk.choose_num_splits(4, 1000, 132) == 3
    assert dk.choose_num_splits(8, 0, 132) == 1


def test_unsupported_reasons():
    k, v = dk.FieldSpec("k", "q4_0", 2, 16), dk.FieldSpec("v", "q4_0", 2, 16)
    assert dk.unsupported_reason([k], v, q_dtype=torch.float16, num_heads=4) is None
    assert "dtype" in dk.unsupported_reason([k], v, q_dtype=torch.float64, num_heads=4)
    assert "multiple" in dk.unsupported_reason([k], v, q_dtype=torch.float16, num_heads=3)
    assert "format" in dk.unsupported_reason([dk.FieldSpec("k", "q5_1", 2, 16)], v, q_dtype=torch.float16, num_heads=4)
    assert "head dim" in dk.unsupported_reason([dk.FieldSpec("k", "fp16", 2, 513)], v, q_dtype=torch.float16,
                                               num_heads=4)
    assert "key field" in dk.unsupported_reason([], v, q_dtype=torch.float16, num_heads=4)
    with pytest.raises(ValueError):
        dk.plan_decode([k], v, num_heads=3, batch=1, max_length=8, tail=0, ring_size=0, has_null=False,
                       q_dtype=torch.float16, device="cpu")


# ------------------------------------------------------------------------------------------- GPU


@gpu
@pytest.mark.parametrize("fmts", [("bf16", "bf16", "bf16"), ("q4_0", "q8_0", "q4_0"), ("q8_0", "q8_0", "q8_0"),
                                  ("q4_0", "q4_0", "q4_0"), ("fp16", "fp16", "fp16")])
def test_gpu_dba_long_context(fmts):
    dtype = torch.float16 if fmts[0] == "fp16" else torch.bfloat16
    case = make_case(num_heads=32, num_kv=32, key_dims=(8, 32), v_dim=40,
                     formats=dict(zip(("k_sem", "k_geo", "v"), fmts)), lengths=(20000, 3001, 1), tail=64, null=True,
                     dtype=dtype, device="cuda", seed=9)
    check(case, tol=LOW_TOL)  # default heuristics


@gpu
@pytest.mark.parametrize("fmt", ["bf16", "q4_0"])
def test_gpu_gqa_and_standard(fmt):
    for heads, kv in ((32, 8), (32, 32)):
        case = make_case(num_heads=heads, num_kv=kv, key_dims=(64,), v_dim=64, formats={"k": fmt, "v": fmt},
                         lengths=(8192, 777), dtype=torch.bfloat16, device="cuda", seed=4)
        check(case, tol=LOW_TOL)


@gpu
def test_gpu_fp32_and_odd_shapes_compiled():
    case = make_case(num_heads=6, num_kv=3, key_dims=(6, 10, 12), v_dim=40,
                     formats={"k0": "q4_0", "k1": "q8_0", "k2": "fp16", "v": "nf4"}, lengths=(500, 3), tail=4,
                     null=True, device="cuda", seed=5)
    check(case, num_splits=3)
    case = make_case(num_heads=8, num_kv=8, key_dims=(8, 32), v_dim=40, lengths=(300, 77), tail=8, null=True,
                     formats={"k_sem": "q4_0", "k_geo": "q8_0", "v": "q4_0"}, device="cuda", seed=6)
    check(case)


@gpu
def test_gpu_cuda_graph_replay_with_new_lengths():
    case = make_case(num_heads=32, num_kv=32, key_dims=(8, 32), v_dim=40, capacity=4096,
                     formats={"k_sem": "q4_0", "k_geo": "q8_0", "v": "q4_0"}, lengths=(4096, 2000), null=True,
                     dtype=torch.bfloat16, device="cuda", seed=3)
    plan = plan_for(case)
    args = dict(scales=case["scales"], lengths=case["lengths"], q_positions=case["q_positions"],
                null_k=case["null_k"], null_v=case["null_v"])
    dk.decode_attention(plan, case["q"], case["keys"], case["value"], **args)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dk.decode_attention(plan, case["q"], case["keys"], case["value"], **args)
    for lengths in ((4096, 2000), (1000, 3333), (5, 4096)):
        case["lengths"].copy_(torch.tensor(lengths, dtype=torch.int32))
        case["q_positions"].copy_(torch.tensor(lengths).view(-1, 1) - 1)
        graph.replay()
        assert rel_err(plan.out, reference64(case)) < LOW_TOL
