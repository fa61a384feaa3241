"""Import/export failures are one-line ``CheckpointError``s naming the cause, exports are atomic,
and ``attnlab.load`` / ``attnlab export`` dispatch on what they are given. No transformers needed:
the Hugging Face folders here come from ``export_hf_llama``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("safetensors", reason="HF folders are safetensors: `pip install safetensors`")
from safetensors.torch import load_file, save_file  # noqa: E402

from attnlab.api import build_model, load  # noqa: E402
from attnlab.cli import main  # noqa: E402
from attnlab.convert import export_hf, export_hf_llama, load_hf_llama  # noqa: E402
from attnlab.errors import CheckpointError  # noqa: E402
from attnlab.train.checkpoint import FORMAT, VERSION, save_checkpoint  # noqa: E402

STANDARD = {"type": "standard", "num_heads": 2, "num_kv_heads": 1}


def _model(attention=STANDARD, **extra):
    torch.manual_seed(0)
    cfg = {"vocab_size": 40, "d_model": 16, "num_layers": 2, "block_size": 32, "attention": attention,
           "mlp": {"type": "swiglu", "d_ff": 24}, "init_std": 0.2, **extra}
    return build_model(cfg).eval()


@pytest.fixture()
def hf_dir(tmp_path) -> Path:
    return export_hf_llama(_model(tie_embeddings=False), tmp_path / "hf")


def _one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        fn(*args, **kwargs)
    text = str(info.value)
    assert "\n" not in text and text
    return text


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))


def test_exported_folder_loads_back_identically(hf_dir):
    ours, back = _model(tie_embeddings=False), load_hf_llama(hf_dir)
    assert back.config == ours.config
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    assert all(p.requires_grad for p in back.parameters())


# ---------------------------------------------------------------- config.json
def test_bad_config_json(hf_dir):
    (hf_dir / "config.json").write_text("{not json")
    assert "config.json: not valid JSON" in _one_line_error(load_hf_llama, hf_dir)


@pytest.mark.parametrize("changes, expected", [
    ({"hidden_size": None}, "required key hidden_size is missing"),
    ({"num_attention_heads": "4"}, "num_attention_heads must be a positive integer"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is unsupported"),
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "model_type='gpt2'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
     "rope_parameters.rope_type='yarn' is unsupported"),
    ({"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 2.0}},
     "rope_scaling.rope_type='linear' is unsupported"),
    ({"rope_parameters": None, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     "rope_scaling.low_freq_factor is missing"),
    ({"num_key_value_heads": 3}, "num_heads=2 is not a multiple of num_kv_heads=3"),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 16},
     "sliding_window=16 is unsupported"),
])
def test_unsupported_or_invalid_config(hf_dir, changes, expected):
    _edit_config(hf_dir, **changes)
    assert expected in _one_line_error(load_hf_llama, hf_dir)


def test_legacy_rope_keys_are_read(hf_dir):
    """transformers < 5 writes rope_theta + rope_scaling instead of rope_parameters."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    _edit_config(hf_dir, rope_parameters=None, rope_theta=123.0, rope_scaling=scaling)
    rope = load_hf_llama(hf_dir).config.attention.rope
    assert rope.theta == 123.0 and rope.scaling.factor == 8.0 and rope.scaling.original_max_position == 16


# ---------------------------------------------------------------- tensors
def _rewrite(folder: Path, edit) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"))


