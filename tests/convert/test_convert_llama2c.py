"""llama2.c legacy ``.bin`` import, checked against an independent numpy re-implementation of
llama2.c's ``run.c`` forward (interleaved RoPE), on synthetic files and on the real stories260K
model from the shared reference data; plus export of that model to transformers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from attnlab.api import load
from attnlab.convert import load_llama2c
from attnlab.errors import CheckpointError

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
STORIES = SHARED / "data" / "models" / "stories260K.bin"
needs_stories = pytest.mark.skipif(not STORIES.is_file(),
                                   reason=f"shared reference data absent ({STORIES} not found)")


# ---------------------------------------------------------------- independent reference (numpy)
def read_bin(path: Path) -> tuple[dict, dict]:
    """Parse a legacy llama2.c file with numpy alone, following run.c's memory_map_weights."""
    raw = path.read_bytes()
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = (int(v) for v in np.frombuffer(raw[:28], "<i4"))
    shared, vocab = vocab > 0, abs(vocab)
    floats = np.frombuffer(raw[28:], "<f4").astype(np.float64)
    hs = dim // heads
    offset = 0

    def take(*shape):
        nonlocal offset
        n = int(np.prod(shape))
        out = floats[offset:offset + n].reshape(shape)
        offset += n
        return out

    w = {"emb": take(vocab, dim), "rms_att": take(layers, dim), "wq": take(layers, heads * hs, dim),
         "wk": take(layers, kv_heads * hs, dim), "wv": take(layers, kv_heads * hs, dim),
         "wo": take(layers, dim, heads * hs), "rms_ffn": take(layers, dim), "w1": take(layers, hidden, dim),
         "w2": take(layers, dim, hidden), "w3": take(layers, hidden, dim), "rms_final": take(dim)}
    take(seq_len, hs // 2)  # freq_cis_real
    take(seq_len, hs // 2)  # freq_cis_imag
    w["cls"] = w["emb"] if shared else take(vocab, dim)
    assert offset == floats.size
    cfg = {"dim": dim, "hidden": hidden, "layers": layers, "heads": heads, "kv_heads": kv_heads,
           "vocab": vocab, "seq_len": seq_len}
    return cfg, w


def reference_logits(cfg: dict, w: dict, tokens: list[int]) -> np.ndarray:
    """run.c's forward for every position at once, in float64: RMSNorm eps 1e-5, RoPE on
    interleaved pairs (x[2i], x[2i+1]) with freq 10000^(-2i/head_size), query head h reads kv
    head h // (heads / kv_heads), SwiGLU w2(silu(w1 x) * w3 x)."""
    t_len, heads, kv_heads = len(tokens), cfg["heads"], cfg["kv_heads"]
    hs = cfg["dim"] // heads

    def rmsnorm(x, g):
        return g * x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5)

    angles = np.arange(t_len)[:, None] * (1.0 / 10000.0 ** (np.arange(0, hs, 2) / hs))[None]
    cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]  # (T, 1, hs/2)

    def rope(x):  # (T, heads, hs)
        out = np.empty_like(x)
        out[..., 0::2] = x[..., 0::2] * cos - x[..., 1::2] * sin
        out[..., 1::2] = x[..., 0::2] * sin + x[..., 1::2] * cos
        return out

    causal = np.triu(np.full((t_len, t_len), -np.inf), 1)
    x = w["emb"][tokens]
    for layer in range(cfg["layers"]):
        xb = rmsnorm(x, w["rms_att"][layer])
        q = rope((xb @ w["wq"][layer].T).reshape(t_len, heads, hs))
        k = rope((xb @ w["wk"][layer].T).reshape(t_len, kv_heads, hs))
        v = (xb @ w["wv"][layer].T).reshape(t_len, kv_heads, hs)
        att = np.empty((t_len, heads, hs))
        for h in range(heads):
            kv = h // (heads // kv_heads)
            scores = q[:, h] @ k[:, kv].T / np.sqrt(hs) + causal
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            att[:, h] = (probs / probs.sum(-1, keepdims=True)) @ v[:, kv]
        x = x + att.reshape(t_len, -1) @ w["wo"][layer].T
        xb = rmsnorm(x, w["rms_ffn"][layer])
        gate = xb @ w["w1"][layer].T
        x = x + (gate / (1.0 + np.exp(-gate)) * (xb @ w["w3"][layer].T)) @ w["w2"][layer].T
    return rmsnorm(x, w["rms_final"]) @ w["cls"].T


