"""Per-layer cache policies (``base;layers=0,21:k_sem=q8_0``): parsing (text and mapping forms
agree), which format each layer gets, byte accounting per layer, that an override really changes
what a layer stores (decode equals the cache it names), and one-line errors checked against the
model."""

from __future__ import annotations

import pytest
import torch

from attnlab.cache import CachePolicy
from attnlab.errors import ConfigError
from attnlab.infer import DecodeRuntime
from attnlab.model.stats import kv_bytes_per_token_layer
from test_cache_parity import VARIANTS, make_model, steps

TEXT = "k_sem=q4_0,k_geo=q8_0,v=q4_0;layers=0,3:k_sem=q8_0,v=fp8_e4m3;layers=1-2:fp16;layers=2:v=nf4"


def test_text_and_mapping_forms_agree_and_later_overrides_win():
    text = CachePolicy.parse(TEXT)
    mapping = CachePolicy.parse({"k_sem": "q4_0", "k_geo": "q8_0", "v": "q4_0", "layers": [
        {"layers": [0, 3], "k_sem": "q8_0", "v": "fp8_e4m3"}, {"layers": [1, 2], "default": "fp16"},
        {"layers": 2, "v": "nf4"}]})
    want = [{"k_sem": "q8_0", "k_geo": "q8_0", "v": "fp8_e4m3"}, {}, {"v": "nf4"},
            {"k_sem": "q8_0", "k_geo": "q8_0", "v": "fp8_e4m3"}]
    defaults = [None, "fp16", "fp16", None]
    for policy in (text, mapping, CachePolicy.parse(text.label)):
        assert [policy.for_layer(i).formats for i in range(4)] == want
        assert [policy.for_layer(i).default for i in range(4)] == defaults
    assert CachePolicy.parse("q8_0").for_layer(5) == CachePolicy.parse("q8_0")
    only = CachePolicy.parse(";layers=1:q4_0")  # no base: the model's own dtype elsewhere
    assert CachePolicy.parse(only.label).for_layer(1).default == "q4_0" and only.for_layer(0).default is None


@torch.no_grad()
def test_each_layer_stores_and_counts_its_own_formats():
    model = make_model(VARIANTS["dba"], dtype=torch.float32, num_layers=4)
    runtime = DecodeRuntime(model, TEXT, batch=1, max_length=12)
    policy = CachePolicy.parse(TEXT)
    report = runtime.cache.report(12)
    for i, (layer, attn) in enumerate(zip(runtime.cache.layers, model.attention_layers())):
        fmts = {name: policy.for_layer(i).format_for(name, "fp32") for name in ("k_sem", "k_geo", "v")}
        assert layer.formats == fmts
        assert report.bytes_per_token_layer[i] == kv_bytes_per_token_layer(attn.dims, fmts)
    assert len(set(report.bytes_per_token_layer)) > 1


@torch.no_grad()
def test_an_override_changes_what_its_layers_store():
    model = make_model(VARIANTS["gqa"])  # float64, 2 layers
    ids = torch.randint(0, 97, (1, 12))

    def decode(policy):
        runtime = DecodeRuntime(model, policy, max_length=12)
        return torch.cat([runtime.forward(ids[:, :4]), steps(runtime, ids[:, 4:])], 1)

    exact = decode("fp64")
    assert torch.equal(decode("q4_0;layers=0-1:fp64"), exact)        # both layers overridden: exact
    assert not torch.equal(decode("fp64;layers=1:q4_0"), exact)      # one layer quantized: it shows
    assert torch.equal(decode("fp64;layers=1:q4_0"), decode("q4_0;layers=0:fp64"))


@pytest.mark.parametrize("policy, needle", [
    ("q8_0;layers=9:q4_0", "layer 9 does not exist (the model has 2 attention layers"),
    ("q8_0;layers=0:k_sem=q4_0", "field 'k_sem' does not exist"),
    ("q8_0;layers=0:k=q5_1", "unknown format"),
    ("q8_0;layers 0:q4_0", "a per-layer override reads layers=<indices>:<formats>"),
    ("q8_0;layers=a-b:q4_0", "expected layer indices"),
    ("q8_0;layers=3-1:q4_0", "must be ascending"),
    ("q8_0;layers=0:tail=4", "tail applies to the whole cache"),
    ("q8_0;layers=0:", "an override must set a format"),
])
def test_bad_overrides_are_one_line_errors(policy, needle):
    model = make_model(VARIANTS["gqa"], dtype=torch.float32)
    with pytest.raises(ConfigError) as info:
        DecodeRuntime(model, policy, max_length=8)
    assert needle in str(info.value) and "\n" not in str(info.value)
