"""A variant is one module plus its registration: a toy variant defined in this test file is
registered, then compiled into a plan (KV bytes), trained through the runner, and decoded with a
quantized cache (through the runtime and the same kernels' torch paths) against uncached
generation — without touching any attnlab module."""

from __future__ import annotations

from typing import ClassVar, Literal

import pytest
import torch
from torch import nn

from attnlab.api import load
from attnlab.config.attention import AttentionDims, AttentionSpec, KeyField
from attnlab.config.variants import register_variant, registered_variants, unregister_variant
from attnlab.infer import DecodeRuntime, generate, generate_uncached
from attnlab.manifest import load_plan_from_dict
from attnlab.nn.attention.base import AttentionLayer, Projected, split_heads
from attnlab.run import execute_plan
from attnlab.summary import format_plan


class TiedKVConfig(AttentionSpec):
    """Toy: one shared kv head whose keys are also its values (no RoPE, no positions)."""

    description: ClassVar[str] = "toy: multi-query attention with values tied to the keys"
    mixed_policy: ClassVar[dict[str, str]] = {"kv": "q8_0"}

    type: Literal["toy_tied_kv"] = "toy_tied_kv"
    kv_dim: int = 16

    def dims(self, d_model: int) -> AttentionDims:
        return AttentionDims(self.num_heads, 1, (KeyField("kv", self.kv_dim, False),), self.kv_dim, value_alias="kv")

    def approx_params(self, d_model: int) -> int:
        return d_model * (self.num_heads * self.kv_dim + self.kv_dim) + self.num_heads * self.kv_dim * d_model


class TiedKVAttention(AttentionLayer):
    def __init__(self, cfg: TiedKVConfig, d_model: int, layer_index: int):
        super().__init__(cfg.dims(d_model), layer_index, cfg.dropout)
        self.query = nn.Linear(d_model, cfg.num_heads * cfg.kv_dim, bias=False)
        self.kv = nn.Linear(d_model, cfg.kv_dim, bias=False)
        self.out = nn.Linear(cfg.num_heads * cfg.kv_dim, d_model, bias=False)

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> Projected:
        q = split_heads(self.query(x), self.dims.num_heads)
        kv = split_heads(self.kv(x), 1)
        return Projected([q], [kv], kv)


@pytest.fixture
def toy_variant():
    register_variant(TiedKVConfig, TiedKVAttention, replace=True)
    yield
    unregister_variant("toy_tied_kv")


def manifest(out_dir):
    return {"version": 1, "name": "toy", "defaults": {"out_dir": str(out_dir)},
            "model": {"vocab_size": 256, "d_model": 32, "num_layers": 2, "block_size": 32,
                      "attention": {"type": "toy_tied_kv", "num_heads": 4, "kv_dim": 16}},
            "data": {"source": "embedded", "tokenizer": {"type": "byte"}, "max_tokens": 20000},
            "train": {"steps": 4, "batch_size": 4, "seq_len": 32, "eval_every": 2, "eval_batches": 2,
                      "log_every": 2, "device": "cpu"},
            "cache": {"kv": "q8_0"},
            "groups": [{"name": "zoo", "runs": [{"id": "toy"}]}]}


def test_a_variant_from_a_test_file_plans_trains_and_decodes(toy_variant, tmp_path):
    assert "toy_tied_kv" in registered_variants()
    plan = load_plan_from_dict(manifest(tmp_path / "runs"), tmp_path)
    text = format_plan(plan)
    assert "toy_tied_kv h4/kv1 kv16/v16" in text             # the variant's label
    assert "KV B/tok fp16" in text and f"{2 * 2 * 16:,}" in text  # 2 layers x 16 x fp16, values not stored twice
    [result] = execute_plan(plan, "pytest")
    assert result.steps == 4 and result.val_loss == result.val_loss  # finite
    payload = torch.load(plan.runs[0].run_dir / "last.pt", weights_only=True)
    assert payload["model_config"]["attention"]["type"] == "toy_tied_kv"

    model = load(plan.runs[0].run_dir).float().eval()
    prompts = [list(b"hello "), list(b"abc")]
    want = [generate_uncached(model, p, 8) for p in prompts]
    assert generate(model, prompts, 8, cache_policy="fp32", prefill_chunk=4).tokens == want
    rt = DecodeRuntime(model, "kv=q8_0", batch=1, max_length=16)
    assert set(rt.cache.layers[0].stores) == {"kv"}
    assert rt.report().bytes_per_token == 2 * 34               # q8_0: 16 values -> one 34-byte block


def test_an_unregistered_type_is_a_one_line_error(tmp_path):
    from attnlab.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown attention type 'toy_tied_kv'"):
        load_plan_from_dict(manifest(tmp_path / "runs"), tmp_path)


def test_a_cache_spec_with_per_block_rows_is_refused_by_the_per_token_cache():
    from attnlab.cache import CachePolicy
    from attnlab.cache.kv import LayerCache
    from attnlab.errors import AttnlabError

    dims = AttentionDims(2, 1, (KeyField("k", 8, True), KeyField("summary", 8, False, row="block")), 8)
    with pytest.raises(AttnlabError, match="summary are not one row per token"):
        LayerCache(dims, CachePolicy(), 1, 16, torch.device("cpu"), torch.float32)
