"""Zero-training Butterfly retrofit: layer selection, stages, weights kept, what it refuses, and the
``attnlab retrofit butterfly`` command on a run folder and a llama2.c file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from attnlab.cli import main
from attnlab.config.model import ModelConfig
from attnlab.convert.butterfly import parse_layers, retrofit_butterfly, retrofit_config
from attnlab.errors import ConfigError
from attnlab.model.decoder import DecoderLM
from attnlab.nn.attention.butterfly import ButterflyAttention
from attnlab.runfolder import RunFolder

STORIES = Path(__file__).resolve().parents[3] / "shared" / "data" / "models" / "stories260K.bin"


def _dense(layers=4, context=256, attention=None, **extra):
    torch.manual_seed(0)
    cfg = ModelConfig.model_validate(dict(vocab_size=50, d_model=32, num_layers=layers, block_size=context,
                                          attention=attention or {"type": "standard", "num_heads": 4, "num_kv_heads": 2},
                                          **extra))
    return DecoderLM(cfg).eval()


def test_layer_selection():
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("every:2", 5) == [0, 2, 4]
    assert parse_layers("3,1", 4) == [1, 3]
    for bad in ("every:0", "every:x", "1,9", "a,b", ""):
        with pytest.raises(ConfigError, match="layers"):
            parse_layers(bad, 4)


def test_retrofit_keeps_the_weights_and_swaps_only_the_chosen_layers():
    dense = _dense()
    new = retrofit_butterfly(dense, layers="every:2", window=16, block_size=32, partner="xor")
    kinds = [type(layer).__name__ for layer in new.attention_layers()]
    assert kinds == ["ButterflyAttention", "StandardAttention", "ButterflyAttention", "StandardAttention"]
    for (name, a), (_, b) in zip(dense.state_dict().items(), new.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 50, (1, 16))
    with torch.no_grad():  # within the window every query sees its whole prefix: the dense function
        torch.testing.assert_close(new(ids), dense(ids))
        ids = torch.randint(0, 50, (1, 200))
        assert not torch.allclose(new(ids), dense(ids))


def test_stage_by_swapped_layers():
    cfg = retrofit_config(_dense().config, layers=[1, 3], block_size=32, stage_by="swapped")  # 8 blocks: 3 stages
    new = DecoderLM(cfg)
    stages = [layer.stage for layer in new.attention_layers() if isinstance(layer, ButterflyAttention)]
    assert stages == [0, 1]
    by_layer = DecoderLM(retrofit_config(_dense().config, layers=[1, 3], block_size=32))
    assert [layer.stage for layer in by_layer.attention_layers() if isinstance(layer, ButterflyAttention)] == [1, 0]


@pytest.mark.parametrize("options,needle", [
    ({"window": 0}, "window"), ({"block_size": 1000}, "must not exceed the model's context"),
    ({"window": 2.5}, "window"), ({"partner": "nearest"}, "partner"), ({"stage_by": "depth"}, "stage_by"),
])
def test_bad_options_are_one_line_errors(options, needle):
    with pytest.raises(ConfigError) as err:
        retrofit_config(_dense().config, **options)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_model_without_standard_layers_is_refused():
    dba = _dense(attention={"type": "decoupled", "num_heads": 4, "sem_dim": 16, "geo_dim": 32})
    with pytest.raises(ConfigError, match="no attention layer of a kind butterfly retrofits"):
        retrofit_config(dba.config)


def test_cli_retrofits_a_run_folder(tmp_path, capsys):
    src = RunFolder(tmp_path / "dense")
    src.path.mkdir()
    dense = _dense()
    src.save_model(dense)
    (src.path / "resolved_config.json").write_text(json.dumps({"model": dense.config.model_dump(mode="json"),
                                                               "data": {"source": "embedded"}}))
    out = tmp_path / "bf"
    assert main(["retrofit", "butterfly", str(src.path), "--out", str(out), "--window", "16", "--block-size",
                 "32", "--layers", "0,2"]) == 0
    assert "2/4 layers butterfly" in capsys.readouterr().out
    folder = RunFolder(out)
    model = folder.load_model()
    assert [s.type for s in model.config.attention_specs()] == ["butterfly", "standard", "butterfly", "standard"]
    resolved = folder.resolved_config()
    assert resolved["data"] == {"source": "embedded"} and resolved["retrofit"]["window"] == 16
    assert main(["retrofit", "butterfly", str(src.path), "--out", str(out)]) == 2  # never over a checkpoint
    assert main(["retrofit", "butterfly", str(src.path), "--out", str(tmp_path / "x"), "--window", "0"]) == 2
    assert "window" in capsys.readouterr().err


@pytest.mark.skipif(not STORIES.is_file(), reason="needs ../shared/data")
def test_cli_retrofits_llama2c_stories(tmp_path):
    out = tmp_path / "stories_bf"
    assert main(["retrofit", "butterfly", str(STORIES), "--out", str(out), "--window", "32", "--block-size", "64"]) == 0
    model = RunFolder(out).load_model()
    assert all(s.type == "butterfly" for s in model.config.attention_specs())
