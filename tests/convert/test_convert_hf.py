"""Hugging Face Llama interop: attnlab logits equal ``transformers.LlamaForCausalLM`` on the same
weights, for imports (GQA/MHA, tied/untied, llama3 RoPE scaling, explicit head_dim, biases,
sharded safetensors, bf16) and exports (half-split and interleaved RoPE, bottleneck), plus the
export -> transformers -> save -> import round trip."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="HF parity tests need `pip install transformers`")
safetensors_torch = pytest.importorskip("safetensors.torch", reason="needs `pip install safetensors`")

from attnlab.api import build_model, load  # noqa: E402
from attnlab.convert import export_hf_llama, load_hf_llama  # noqa: E402

VOCAB = 61
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Weights big enough that any wiring mistake moves the logits; norm gains away from 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))


def _hf_model(seed: int = 0, **kwargs):
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=64,
                                   rms_norm_eps=1e-5, **kwargs)
    model = transformers.LlamaForCausalLM(cfg).eval()
    _randomize(model, seed)
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def _from_pretrained(folder, dtype=None):
    """``LlamaForCausalLM.from_pretrained`` (``dtype=`` is ``torch_dtype=`` before transformers 4.56)."""
    kwargs = {}
    if dtype is not None:
        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
        kwargs["dtype" if (major, minor) >= (4, 56) else "torch_dtype"] = dtype
    return transformers.LlamaForCausalLM.from_pretrained(folder, **kwargs).eval()


def _tokens(seed: int = 0, length: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


def _max_diff(hf_model, ours, ids) -> float:
    with torch.no_grad():
        return (hf_model(ids).logits.float() - ours(ids).float()).abs().max().item()


CASES = {
    "gqa_tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "mha_untied": dict(num_key_value_heads=4, tie_word_embeddings=False),
    "llama3_scaling_head_dim": dict(num_key_value_heads=1, head_dim=12, rope_theta=500.0, rope_scaling=LLAMA3),
    "biases": dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_import_matches_transformers(case, tmp_path):
    hf_model = _hf_model(**CASES[case])
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_hf_llama(tmp_path)
    assert _max_diff(hf_model, ours, _tokens()) <= 1e-4
    cfg, hf_cfg = ours.config, hf_model.config
    att = cfg.attention
    assert (cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.block_size) == (VOCAB, 32, 2, 64)
    assert att.num_heads == 4 and att.kv_heads == hf_cfg.num_key_value_heads
    assert cfg.tie_embeddings == hf_cfg.tie_word_embeddings
    assert (ours.lm_head.weight is ours.embed.weight) == cfg.tie_embeddings
    assert att.bias == hf_cfg.attention_bias and cfg.mlp.bias == hf_cfg.mlp_bias and cfg.mlp.d_ff == 48
    assert att.rope.style == "half" and cfg.norm_eps == 1e-5 and not ours.training
    if case == "llama3_scaling_head_dim":
        assert att.head_dim == 12 and att.rope.theta == 500.0
        assert att.rope.scaling is not None and att.rope.scaling.original_max_position == 16
        # the scaling is not a no-op here: dropping it changes the logits
        unscaled = build_model(cfg.model_copy(update={"attention": att.model_copy(
            update={"rope": att.rope.model_copy(update={"scaling": None})})}))
        unscaled.load_state_dict(ours.state_dict())
        assert _max_diff(hf_model, unscaled.eval(), _tokens()) > 1e-2
    else:
        assert att.head_dim is None and att.rope.scaling is None


def test_import_sharded_safetensors(tmp_path):
    hf_model = _hf_model(seed=1, num_key_value_heads=2)
    single = tmp_path / "single"
    hf_model.save_pretrained(single, safe_serialization=True)
    tensors = safetensors_torch.load_file(str(single / "model.safetensors"))
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((single / "config.json").read_text())
    names = sorted(tensors)
    groups = [names[0::3], names[1::3], names[2::3]]
    weight_map = {}
    for i, group in enumerate(groups, start=1):
        shard = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        safetensors_torch.save_file({n: tensors[n] for n in group}, str(sharded / shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in group})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ours = load_hf_llama(sharded)
    assert _max_diff(hf_model, ours, _tokens(1)) <= 1e-4
    # transformers itself reads the hand-made sharded folder the same way
    reloaded = _from_pretrained(sharded)
    assert _max_diff(reloaded, ours, _tokens(1)) <= 1e-4


def test_import_keeps_bf16_or_casts_on_request(tmp_path):
    hf_model = _hf_model(seed=2, num_key_value_heads=2).to(torch.bfloat16)
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_hf_llama(tmp_path)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    as_fp32 = load_hf_llama(tmp_path, dtype="fp32")
    assert {p.dtype for p in as_fp32.parameters()} == {torch.float32}
    # same (bf16-rounded) weights, computed in fp32 on both sides (reloaded: HF's .float() would
    # keep its RoPE frequency buffer rounded to bf16)
    assert _max_diff(_from_pretrained(tmp_path, torch.float32), as_fp32, _tokens(2)) <= 1e-4
    assert torch.equal(ours.float().state_dict()["embed.weight"], as_fp32.state_dict()["embed.weight"])


def test_import_mistral_without_sliding_window(tmp_path):
    """Mistral shares Llama's tensors and forward once the sliding window is off."""
    cfg = transformers.MistralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                                     rms_norm_eps=1e-5, sliding_window=None)
    hf_model = transformers.MistralForCausalLM(cfg).eval()
    _randomize(hf_model, 7)
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    assert _max_diff(hf_model, load_hf_llama(tmp_path), _tokens(7)) <= 1e-4


