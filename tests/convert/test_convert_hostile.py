"""Hostile importer inputs (issue 11): malformed Hugging Face ``config.json`` values and llama2.c
headers are one-line ``CheckpointError``s, and a config claiming far more layers than its weights
hold fails before any model skeleton is built."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("safetensors", reason="HF folders are safetensors: `pip install safetensors`")
from safetensors.torch import load_file, save_file  # noqa: E402

from attnlab.api import build_model, load  # noqa: E402
from attnlab.cli import main  # noqa: E402
from attnlab.convert import export_hf_llama, load_hf_llama, load_llama2c  # noqa: E402
from attnlab.convert.hf import hf_config_to_model_config  # noqa: E402
from attnlab.convert.sources import source_model_config  # noqa: E402
from attnlab.errors import AttnlabError, CheckpointError  # noqa: E402


def _model(**extra):
    torch.manual_seed(0)
    cfg = {"vocab_size": 40, "d_model": 16, "num_layers": 2, "block_size": 32,
           "attention": {"type": "standard", "num_heads": 2, "num_kv_heads": 1},
           "mlp": {"type": "swiglu", "d_ff": 24}, "init_std": 0.2, **extra}
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory) -> Path:
    return export_hf_llama(_model(tie_embeddings=False), tmp_path_factory.mktemp("hf") / "hf")


@pytest.fixture()
def hf_dir(hf_src, tmp_path) -> Path:
    out = tmp_path / "hf"
    out.mkdir()
    for f in hf_src.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


def _edit(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _one_line(fn, *args, cls=CheckpointError) -> str:
    with pytest.raises(cls) as info:
        fn(*args)
    text = str(info.value)
    assert text and "\n" not in text, text
    return text


# ------------------------------------------------------------------ config.json types
@pytest.mark.parametrize("key, value, expected", [
    ("model_type", ["llama"], "model_type must be a string"),
    ("model_type", {"a": 1}, "model_type must be a string"),
    ("architectures", 5, "architectures must be a list of strings"),
    ("architectures", [5], "architectures must be a list of strings"),
    ("architectures", "LlamaForCausalLM", "architectures must be a list of strings"),
    ("sliding_window", "abc", "sliding_window must be an integer"),
    ("sliding_window", 4.5, "sliding_window must be an integer"),
    ("use_sliding_window", "yes", "use_sliding_window must be true or false"),
    ("hidden_act", ["silu"], "hidden_act must be a string"),
    ("partial_rotary_factor", "1", "partial_rotary_factor must be a number"),
    ("head_dim", "8", "head_dim must be an integer"),
    ("rope_scaling", [1, 2], "rope_scaling must be a mapping"),
    ("rope_parameters", {"rope_type": ["llama3"], "rope_theta": 1e4}, "rope_type=['llama3'] is unsupported"),
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 1e4, "factor": "8", "low_freq_factor": 1,
                         "high_freq_factor": 4, "original_max_position_embeddings": 16}, "factor must be"),
    ("rope_parameters", "x", "rope_parameters must be a mapping"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": float("inf")}, "rope_theta must be a positive finite"),
    ("rope_theta", "1e4", "rope_theta must be a number"),
    ("rms_norm_eps", float("nan"), "rms_norm_eps must be a positive finite number"),
    ("initializer_range", -1.0, "initializer_range must be a positive finite number"),
    ("hidden_size", 2**63, "hidden_size must be a positive integer"),
    ("vocab_size", 10**30, "vocab_size must be a positive integer"),
    ("num_attention_heads", True, "num_attention_heads must be a positive integer"),
    ("tie_word_embeddings", "false", "tie_word_embeddings must be true or false"),
])
def test_bad_config_value_is_one_line(hf_dir, key, value, expected):
    _edit(hf_dir, **{key: value})
    text = _one_line(load_hf_llama, hf_dir)
    assert expected in text and str(hf_dir / "config.json") in text
    # the compile-time reader (teacher/source configs) says the same
    assert expected in _one_line(source_model_config, hf_dir, cls=AttnlabError)


def test_config_not_an_object_in_memory():
    assert "expected a JSON object" in _one_line(hf_config_to_model_config, [1, 2])


def test_cli_sample_on_bad_config_exits_2(hf_dir, capsys):
    _edit(hf_dir, architectures=5)
    assert main(["sample", "--ckpt", str(hf_dir), "--prompt-ids", "1", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "architectures must be a list of strings" in err and "\n" not in err and "Traceback" not in err


# ------------------------------------------------------------------ weights vs config
def test_million_layer_config_fails_fast(hf_dir):
    _edit(hf_dir, num_hidden_layers=1_000_000)
    start = time.perf_counter()
    text = _one_line(load_hf_llama, hf_dir)
    assert time.perf_counter() - start < 1.0  # no 1,000,000-layer skeleton was built
    assert "1000000" in text  # the size limit or the weights check, whichever comes first


@pytest.mark.parametrize("layers", [4000, 4096])
def test_many_layer_config_within_limits_fails_before_building(hf_dir, layers, monkeypatch):
    _edit(hf_dir, num_hidden_layers=layers)
    import attnlab.convert.common as common

    monkeypatch.setattr(common, "DecoderLM", lambda *a, **k: pytest.fail("skeleton built before the weights check"))
    start = time.perf_counter()
    text = _one_line(load_hf_llama, hf_dir)
    assert time.perf_counter() - start < 1.0
    assert f"num_hidden_layers={layers} but the weights hold tensors for 2 layer(s)" in text


def test_more_layers_than_weights(hf_dir):
    _edit(hf_dir, num_hidden_layers=3)
    assert "num_hidden_layers=3 but the weights hold tensors for 2 layer(s)" in _one_line(load_hf_llama, hf_dir)


@pytest.mark.parametrize("key, value, tensor", [
    ("hidden_size", 32, "weight"),
    ("intermediate_size", 48, "mlp."),
    ("vocab_size", 41, "(41, 16)"),
    ("num_key_value_heads", 2, "self_attn.k_proj.weight"),
])
def test_shape_mismatch_named_before_build(hf_dir, key, value, tensor, monkeypatch):
    _edit(hf_dir, **{key: value})
    import attnlab.convert.common as common

    def no_build(*a, **k):  # the shape check must come first
        raise AssertionError("model skeleton built before the shape check")

    monkeypatch.setattr(common, "DecoderLM", no_build)
    text = _one_line(load_hf_llama, hf_dir)
    assert tensor in text and "the config needs" in text


def test_weights_flattened(hf_dir):
    tensors = load_file(str(hf_dir / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"].flatten()
    save_file(tensors, str(hf_dir / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.weight has shape (256,)" in _one_line(load_hf_llama, hf_dir)


def test_attnlab_load_on_hostile_hf_folder(hf_dir):
    _edit(hf_dir, model_type=["llama"], architectures=None)
    assert "model_type must be a string" in _one_line(load, hf_dir)


# ------------------------------------------------------------------ llama2.c headers
def _llama2c(path: Path, header: tuple[int, ...], payload: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<7i", *header) + payload)
    return path


@pytest.mark.parametrize("header, expected", [
    ((16, 24, 10**9, 2, 2, 40, 32), "truncated"),  # a billion layers in a few bytes: size check first
    ((2**31 - 1, 24, 2, 1, 1, 40, 32), "heads of even size"),
    ((2**31 - 2, 24, 2, 1, 1, 40, 32), "truncated"),
    ((16, 24, 2, 2, 2, -(2**31), 32), "truncated"),
    ((16, -1, 2, 2, 2, 40, 32), "hidden_dim=-1"),
    ((16, 24, 2, 3, 3, 40, 32), "must split into n_heads=3"),
    ((16, 24, 2, 2, 3, 40, 32), "not a multiple of n_kv_heads=3"),
])
def test_hostile_llama2c_headers(tmp_path, header, expected):
    path = _llama2c(tmp_path / "m.bin", header, b"\0" * 64)
    start = time.perf_counter()
    assert expected in _one_line(load_llama2c, path)
    assert time.perf_counter() - start < 1.0


def test_llama2c_header_via_source_config(tmp_path):
    path = _llama2c(tmp_path / "m.bin", (16, 24, 2, 3, 3, 40, 32))
    assert "n_heads=3" in _one_line(source_model_config, path, cls=AttnlabError)


def test_llama2c_huge_header_at_compile_time(tmp_path):
    """A teacher/source .bin whose header claims a billion layers fails on its size at once."""
    path = _llama2c(tmp_path / "m.bin", (16, 24, 10**9, 2, 2, 40, 32), b"\0" * 64)
    start = time.perf_counter()
    assert "truncated" in _one_line(source_model_config, path, cls=AttnlabError)
    assert time.perf_counter() - start < 1.0


# ------------------------------------------------------------------ run folders as sources
@pytest.mark.parametrize("text, expected", [
    ("{not json", "unreadable resolved_config.json"),
    ("[1, 2]", "must be a JSON object"),
    ('{"model": 5}', "no model section"),
    ("\xff\xfe", "unreadable resolved_config.json"),
])
def test_source_config_of_malformed_run_folder(tmp_path, text, expected):
    (tmp_path / "resolved_config.json").write_bytes(text.encode("latin1"))
    assert expected in _one_line(source_model_config, tmp_path, cls=AttnlabError)


# ------------------------------------------------------------------ hostile JSON files
@pytest.mark.parametrize("text", [
    "[" * 100_000 + "]" * 100_000, '{"hidden_size": ' + "9" * 5000 + "}", "\xff", "NaN", "",
])
def test_hostile_config_json_text(hf_dir, text):
    (hf_dir / "config.json").write_bytes(text.encode("latin1"))
    assert "config.json" in _one_line(load_hf_llama, hf_dir)


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"weight_map": ' + "9" * 5000 + "}", "[1]",
                                  '{"weight_map": {"a": 5}}'])
def test_hostile_safetensors_index(hf_dir, text):
    (hf_dir / "model.safetensors.index.json").write_bytes(text.encode("latin1"))
    assert "not a safetensors index" in _one_line(load_hf_llama, hf_dir)


def test_config_json_with_inf_literal(hf_dir):
    import re

    text = (hf_dir / "config.json").read_text()
    (hf_dir / "config.json").write_text(re.sub(r'"rms_norm_eps": [^,\n]+', '"rms_norm_eps": Infinity', text))
    assert "rms_norm_eps must be a positive finite number" in _one_line(load_hf_llama, hf_dir)
