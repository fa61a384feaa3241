"""Attention backends (attnlab.nn.attention.backends): flex vs the eager reference for sliding
windows and block-sparse layouts (GQA, DBA-style two key fields, null token), sdpa vs eager for
causal, the eager reference against a from-scratch loop, and the selector's rules."""

import logging

import pytest
import torch

from attnlab.nn.attention.backends import (
    FLEX_IMPORT_ERROR,
    BlockSparse,
    MaskSpec,
    attend,
    flex_field_attention,
    select_backend,
)
from attnlab.nn.attention.functional import eager_attention, field_scores, null_scores

needs_flex = pytest.mark.skipif(FLEX_IMPORT_ERROR is not None, reason=str(FLEX_IMPORT_ERROR))
CPU = torch.device("cpu")

# (name, query heads, kv heads, key-field head dims, value dim)
SHAPES = [
    ("gqa_one_field", 4, 2, [16], 8),
    ("dba_two_fields_mqa", 4, 1, [8, 16], 12),
]


def make_inputs(num_heads, num_kv, dims, dv, *, t_len=21, s_len=None, batch=2, null=False,
                dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s_len = t_len if s_len is None else s_len

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    q = [rnd(batch, num_heads, t_len, d) for d in dims]
    k = [rnd(batch, num_kv, s_len, d) for d in dims]
    v = rnd(batch, num_kv, s_len, dv)
    scales = [d ** -0.5 for d in dims]
    null_k = [rnd(num_kv, d) for d in dims] if null else None
    null_v = rnd(num_kv, dv) if null else None
    return q, k, v, scales, null_k, null_v


def loop_reference(q, k, v, scales, mask, null_k=None, null_v=None):
    """float64, one (batch, head, query) at a time, straight from the MaskSpec docstring."""
    batch, num_heads, t_len, _ = q[0].shape
    num_kv, s_len = k[0].shape[1], k[0].shape[2]
    group = num_heads // num_kv
    out = torch.zeros(batch, num_heads, t_len, v.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for h in range(num_heads):
            g = h // group
            for i in range(t_len):
                p = mask.q_offset + i
                logits, values = [], []
                if null_k is not None:
                    logits.append(sum(s * float(qf[b, h, i].double() @ nk[g].double())
                                      for qf, nk, s in zip(q, null_k, scales)))
                    values.append(null_v[g].double())
                for j in range(s_len):
                    ok = j <= p if mask.causal else True
                    if mask.key_lengths is not None:
                        ok = ok and j < int(mask.key_lengths[b])
                    local = []
                    if mask.window is not None:
                        local.append(j > p - mask.window)
                    if mask.block_sparse is not None:
                        bs = mask.block_sparse
                        qb, kb = torch.tensor(p // bs.block_size), torch.tensor(j // bs.block_size)
                        local.append(bool(bs.allowed(qb, kb)))
                    if ok and (not local or any(local)):
                        logits.append(sum(s * float(qf[b, h, i].double() @ kf[b, g, j].double())
                                          for qf, kf, s in zip(q, k, scales)))
                        values.append(v[b, g, j].double())
                if logits:
                    w = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0)
                    out[b, h, i] = (w[:, None] * torch.stack(values)).sum(0)
    return out


def random_layout(num_blocks, seed=1):
    gen = torch.Generator().manual_seed(seed)
    layout = torch.rand(num_blocks, num_blocks, generator=gen) < 0.4
    return layout | torch.eye(num_blocks, dtype=torch.bool)  # the diagonal: every query sees itself


def butterfly_like(block_size=4):
    """Sliding window OR one deterministic partner block (k_block == q_block ^ 1) OR block 0."""
    return MaskSpec(window=3, block_sparse=BlockSparse(block_size, block_fn=lambda qb, kb: (kb == (qb ^ 1)) | (kb == 0)))


MASKS = {
    "window1": MaskSpec(window=1),
    "window4": MaskSpec(window=4),
    "window7": MaskSpec(window=7),
    "window_ge_T": MaskSpec(window=64),
    "block_layout": MaskSpec(block_sparse=BlockSparse(4, layout=random_layout(6))),
    "butterfly_like": butterfly_like(),
}


# ------------------------------------------------------------------ eager is the reference
@pytest.mark.parametrize("null", [False, True])
@pytest.mark.parametrize("mask_name", ["window4", "block_layout", "butterfly_like"])
def test_eager_matches_loop_reference(mask_name, null):
    q, k, v, scales, nk, nv = make_inputs(4, 2, [4, 6], 5, t_len=9, s_len=13, batch=2, null=null)
    lengths = torch.tensor([13, 10])
    base = MASKS[mask_name]
    mask = MaskSpec(window=base.window, block_sparse=base.block_sparse, q_offset=4, key_lengths=lengths)
    ref = loop_reference(q, k, v, scales, mask, nk, nv)
    out = eager_attention(q, k, v, scales, null_k=nk, null_v=nv, mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_eager_legacy_offset_and_lengths_equal_mask():
    q, k, v, scales, nk, nv = make_inputs(4, 2, [8], 8, t_len=5, s_len=11, null=True)
    lengths = torch.tensor([11, 8])
    old = eager_attention(q, k, v, scales, null_k=nk, null_v=nv, q_offset=6, key_lengths=lengths)
    new = eager_attention(q, k, v, scales, null_k=nk, null_v=nv, mask=MaskSpec(q_offset=6, key_lengths=lengths))
    torch.testing.assert_close(old, new, rtol=0, atol=0)
    with pytest.raises(ValueError, match="inside mask"):
        eager_attention(q, k, v, scales, q_offset=1, mask=MaskSpec())


def test_field_scores_are_the_per_field_sum_with_gqa():
    q, k, v, scales, nk, _ = make_inputs(6, 2, [4, 8], 4, t_len=5, null=True)
    want = sum(s * qf @ kf.repeat_interleave(3, 1).transpose(-1, -2) for qf, kf, s in zip(q, k, scales))
    torch.testing.assert_close(field_scores(q, k, scales), want, rtol=1e-12, atol=1e-12)
    want_null = sum(s * torch.einsum("bhtd,hd->bht", qf, n.repeat_interleave(3, 0)) for qf, n, s in zip(q, nk, scales))
    torch.testing.assert_close(null_scores(q, nk, scales), want_null, rtol=1e-12, atol=1e-12)


def test_empty_rows_give_zeros_not_nan():
    q, k, v, scales, _, _ = make_inputs(2, 2, [8], 8, t_len=8)
    layout = torch.zeros(2, 2, dtype=torch.bool)
    layout[1, 0] = True  # block 0 sees nothing; block 1 sees block 0 only
    out = eager_attention(q, k, v, scales, mask=MaskSpec(block_sparse=BlockSparse(4, layout=layout)))
    assert torch.isfinite(out).all() and (out[:, :, :4] == 0).all() and (out[:, :, 4:] != 0).any()


# ------------------------------------------------------------------ flex vs eager
@needs_flex
@pytest.mark.parametrize("null", [False, True], ids=["plain", "null"])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_flex_matches_eager(mask_name, shape, null):
    _, h, kv, dims, dv = shape
    q, k, v, scales, nk, nv = make_inputs(h, kv, dims, dv, null=null)
    mask = MASKS[mask_name]
    ref = eager_attention(q, k, v, scales, null_k=nk, null_v=nv, mask=mask)
    out = flex_field_attention(q, k, v, scales, mask=mask, null_k=nk, null_v=nv)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert out.dtype == torch.float64


@needs_flex
@pytest.mark.parametrize("null", [False, True], ids=["plain", "null"])
def test_flex_matches_eager_offset_lengths_float32(null):
    q, k, v, scales, nk, nv = make_inputs(4, 2, [8, 16], 8, t_len=7, s_len=19, null=null, dtype=torch.float32)
    mask = MaskSpec(window=5, q_offset=12, key_lengths=torch.tensor([19, 15]))
    ref = eager_attention(q, k, v, scales, null_k=nk, null_v=nv, mask=mask)
    out = attend(q, k, v, scales, null_k=nk, null_v=nv, mask=mask, impl="flex")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@needs_flex
def test_window_ge_t_is_plain_causal():
    q, k, v, scales, nk, nv = make_inputs(4, 2, [16], 8, null=True)
    wide = attend(q, k, v, scales, null_k=nk, null_v=nv, mask=MaskSpec(window=21), impl="flex")
    causal = attend(q, k, v, scales, null_k=nk, null_v=nv, impl="sdpa")
    torch.testing.assert_close(wide, causal, rtol=1e-10, atol=1e-10)


@needs_flex
def test_layout_too_small_is_an_error():
    q, k, v, scales, _, _ = make_inputs(2, 2, [8], 8, t_len=9)
    mask = MaskSpec(block_sparse=BlockSparse(4, layout=torch.ones(2, 2, dtype=torch.bool)))
    with pytest.raises(ValueError, match="does not cover"):
        attend(q, k, v, scales, mask=mask, impl="flex")
    with pytest.raises(ValueError, match="does not cover"):
        attend(q, k, v, scales, mask=mask, impl="eager")


# ------------------------------------------------------------------ sdpa vs eager
@pytest.mark.parametrize("null", [False, True], ids=["plain", "null"])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_sdpa_matches_eager_causal(shape, null):
    _, h, kv, dims, dv = shape
    q, k, v, scales, nk, nv = make_inputs(h, kv, dims, dv, null=null)
    ref = eager_attention(q, k, v, scales, null_k=nk, null_v=nv)
    out = attend(q, k, v, scales, null_k=nk, null_v=nv)  # auto: causal -> sdpa
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_sdpa_needs_square_causal():
    q, k, v, scales, _, _ = make_inputs(2, 2, [8], 8, t_len=4, s_len=9)
    with pytest.raises(ValueError, match="T == S"):
        attend(q, k, v, scales, impl="sdpa")


# ------------------------------------------------------------------ gradients
def _grads(impl, null, device, mask, fn=attend):
    q, k, v, scales, nk, nv = make_inputs(4, 2, [8, 16], 8, t_len=19, null=null, dtype=torch.float32)
    leaves = [*q, *k, v, *(nk or []), *([nv] if nv is not None else [])]
    leaves = [t.to(device).requires_grad_() for t in leaves]
    n = len(q)
    q, k, v = leaves[:n], leaves[n:2 * n], leaves[2 * n]
    nk, nv = (leaves[2 * n + 1:2 * n + 1 + n], leaves[-1]) if null else (None, None)
    kw = {} if fn is flex_field_attention else {"impl": impl}
    out = fn(q, k, v, scales, null_k=nk, null_v=nv, mask=mask, **kw)
    (out * torch.linspace(-1, 1, out.shape[-1], device=device)).sum().backward()
    return [t.grad.cpu() for t in leaves]


@needs_flex
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention backward needs CUDA (none on CPU)")
@pytest.mark.parametrize("null", [False, True], ids=["plain", "null"])
def test_flex_gradients_match_eager_cuda(null):
    mask = MaskSpec(window=5, block_sparse=BlockSparse(4, block_fn=lambda qb, kb: kb == (qb ^ 1)))
    dev = torch.device("cuda")
    for a, b in zip(_grads("flex", null, dev, mask), _grads("eager", null, dev, mask)):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-4)


@needs_flex
@pytest.mark.parametrize("null", [False, True], ids=["plain", "null"])
def test_flex_gradients_match_eager_cpu(null, monkeypatch):
    """torch refuses FlexAttention backward on CPU by a device check in front of a working dense
    backward; lifting the check (test only) lets the wrapper's gradients (scaled concatenation,
    appended null token, mask_mod) be checked without CUDA."""
    import torch.nn.attention.flex_attention as fa

    if not hasattr(fa, "_validate_device"):
        pytest.skip("this torch has no _validate_device to lift")
    monkeypatch.setattr(fa, "_validate_device", lambda *args: None)
    mask = MaskSpec(window=5, block_sparse=BlockSparse(4, block_fn=lambda qb, kb: kb == (qb ^ 1)))
    flex = _grads("flex", null, CPU, mask, fn=flex_field_attention)
    for a, b in zip(flex, _grads("eager", null, CPU, mask)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_flex
def test_flex_with_grad_on_cpu_falls_back_to_eager(caplog, monkeypatch):
    """CPU FlexAttention is forward only: a differentiated call runs eager (logged once) and its
    gradients are the reference's."""
    from attnlab.nn.attention import backends

    monkeypatch.setattr(backends, "_reported", set())
    mask = MaskSpec(window=5)
    with caplog.at_level(logging.WARNING, logger="attnlab.nn.attention.backends"):
        flex = _grads("flex", True, CPU, mask)
    assert "no backward on CPU" in caplog.text
    eager = _grads("eager", True, CPU, mask)
    for a, b in zip(flex, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------ the selector
def test_selector_rules():
    causal, window = MaskSpec(), MaskSpec(window=8)
    flex_or_eager = "eager" if FLEX_IMPORT_ERROR else "flex"
    assert select_backend(causal, CPU, torch.float32) == "sdpa"
    assert select_backend(causal, CPU, torch.float32, "fused") == "sdpa"
    assert select_backend(causal, CPU, torch.float32, "eager") == "eager"
    assert select_backend(window, CPU, torch.float32, "eager") == "eager"
    assert select_backend(window, CPU, torch.float32) == flex_or_eager
    assert select_backend(window, CPU, torch.float64) == flex_or_eager
    assert select_backend(MaskSpec(q_offset=3), CPU, torch.float32) == flex_or_eager
    assert select_backend(MaskSpec(key_lengths=torch.tensor([3])), CPU, torch.float32) == flex_or_eager
    assert select_backend(causal, CPU, torch.float32, "flex") == flex_or_eager
    # what flex cannot serve goes to eager
    assert select_backend(window, CPU, torch.float32, needs_grad=True) == "eager"
    assert select_backend(window, CPU, torch.float32, "flex", needs_grad=True) == "eager"
    assert select_backend(window, CPU, torch.float32, dropout=True) == "eager"
    assert select_backend(window, "cuda", torch.float64) == "eager"
    assert select_backend(window, "cuda", torch.bfloat16, needs_grad=True) == flex_or_eager
    assert select_backend(causal, "cuda", torch.bfloat16, needs_grad=True, dropout=True) == "sdpa"
    with pytest.raises(ValueError, match="plain causal"):
        select_backend(window, CPU, torch.float32, "sdpa")
    with pytest.raises(ValueError, match="must be one of"):
        select_backend(causal, CPU, torch.float32, "triton")


def test_mask_spec_validation_and_equality():
    with pytest.raises(ValueError):
        MaskSpec(window=0)
    with pytest.raises(ValueError):
        BlockSparse(4)
    with pytest.raises(ValueError):
        BlockSparse(4, layout=torch.ones(2, 2))  # not bool
    assert MaskSpec(window=4) == MaskSpec(window=4) and hash(MaskSpec(window=4)) == hash(MaskSpec(window=4))
    assert MaskSpec().is_causal_only and not MaskSpec(window=4).is_causal_only