def test_attnlab_load_reads_a_hf_folder(tmp_path):
    hf_model = _hf_model(seed=3, num_key_value_heads=2)
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    assert _max_diff(hf_model, load(tmp_path), _tokens(3)) <= 1e-4


# ---------------------------------------------------------------- export
def _attnlab_model(seed: int, attention: dict, **extra):
    torch.manual_seed(seed)
    model = build_model({"vocab_size": VOCAB, "d_model": 32, "num_layers": 2, "block_size": 64,
                         "attention": attention, "mlp": {"type": "swiglu", "d_ff": 40}, **extra})
    _randomize(model, seed)
    return model.eval()


INTERLEAVED = {"type": "standard", "num_heads": 4, "num_kv_heads": 2, "head_dim": 12, "bias": True,
               "rope": {"style": "interleaved", "theta": 300.0,
                        "scaling": {"type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position": 16}}}
EXPORTS = {
    "half_gqa_tied": ({"type": "standard", "num_heads": 4, "num_kv_heads": 2}, {"tie_embeddings": True}),
    "interleaved_llama3_bias_untied": (INTERLEAVED, {"tie_embeddings": False, "norm_eps": 1e-6}),
    "bottleneck": ({"type": "bottleneck", "num_heads": 4, "attn_dim": 16}, {"tie_embeddings": False}),
}