def test_missing_tensor(hf_dir):
    _rewrite(hf_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    assert "missing tensor(s) model.layers.1.mlp.up_proj.weight" in _one_line_error(load_hf_llama, hf_dir)


def test_unexpected_tensor(hf_dir):
    _rewrite(hf_dir, lambda t: t.update({"model.layers.2.self_attn.q_proj.weight": torch.zeros(16, 16)}))
    assert "unexpected tensor(s) model.layers.2.self_attn.q_proj.weight" in _one_line_error(load_hf_llama, hf_dir)


def test_misshapen_tensor(hf_dir):
    _rewrite(hf_dir, lambda t: t.update({"model.norm.weight": torch.ones(17)}))
    assert "model.norm.weight has shape (17,)" in _one_line_error(load_hf_llama, hf_dir)


def test_tied_checkpoint_may_store_the_head_copy(tmp_path):
    folder = export_hf_llama(_model(tie_embeddings=True), tmp_path / "hf")
    _rewrite(folder, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    model = load_hf_llama(folder)
    assert model.lm_head.weight is model.embed.weight
    _rewrite(folder, lambda t: t.update({"lm_head.weight": torch.zeros_like(t["lm_head.weight"])}))
    assert "lm_head.weight differs" in _one_line_error(load_hf_llama, folder)


def test_missing_shard_and_missing_weights(hf_dir):
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "shard model-00002-of-00002.safetensors is missing" in _one_line_error(load_hf_llama, hf_dir)
    (hf_dir / "model.safetensors.index.json").unlink()
    (hf_dir / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken")
    assert "unreadable safetensors file" in _one_line_error(load_hf_llama, hf_dir)
    (hf_dir / "model.safetensors").unlink()
    assert "no model.safetensors" in _one_line_error(load_hf_llama, hf_dir)


# ---------------------------------------------------------------- export refusals and atomicity
@pytest.mark.parametrize("overrides, expected", [
    ({"attention": {"type": "decoupled", "num_heads": 2, "sem_dim": 8, "geo_dim": 8, "null_token": True}},
     "decoupled (DBA) attention with null tokens"),
    ({"norm": "layernorm"}, "norm 'layernorm'"),
    ({"mlp": {"type": "gelu"}}, "mlp type 'gelu'"),
    ({"attention": {**STANDARD, "rope": None}}, "attention without RoPE"),
    ({"layer_overrides": [{"layers": [1], "attention": {"type": "standard", "num_heads": 4}}]},
     "layer 1 has a different attention config"),
    ({"num_layers": None, "topology": {"type": "repeat", "count": 2, "body": {"type": "block"}}},
     "an explicit topology tree"),
])
def test_export_refuses_what_llama_cannot_express(tmp_path, overrides, expected):
    model = _model(**{k: v for k, v in overrides.items() if k != "attention"},
                   **({"attention": overrides["attention"]} if "attention" in overrides else {}))
    message = _one_line_error(export_hf_llama, model, tmp_path / "out")
    assert message.startswith("cannot export to a Hugging Face Llama") and expected in message
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temp folder


DBA = {"type": "decoupled", "num_heads": 2, "sem_dim": 8, "geo_dim": 8}


@pytest.mark.parametrize("overrides, expected", [
    ({"null_token": True}, "null_token"),
    ({"gate": True}, "gate"),
    ({"v_dim": 8}, "v_dim=8"),
    ({"bias": True}, "attention bias"),
    ({"rope": {"scaling": {"type": "llama3", "original_max_position": 16}}}, "rope.scaling llama3"),
    ({"rope": {"theta": 500.0, "inv_freq": [1.0, 0.5]}}, "explicit rope.inv_freq"),
])
def test_dba_export_refuses_what_partial_rotary_cannot_express(tmp_path, overrides, expected):
    message = _one_line_error(export_hf, _model(attention={**DBA, **overrides}), tmp_path / "out")
    assert message.startswith("cannot export DBA as a Hugging Face Phi3 (partial-rotary) model") and expected in message
    assert list(tmp_path.iterdir()) == []


def test_dba_export_refuses_mixed_layers_and_llama_refuses_dba(tmp_path):
    mixed = _model(attention=DBA, layer_overrides=[{"layers": [1], "attention": {**DBA, "geo_dim": 4, "sem_dim": 12}}])
    assert "layer 1 has a different attention config" in _one_line_error(export_hf, mixed, tmp_path / "a")
    message = _one_line_error(export_hf_llama, _model(attention=DBA), tmp_path / "b")
    assert message.startswith("cannot export to a Hugging Face Llama") and "decoupled (DBA)" in message


def test_rotary_factor_gives_back_the_rotary_dims():
    from attnlab.convert.hf_phi3 import rotary_factor

    for head_dim in range(2, 400, 2):
        for rotary in range(2, head_dim, 2):
            factor = rotary_factor(rotary, head_dim)
            assert int(head_dim * factor) == rotary and factor < (rotary + 1) / head_dim


def test_export_of_explicit_rope_frequencies(tmp_path):
    from attnlab.config.attention import RopeConfig
    from attnlab.nn.rope import rope_inv_freq

    formula = rope_inv_freq(RopeConfig(theta=500.0), 8).tolist()
    same = _model(attention={**STANDARD, "rope": {"theta": 500.0, "inv_freq": formula}})
    assert load_hf_llama(export_hf_llama(same, tmp_path / "a")).config.attention.rope.theta == 500.0
    other = _model(attention={**STANDARD, "rope": {"theta": 500.0, "inv_freq": [1.0, 0.5, 0.25, 0.125]}})
    assert "explicit rope.inv_freq" in _one_line_error(export_hf_llama, other, tmp_path / "b")
    # per-kv-head lists: fine when every head uses the formula's frequencies
    gqa = {"type": "standard", "num_heads": 4, "num_kv_heads": 2}
    rope_4 = rope_inv_freq(RopeConfig(theta=500.0), 4).tolist()
    per_head = _model(attention={**gqa, "rope": {"theta": 500.0, "inv_freq": [rope_4, rope_4]}})
    assert load_hf_llama(export_hf_llama(per_head, tmp_path / "c")).config.attention.rope.inv_freq is None
    mixed = _model(attention={**gqa, "rope": {"theta": 500.0, "inv_freq": [rope_4, [1.0, 0.5]]}})
    assert "explicit rope.inv_freq" in _one_line_error(export_hf_llama, mixed, tmp_path / "d")


def test_export_is_atomic_and_refuses_to_overwrite(tmp_path, monkeypatch):
    import safetensors.torch

    def broken_save(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        export_hf_llama(_model(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    (tmp_path / "out").mkdir()  # an empty folder is fine
    export_hf_llama(_model(), tmp_path / "out")
    assert "already exists and is not empty" in _one_line_error(export_hf_llama, _model(), tmp_path / "out")


# ---------------------------------------------------------------- attnlab.load and the CLI
def test_load_dispatches_and_cli_exports(tmp_path, capsys):
    model = _model(attention={**STANDARD, "rope": {"style": "interleaved"}}, tie_embeddings=False)
    run = tmp_path / "run"
    save_checkpoint(run / "last.pt", {"format": FORMAT, "version": VERSION,
                                      "model_config": model.config.model_dump(mode="json"),
                                      "model": model.state_dict()})
    assert main(["export", "--ckpt", str(run), "--out", str(tmp_path / "hf"), "--dtype", "fp32"]) == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out
    exported = load(tmp_path / "hf")  # a HF folder: config.json and no best.pt/last.pt
    assert exported.config.attention.rope.style == "half"  # q/k rows were permuted on export
    ids = torch.randint(0, 40, (1, 20))
    with torch.no_grad():
        assert (exported(ids) - model(ids)).abs().max().item() <= 1e-5
    # a folder with config.json that is not a Llama: the error names the model type
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert "model_type='bert'" in _one_line_error(load, tmp_path / "other")
    # DBA exports as a partial-rotary Phi3; what it cannot express is one line and exit 2
    for name, extra in (("dba", {}), ("dba_null", {"null_token": True})):
        dba = _model(attention={"type": "decoupled", "num_heads": 2, "sem_dim": 8, "geo_dim": 8, **extra})
        save_checkpoint(tmp_path / f"{name}.pt", {"format": FORMAT, "version": VERSION,
                                                   "model_config": dba.config.model_dump(mode="json"),
                                                   "model": dba.state_dict()})
    assert main(["export", "--ckpt", str(tmp_path / "dba.pt"), "--out", str(tmp_path / "phi3")]) == 0
    assert "Phi3ForCausalLM" in capsys.readouterr().out
    assert main(["export", "--ckpt", str(tmp_path / "dba_null.pt"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("attnlab export: error: cannot export") and "\n" not in err
    assert not (tmp_path / "x").exists()