def write_bin(path: Path, *, dim=24, hidden=40, layers=2, heads=6, kv_heads=2, vocab=37, seq_len=16,
              shared=False, seed=0) -> Path:
    """A random llama2.c legacy file (export.py's legacy_export order)."""
    rng = np.random.default_rng(seed)
    hs = dim // heads

    def rand(*shape, base=0.0):
        return (base + 0.3 * rng.standard_normal(shape)).astype("<f4")

    arrays = [rand(vocab, dim), rand(layers, dim, base=1.0), rand(layers, heads * hs, dim),
              rand(layers, kv_heads * hs, dim), rand(layers, kv_heads * hs, dim), rand(layers, dim, heads * hs),
              rand(layers, dim, base=1.0), rand(layers, hidden, dim), rand(layers, dim, hidden),
              rand(layers, hidden, dim), rand(dim, base=1.0)]
    angles = np.arange(seq_len)[:, None] * (1.0 / 10000.0 ** (np.arange(0, hs, 2) / hs))[None]
    arrays += [np.cos(angles).astype("<f4"), np.sin(angles).astype("<f4")]
    if not shared:
        arrays.append(rand(vocab, dim))
    header = np.array([dim, hidden, layers, heads, kv_heads, vocab if shared else -vocab, seq_len], "<i4")
    path.write_bytes(header.tobytes() + b"".join(a.tobytes() for a in arrays))
    return path


def _logits(model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0].double().numpy()


# ---------------------------------------------------------------- synthetic files
@pytest.mark.parametrize("shared", [False, True], ids=["separate_classifier", "shared_classifier"])
def test_synthetic_file_matches_reference(tmp_path, shared):
    path = write_bin(tmp_path / "m.bin", shared=shared, seed=int(shared))
    model = load_llama2c(path)
    cfg = model.config
    assert (cfg.d_model, cfg.num_layers, cfg.vocab_size, cfg.block_size, cfg.mlp.d_ff) == (24, 2, 37, 16, 40)
    assert cfg.attention.num_heads == 6 and cfg.attention.kv_heads == 2
    assert cfg.attention.rope.style == "interleaved" and cfg.attention.rope.theta == 10000.0
    assert cfg.norm_eps == 1e-5 and cfg.tie_embeddings == shared
    tokens = [1, 5, 9, 2, 30, 30, 7, 11, 0, 36, 4, 4, 8, 19, 21, 3]
    ref = reference_logits(*read_bin(path), tokens)
    assert np.abs(_logits(model, tokens) - ref).max() <= 1e-4
    # the half-split import is the same function with q/k rows permuted
    half = load_llama2c(path, rope_style="half")
    assert half.config.attention.rope.style == "half"
    assert np.abs(_logits(half, tokens) - ref).max() <= 1e-4
    assert not torch.equal(half.state_dict()["body.layers.0.attention.query.weight"],
                           model.state_dict()["body.layers.0.attention.query.weight"])