@pytest.mark.parametrize("case", list(EXPORTS))
def test_export_loads_in_transformers_with_equal_logits(case, tmp_path):
    attention, extra = EXPORTS[case]
    ours = _attnlab_model(4, attention, **extra)
    out = export_hf_llama(ours, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    hf_model = _from_pretrained(out)
    assert _max_diff(hf_model, ours, _tokens(4, 40)) <= 1e-4
    assert hf_model.config.tie_word_embeddings == ours.config.tie_embeddings


def test_export_transformers_save_import_round_trip(tmp_path):
    ours = _attnlab_model(5, INTERLEAVED, tie_embeddings=False)
    hf_model = _from_pretrained(export_hf_llama(ours, tmp_path / "a"))
    hf_model.save_pretrained(tmp_path / "b", safe_serialization=True)
    back = load_hf_llama(tmp_path / "b")
    ids = _tokens(5, 40)
    with torch.no_grad():
        assert (back(ids) - ours(ids)).abs().max().item() <= 1e-4
    # everything but the RoPE layout (now half-split, q/k rows permuted) survives the trip
    want = ours.config.model_dump()
    want["attention"]["rope"]["style"] = "half"
    assert back.config.model_dump() == want


def test_export_in_bf16(tmp_path):
    ours = _attnlab_model(6, {"type": "standard", "num_heads": 4})
    out = export_hf_llama(ours, tmp_path / "hf", dtype="bf16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    tensors = safetensors_torch.load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    hf_model = _from_pretrained(out, torch.float32)
    back = load_hf_llama(out, dtype="fp32")
    assert _max_diff(hf_model, back, _tokens(6)) <= 1e-4


# ---------------------------------------------------------------- DBA as a partial-rotary Phi3
DBA_EXPORTS = {
    "gqa_untied": ({"type": "decoupled", "num_heads": 4, "num_kv_heads": 2, "sem_dim": 16, "geo_dim": 32},
                   {"tie_embeddings": False}),
    "tied_qk_interleaved_tied": ({"type": "decoupled", "num_heads": 4, "sem_dim": 24, "geo_dim": 8, "tie_qk": True,
                                  "rope": {"style": "interleaved", "theta": 500.0}}, {"tie_embeddings": True}),
    "mqa_wide_geo": ({"type": "decoupled", "num_heads": 2, "num_kv_heads": 1, "sem_dim": 12, "geo_dim": 36},
                     {"tie_embeddings": False, "norm_eps": 1e-6}),
}


@pytest.mark.parametrize("case", list(DBA_EXPORTS))
def test_dba_export_loads_as_partial_rotary_phi3_with_equal_logits(case, tmp_path):
    from attnlab.convert import export_hf

    attention, extra = DBA_EXPORTS[case]
    ours = _attnlab_model(7, attention, **extra)
    out = export_hf(ours, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    sem, geo = attention["sem_dim"] // attention["num_heads"], attention["geo_dim"] // attention["num_heads"]
    assert config["architectures"] == ["Phi3ForCausalLM"] and config["head_dim"] == sem + geo
    assert int(config["head_dim"] * config["partial_rotary_factor"]) == geo
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf_model).__name__ == "Phi3ForCausalLM"
    assert _max_diff(hf_model, ours, _tokens(7, 40)) <= 1e-4


def test_dba_export_generates_what_attnlab_generates(tmp_path):
    from attnlab.convert import export_hf
    from attnlab.infer.generate import generate

    ours = _attnlab_model(8, DBA_EXPORTS["gqa_untied"][0], tie_embeddings=False)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(export_hf(ours, tmp_path / "hf")).eval()
    prompt = _tokens(8, 12)[:1]
    with torch.no_grad():
        theirs = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                                   pad_token_id=VOCAB)[0, 12:].tolist()
    assert generate(ours, [prompt[0].tolist()], 20).tokens[0] == theirs


# ---------------------------------------------------------------- the tokenizer travels with the export
from pathlib import Path  # noqa: E402

from attnlab.config.data import TokenizerConfig  # noqa: E402
from attnlab.data.tokenizers import build_tokenizer  # noqa: E402

GPT2_FILE = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "tokenizers" / "gpt2.tiktoken").resolve()
TEXTS = ["Hello world", "  leading spaces\n\nand a tab\t!", "émojis 😀 and ünïcode", "123 4567 89.0 1e-5",
         "don't you'll they've", "code: def f(x):\n    return x ** 2\n", ""]


def _tiny(vocab: int):
    torch.manual_seed(0)
    return build_model({"vocab_size": vocab, "d_model": 16, "num_layers": 1, "block_size": 16,
                        "norm": "rmsnorm", "mlp": {"type": "swiglu"}, "attention": {"type": "standard", "num_heads": 2}})


@pytest.mark.parametrize("kind", ["byte", "gpt2"])
def test_export_carries_a_tokenizer_with_equal_ids_and_special_tokens(kind, tmp_path):
    if kind == "gpt2" and not GPT2_FILE.is_file():
        pytest.skip(f"needs {GPT2_FILE}")
    cfg = TokenizerConfig(type=kind, path=str(GPT2_FILE) if kind == "gpt2" else None)
    ours = build_tokenizer(cfg)
    out = export_hf_llama(_tiny(ours.vocab_size), tmp_path / "hf", tokenizer=cfg)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    for text in TEXTS:
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ours.encode(text), text
        assert hf_tok.decode(ours.encode(text)) == text
    config = json.loads((out / "config.json").read_text())
    generation = transformers.GenerationConfig.from_pretrained(str(out))
    eot = 50256 if kind == "gpt2" else None
    assert config["eos_token_id"] == config["bos_token_id"] == config["pad_token_id"] == eot
    assert generation.eos_token_id == eot and hf_tok.eos_token_id == eot
    _from_pretrained(out)  # the folder still loads as a model


def test_export_without_a_tokenizer_writes_the_weights_alone(tmp_path):
    out = export_hf_llama(_tiny(61), tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
