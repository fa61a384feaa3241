"""Attamba attention: chunk boundaries, the mask vs a brute-force key set, SSM restarts (a token's
K/V ignores everything before its chunk), the explicit key-set reference vs the masked paths vs
FlexAttention, cached decode / chunked prefill / rollback vs the full forward (float64), cache
bytes by hand, and bad input."""

from __future__ import annotations

import pytest
import torch

from attnlab.config.model import ModelConfig
from attnlab.errors import ConfigError
from attnlab.infer.runtime import DecodeRuntime
from attnlab.model.decoder import DecoderLM
from attnlab.nn.attention.attamba import AttambaMask, ChunkRule, key_set, reference_attention
from attnlab.nn.attention.backends import FLEX_IMPORT_ERROR, attend
from decode_checks import assert_cached_paths_equal_the_full_forward, assert_graph_decode_equals_eager_and_full

CHUNKINGS = ("uniform", "cyclic", "jitter")


def _model(chunking="uniform", *, layers=2, chunk=4, window=3, context=64, dtype=torch.float64, **extra):
    attention = dict(type="attamba", num_heads=4, num_kv_heads=2, kv_proj=True, chunk_size=chunk, window=window,
                     d_state=8, chunking=chunking, **extra)
    cfg = ModelConfig.model_validate(dict(vocab_size=61, d_model=32, num_layers=layers, block_size=context,
                                          attention=attention))
    torch.manual_seed(0)
    model = DecoderLM(cfg).to(dtype).eval()
    for layer in model.attention_layers():
        layer.scan = "reference"  # the sequential recurrence: the definition the cached paths must equal
    return model


def _ids(t_len=60, batch=2, seed=1):
    return torch.randint(0, 61, (batch, t_len), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- boundaries and the mask
def test_boundaries_by_hand():
    uniform = ChunkRule(4, "uniform")
    pos = torch.arange(13)
    assert pos[uniform.is_boundary(pos)].tolist() == [0, 3, 7, 11]
    assert pos[uniform.restarts(pos)].tolist() == [0, 4, 8, 12]  # chunk starts
    shifted = ChunkRule(4, "cyclic", shift=2)  # ends moved 2 later: 1, 5, 9
    assert pos[shifted.is_boundary(pos)].tolist() == [0, 1, 5, 9]
    assert pos[shifted.restarts(pos)].tolist() == [0, 2, 6, 10]
    every = ChunkRule(1, "uniform")  # P = 1: every token is its own chunk
    assert every.is_boundary(pos).all() and every.restarts(pos).all()


def test_cyclic_shifts_follow_the_formula():
    model = _model("cyclic", layers=4, chunk=8)  # P // num_layers = 2: shifts 0, 2, 4, 6
    assert [layer.rule.shift for layer in model.attention_layers()] == [0, 2, 4, 6]
    model = _model("cyclic", layers=3, chunk=2)  # P // 3 = 0: no shift
    assert [layer.rule.shift for layer in model.attention_layers()] == [0, 0, 0]
    model = _model("cyclic", layers=6, chunk=4)  # P // 6 = 0
    assert {layer.rule.shift for layer in model.attention_layers()} == {0}


def test_jitter_has_one_chunk_end_per_region_and_differs_by_layer():
    pos = torch.arange(4000)
    ends = [pos[ChunkRule(8, "jitter", layer=layer).is_end(pos)] for layer in (0, 1)]
    for e in ends:
        assert len(e) == 500 and (e // 8 == torch.arange(500)).all()  # exactly one end per region of 8
        assert len(set((e % 8).tolist())) == 8  # not one fixed offset
    assert not torch.equal(ends[0], ends[1])


@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize("window", [0, 3])
def test_mask_equals_the_brute_force_key_set(chunking, window):
    rule = ChunkRule(5, chunking, shift=2 if chunking == "cyclic" else 0, layer=3)
    mask = AttambaMask(window, rule).dense(1, 53, 53, "cpu")[0]
    ends = {5 * c + int(rule.end_offset(torch.tensor(c))) for c in range(11)}
    for t in range(53):
        brute = [k for k in range(t + 1) if t - window <= k or k == 0 or k in ends]
        assert mask[t].nonzero().flatten().tolist() == brute == key_set(t, window=window, rule=rule)


def _qkv(batch=2, heads=4, kv=2, t_len=61, d=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, h, t_len, d, generator=g, dtype=dtype) for h in (heads, kv, kv))


@pytest.mark.parametrize("chunking", CHUNKINGS)
def test_masked_eager_equals_the_key_set_reference(chunking):
    q, k, v = _qkv()
    rule = ChunkRule(4, chunking, shift=1 if chunking == "cyclic" else 0, layer=2)
    ref = reference_attention(q, k, v, 8 ** -0.5, window=5, rule=rule)
    got = attend([q], [k], v, [8 ** -0.5], mask=AttambaMask(5, rule), impl="eager")
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)