def test_size_and_header_errors(tmp_path):
    path = write_bin(tmp_path / "m.bin")
    good = path.read_bytes()
    path.write_bytes(good[:-10])
    message = str(pytest.raises(CheckpointError, load_llama2c, path).value)
    assert "truncated" in message and f"needs {len(good)} bytes, the file has {len(good) - 10}" in message
    assert "\n" not in message and "dim=24" in message
    path.write_bytes(good + b"\0" * 8)
    assert "larger than the header implies" in str(pytest.raises(CheckpointError, load_llama2c, path).value)
    path.write_bytes(good[:12])
    assert "too short for a llama2.c header" in str(pytest.raises(CheckpointError, load_llama2c, path).value)
    path.write_bytes(np.array([24, 40, 0, 6, 2, 37, 16], "<i4").tobytes() + good[28:])
    assert "n_layers=0" in str(pytest.raises(CheckpointError, load_llama2c, path).value)
    path.write_bytes(np.array([0x616B3432, 1], "<u4").tobytes() + good[8:])
    assert "magic 'ak42'" in str(pytest.raises(CheckpointError, load_llama2c, path).value)
    path.write_bytes(np.array([24, 40, 2, 5, 2, 37, 16], "<i4").tobytes() + good[28:])
    assert "n_heads=5" in str(pytest.raises(CheckpointError, load_llama2c, path).value)


def test_attnlab_load_reads_a_bin(tmp_path):
    path = write_bin(tmp_path / "model.bin", seed=3)
    tokens = [1, 2, 3, 4]
    assert np.array_equal(_logits(load(path), tokens), _logits(load_llama2c(path), tokens))


# ---------------------------------------------------------------- stories260K (real weights)
@pytest.fixture(scope="module")
def stories():
    return load_llama2c(STORIES)


@pytest.fixture(scope="module")
def greedy(stories) -> list[int]:
    """BOS + 32 greedy tokens, one full forward per step (no cache)."""
    tokens = [1]
    with torch.no_grad():
        for _ in range(32):
            tokens.append(int(stories(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens


@needs_stories
def test_stories260k_config(stories):
    cfg = stories.config
    assert (cfg.d_model, cfg.num_layers, cfg.vocab_size, cfg.block_size, cfg.mlp.d_ff) == (64, 5, 512, 512, 172)
    assert cfg.attention.num_heads == 8 and cfg.attention.kv_heads == 4 and cfg.tie_embeddings
    assert stories.num_parameters() == 260_032  # embedding and classifier shared: counted once


@needs_stories
def test_stories260k_matches_reference_and_greedy_continuation(stories, greedy):
    tokens = greedy
    ref = reference_logits(*read_bin(STORIES), tokens)
    ours = _logits(stories, tokens)
    assert np.abs(ours - ref).max() <= 1e-4
    assert (ref[:-1].argmax(-1) == np.array(tokens[1:])).all()  # the reference picks the same tokens
    # a trained model, not noise: confident on its own continuation, varied, no special tokens
    log_probs = torch.log_softmax(torch.from_numpy(ours[:-1]), -1)
    nll = -log_probs.gather(-1, torch.tensor(tokens[1:])[:, None]).mean().item()
    assert nll < 1.5, nll  # vs log(512) = 6.2 for a uniform guess
    assert len(set(tokens[1:])) >= 15 and not {0, 1, 2} & set(tokens[1:])


@needs_stories
def test_stories260k_cached_greedy_decode_matches_full_forward(stories, greedy):
    """KV-cached decoding (interleaved RoPE at cache offsets) picks the full forward's tokens."""
    from attnlab.infer import generate

    assert generate(stories, [[1]], len(greedy) - 1).tokens[0] == greedy[1:]


@needs_stories
def test_stories260k_export_matches_transformers(stories, tmp_path):
    transformers = pytest.importorskip("transformers", reason="HF parity needs `pip install transformers`")
    from attnlab.convert import export_hf_llama

    hf_model = transformers.LlamaForCausalLM.from_pretrained(export_hf_llama(stories, tmp_path / "hf")).eval()
    tokens = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 1
    with torch.no_grad():
        assert (hf_model(tokens).logits - stories(tokens)).abs().max().item() <= 1e-4
