"""Tiny configs, synthetic data and run records shared by the training tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from attnlab.config.cache import CacheConfig
from attnlab.config import DataConfig, ModelConfig, TrainConfig
from attnlab.data import TokenSplits
from attnlab.manifest import ResolvedRun

VOCAB = 64
REPO = Path(__file__).resolve().parents[2]


def model_config(**overrides) -> ModelConfig:
    data = {"vocab_size": VOCAB, "d_model": 32, "block_size": 16, "num_layers": 2,
            "attention": {"type": "decoupled", "num_heads": 4, "sem_dim": 16, "geo_dim": 16}}
    data.update(overrides)
    return ModelConfig.model_validate(data)


def train_config(**overrides) -> TrainConfig:
    data = {"steps": 6, "batch_size": 4, "seq_len": 16, "lr": 3e-3, "warmup_steps": 2,
            "eval_every": 3, "eval_batches": 2, "log_every": 1, "device": "cpu", "seed": 7}
    data.update(overrides)
    return TrainConfig.model_validate(data)


def synthetic_splits(num_tokens: int = 6000, seed: int = 0) -> TokenSplits:
    """A learnable stream: a noisy cycle over the vocabulary (next token mostly = token + 1)."""
    rng = np.random.default_rng(seed)
    base = np.arange(num_tokens) % VOCAB
    noise = rng.integers(0, VOCAB, size=num_tokens)
    tokens = np.where(rng.random(num_tokens) < 0.1, noise, base).astype(np.uint16)
    cut = int(num_tokens * 0.9)
    return TokenSplits(train=tokens[:cut], val=tokens[cut:], vocab_size=VOCAB, tokenizer=None,
                       description=f"synthetic cycle ({num_tokens} tokens, seed {seed})")


def make_run(out_dir: Path, run_id: str = "r0", *, model: ModelConfig | None = None,
             train: TrainConfig | None = None, data: DataConfig | None = None) -> ResolvedRun:
    model = model or model_config()
    train = train or train_config()
    data = data or DataConfig()
    cache = CacheConfig()
    resolved = {"model": model.model_dump(mode="json"), "data": data.model_dump(mode="json"),
                "train": train.model_dump(mode="json"), "cache": cache.model_dump(mode="json")}
    return ResolvedRun(name="test", group="g", run_id=run_id, description="a test run", model=model,
                       data=data, train=train, cache=cache, run_dir=Path(out_dir) / "test" / "g" / run_id,
                       resolved=resolved)