@pytest.mark.skipif(FLEX_IMPORT_ERROR is not None, reason="needs FlexAttention")
@pytest.mark.parametrize("chunking", CHUNKINGS)
def test_flex_equals_the_key_set_reference(chunking):
    q, k, v = _qkv(dtype=torch.float32, t_len=70)
    rule = ChunkRule(8, chunking, shift=3 if chunking == "cyclic" else 0, layer=1)
    ref = reference_attention(q.double(), k.double(), v.double(), 8 ** -0.5, window=6, rule=rule)
    with torch.no_grad():
        got = attend([q], [k], v, [8 ** -0.5], mask=AttambaMask(6, rule), impl="flex")
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- the layer
@pytest.mark.parametrize("chunking", CHUNKINGS)
def test_keys_and_values_do_not_depend_on_tokens_before_their_chunk(chunking):
    model = _model(chunking, layers=1, chunk=5, window=2)
    layer = model.attention_layers()[0]
    x = torch.randn(1, 40, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    pos = torch.arange(40)
    starts = pos[layer.rule.restarts(pos)].tolist()
    with torch.no_grad():
        base = layer.project(x, pos)
        for start in starts[1:4]:
            changed = x.clone()
            changed[:, :start] += torch.randn(1, start, 32, dtype=torch.float64)
            p = layer.project(changed, pos)
            nxt = min([s for s in starts if s > start] + [40])
            for mine, ref in ((p.k[0], base.k[0]), (p.v, base.v)):
                torch.testing.assert_close(mine[:, :, start:nxt], ref[:, :, start:nxt], atol=1e-12, rtol=0)
                assert (mine[:, :, start - 1] - ref[:, :, start - 1]).abs().max() > 1e-3  # the earlier chunk moved


@pytest.mark.parametrize("scan", ["chunked", "reference"])
def test_layer_forward_equals_the_key_set_reference_over_recurrence_made_keys(scan):
    model = _model("jitter", layers=1, chunk=4, window=3)
    layer = model.attention_layers()[0]
    x = torch.randn(2, 37, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    pos = torch.arange(37)
    with torch.no_grad():
        layer.scan = "reference"
        p = layer.project(x, pos)  # K/V by the sequential recurrence
        ref = reference_attention(p.q[0], p.k[0], p.v, layer.scales[0], window=3, rule=layer.rule)
        ref = layer.out(ref.transpose(1, 2).reshape(2, 37, -1))
        layer.scan = scan
        from attnlab.nn.context import ForwardContext

        got = layer(x, ForwardContext(positions=pos, attention_impl="eager"))
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("chunking", CHUNKINGS)
def test_incremental_decode_and_chunked_prefill_equal_the_full_forward(chunking):
    assert_cached_paths_equal_the_full_forward(_model(chunking), _ids())


def test_window_zero_and_chunk_one_decode_equal_the_full_forward():
    for chunk, window in ((1, 0), (3, 0), (7, 12)):
        model = _model(chunk=chunk, window=window, layers=1)
        ids = _ids(30, batch=1)
        with torch.no_grad():
            rt = DecodeRuntime(model, batch=1, max_length=32)
            out = torch.cat([rt.forward(ids[:, t:t + 1]) for t in range(30)], 1)
            torch.testing.assert_close(out, model(ids), atol=1e-10, rtol=0)


def test_ragged_prefill_then_decode_equals_per_sequence_forwards():
    model = _model("cyclic", layers=3)
    ids = _ids(60, seed=4)
    with torch.no_grad():
        rt = DecodeRuntime(model, batch=2, max_length=64)
        first = rt.forward(ids[:, :41], valid=[41, 29])
        nxt = rt.forward(torch.stack([ids[0, 41:42], ids[1, 29:30]]))
        for b, n in enumerate([41, 29]):
            alone = model(ids[b, :n + 1].unsqueeze(0))
            torch.testing.assert_close(first[b, :n], alone[0, :n], atol=1e-10, rtol=0)
            torch.testing.assert_close(nxt[b, 0], alone[0, n], atol=1e-10, rtol=0)


def test_rollback_restores_the_ssm_state_or_is_refused():
    model = _model(chunk=4, window=3)
    ids = _ids(50, batch=1, seed=5)
    with torch.no_grad():
        rt = DecodeRuntime(model, "rollback=6", batch=1, max_length=64)
        rt.forward(ids[:, :20])
        rt.forward(ids[:, 20:26])  # a speculative chunk crossing a chunk end (23), then undone
        rt.truncate(21)
        after = [rt.forward(ids[:, t:t + 1]) for t in range(21, 40)]
        torch.testing.assert_close(torch.cat(after, 1), model(ids[:, :40])[:, 21:], atol=1e-10, rtol=0)
        with pytest.raises(Exception, match="cannot roll back"):
            rt.truncate(25)  # 15 tokens back: states no longer held
    with torch.no_grad():
        rt = DecodeRuntime(model, "rollback=0", batch=1, max_length=64)
        rt.forward(ids[:, :20])
        with pytest.raises(Exception, match="cannot roll back"):
            rt.truncate(19)


def test_boundary_rows_hold_the_boundary_keys():
    model = _model(layers=1, chunk=4, window=2)
    layer = model.attention_layers()[0]
    ids = _ids(30, batch=1, seed=6)
    seen = {}
    handle = layer.register_forward_hook(lambda m, args, out: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model(ids)
        handle.remove()
        rt = DecodeRuntime(model, batch=1, max_length=32)
        rt.forward(ids[:, :11])
        for t in range(11, 30):
            rt.forward(ids[:, t:t + 1])
        proj = layer.project(seen["x"], torch.arange(30))
    cache = rt.cache.layers[0]
    rows_k, rows_v = cache.boundary_rows(8)
    positions = [0, 3, 7, 11, 15, 19, 23, 27]  # sink, then region c's end 4c + 3
    for row, p in enumerate(positions):
        torch.testing.assert_close(rows_k[:, :, row], proj.k[0][:, :, p], atol=1e-12, rtol=0)
        torch.testing.assert_close(rows_v[:, :, row], proj.v[:, :, p], atol=1e-12, rtol=0)


def test_cache_bytes_by_hand():
    model = _model(layers=2, chunk=8, window=31, context=4096, dtype=torch.float32)
    rt = DecodeRuntime(model, "k=q8_0,v=fp16,rollback=0", batch=1, max_length=4096)
    cache = rt.cache.layers[0]
    row = 2 * 8  # kv heads x head dim = 16 values
    q8_row, fp16_row = 34, 2 * row  # q8_0: one 32-value block (fp16 scale + 32 codes), the row padded into it
    assert cache.ring["k"].bytes_per_token() == q8_row and cache.ring["v"].bytes_per_token() == fp16_row
    per_row = q8_row + fp16_row
    # one float32 copy of the states: per SSM, conv (d_inner + 2N) x 3 and ssm H x P x N
    d_inner, n, heads = 16, 8, 1
    states = 2 * 4 * ((d_inner + 2 * n) * 3 + heads * (d_inner // heads) * n)
    assert cache.state_bytes() == states
    assert cache.retained_bytes(1000) == 32 * per_row + (1 + 125) * per_row + states
    assert cache.retained_bytes(4000) - cache.retained_bytes(2000) == 250 * per_row  # T / P growth only
    assert cache.bytes_per_token() == -(-per_row // 8)
    report = rt.report()
    assert report.bytes_allocated == sum(layer.bytes_allocated() for layer in rt.cache.layers)
    pools = sum(s.bytes_allocated() for layer in rt.cache.layers for s in layer.boundaries.values())
    assert pools == 2 * (512 + 2) * per_row  # 4096 / 8 regions + sink + scratch, per layer
    assert report.retained_bytes == 2 * cache.retained_bytes(report.max_length)


def test_quantized_boundary_rows_stay_close_to_the_full_forward():
    model = _model(dtype=torch.float32, chunk=4, window=4)
    ids = _ids(60, batch=1, seed=7)
    with torch.no_grad():
        full = model(ids)
        rt = DecodeRuntime(model, "k=q8_0,v=q8_0", batch=1, max_length=64)
        out = torch.cat([rt.forward(ids[:, :30])] + [rt.forward(ids[:, t:t + 1]) for t in range(30, 60)], 1)
    assert 0 < (out - full).abs().max() < 0.05 * full.abs().max()


@pytest.mark.parametrize("change,needle", [
    ({"chunk_size": 0}, "chunk_size"), ({"window": -1}, "window"), ({"chunk_size": 1.5}, "chunk_size"),
    ({"chunk_size": 200}, "larger than the context"), ({"window": 129}, "larger than the context"),
    ({"chunking": "random"}, "chunking"), ({"ssm_heads": 3}, "ssm_heads"),
    ({"num_kv_heads": 2, "kv_proj": False}, "kv_proj"),
])
def test_bad_sizes_are_one_line_errors(change, needle):
    from attnlab.config.base import validate_section

    attention = {"type": "attamba", "num_heads": 4, "kv_proj": True, **change}
    with pytest.raises(ConfigError) as err:
        validate_section(ModelConfig, dict(vocab_size=61, d_model=32, num_layers=2, block_size=128,
                                           attention=attention), "model")
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_without_kv_proj_keys_are_x_plus_ssm_of_x():
    cfg = ModelConfig.model_validate(dict(vocab_size=61, d_model=32, num_layers=1, block_size=64,
                                          attention=dict(type="attamba", num_heads=4, chunk_size=4, window=3)))
    layer = DecoderLM(cfg).double().attention_layers()[0]
    assert layer.key is None and layer.value is None
    x = torch.randn(1, 9, 32, dtype=torch.float64)
    with torch.no_grad():
        p = layer.project(x, torch.arange(9))
        restart = layer.rule.restarts(torch.arange(9))
        v = x + layer.ssm_v(x, restart)
    torch.testing.assert_close(p.v, v.view(1, 9, 4, 8).transpose(1, 2), atol=1e-12, rtol=0)


# ---------------------------------------------------------------- on the GPU
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("policy", [None, "k=q8_0,v=q4_0"])
def test_cuda_graph_decode_equals_eager_decode_and_the_full_forward(policy):
    model = _model("cyclic", layers=3, chunk=4, window=6, context=128, dtype=torch.float32).cuda()
    for layer in model.attention_layers():
        layer.scan = "auto"  # the fused scan for the full forward
    assert_graph_decode_equals_eager_and_full(model, _ids(100).cuda(), policy)


@cuda
@pytest.mark.gpu
def test_cuda_training_step_through_flex_and_the_fused_scan_matches_eager():
    model = _model("jitter", layers=2, chunk=8, window=16, context=256, dtype=torch.float32).cuda().train()
    for layer in model.attention_layers():
        layer.scan = "auto"
    ids = _ids(256).cuda()
    loss = model(ids).float().logsumexp(-1).mean()
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for layer in model.attention_layers():
        layer.scan = "chunked"
    ref = model(ids, attention_impl="eager").float().logsumexp(-1).mean()
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=0)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=2e-3, rtol=2e-2)
