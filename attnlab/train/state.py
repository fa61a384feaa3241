"""Typed training state and the checkpoint payload built from / restored into it."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from attnlab.errors import CheckpointError
from attnlab.train.checkpoint import FORMAT, VERSION, source_of
from attnlab.train.distributed import DistInfo, all_gather_objects


@dataclass
class TrainState:
    """Everything about progress that is not a tensor. ``step`` counts finished optimizer
    steps; ``tokens_seen`` is global (all ranks); times accumulate over resumed sessions."""

    step: int = 0
    tokens_seen: int = 0
    best_val_loss: float | None = None
    last_val_loss: float | None = None
    last_val_step: int | None = None
    train_time_s: float = 0.0   # time inside training steps (excludes eval and checkpoints)
    wall_time_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainState":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def make_payload(state: TrainState, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 train_config: dict, data_description: str, device: torch.device,
                 info: DistInfo) -> dict[str, Any]:
    """Checkpoint payload. A collective: every rank must call it (RNG states are gathered);
    only rank 0 needs the result."""
    rng = [{k: v.cpu() for k, v in r.items()} for r in all_gather_objects(rng_state(device))]
    return {
        "format": FORMAT,
        "version": VERSION,
        "step": state.step,
        "tokens_seen": state.tokens_seen,
        "best_val_loss": state.best_val_loss,
        "train_state": state.to_dict(),
        "model_config": model.config.model_dump(mode="json"),
        "train_config": train_config,
        "data_description": data_description,
        "world_size": info.world_size,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng,
    }


def _finite_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def restore(payload: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, *,
            device: torch.device, info: DistInfo) -> TrainState:
    """Load model, optimizer and this rank's RNG state from ``payload``; return its TrainState.
    A payload that does not fit (missing/extra/misshapen tensors, an optimizer state of another
    parameter layout, a malformed RNG state or step) raises a one-line ``CheckpointError``
    naming the file. A non-finite ``best_val_loss`` (an older diverged run) reads as None."""
    where = source_of(payload)
    step, tokens = payload.get("step"), payload.get("tokens_seen")
    for key, value in (("step", step), ("tokens_seen", tokens)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CheckpointError(f"{where}: {key} must be a non-negative integer, got {value!r}"[:300])
    try:
        model.load_state_dict(payload["model"])
    except (RuntimeError, TypeError, ValueError, KeyError, AttributeError) as err:
        reason = " ".join(str(err).split())
        reason = reason if len(reason) <= 300 else reason[:297] + "..."
        raise CheckpointError(f"{where}: model weights do not fit this model ({reason})") from None
    try:
        optimizer.load_state_dict(payload["optimizer"])
    except (RuntimeError, TypeError, ValueError, KeyError, AttributeError, IndexError) as err:
        reason = " ".join(str(err).split())[:200]
        raise CheckpointError(f"{where}: optimizer state does not fit this model ({reason})") from None
    rng = payload["rng"]
    if len(rng) == info.world_size:
        try:
            set_rng_state(rng[info.rank], device)
        except (RuntimeError, TypeError, KeyError) as err:
            reason = " ".join(str(err).split())[:200]
            raise CheckpointError(f"{where}: bad RNG state for rank {info.rank} ({reason})") from None
    train_state = payload.get("train_state", {})
    try:
        state = TrainState.from_dict(train_state if isinstance(train_state, dict) else {})
    except TypeError as err:
        raise CheckpointError(f"{where}: bad train_state ({err})") from None
    state.step, state.tokens_seen = step, tokens
    state.best_val_loss = _finite_or_none(payload["best_val_loss"])
    state.last_val_loss = _finite_or_none(state.last_val_loss)
    for key in ("train_time_s", "wall_time_s"):
        value = getattr(state, key)
        setattr(state, key, float(value) if isinstance(value, (int, float)) and math.isfinite(value) else 0.0)
    if not (state.last_val_step is None or (isinstance(state.last_val_step, int) and not isinstance(state.last_val_step, bool))):
        state.last_val_step = None
    return state
