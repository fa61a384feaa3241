"""Distributed setup in one place: torchrun environment, process group, DDP + compile.

Model code stays single-device; ``apply_ddp`` is the only place that wraps it. Rank 0 alone
logs and writes files; every rank reads its own data shard and takes part in collectives.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from attnlab.config.train import TrainConfig


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a torchrun job (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def dist_env() -> DistInfo:
    """Read ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` as torchrun sets them."""
    env = os.environ
    return DistInfo(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def resolve_device(requested: str, info: DistInfo) -> torch.device:
    """``auto``: this rank's GPU when CUDA is available, else CPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            from attnlab.errors import ConfigError
            raise ConfigError("train.device", "CUDA requested but torch.cuda.is_available() is False", "cuda")
        torch.cuda.set_device(info.local_rank)
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def init_distributed(device: torch.device) -> DistInfo:
    """Join the torchrun process group (NCCL for CUDA, gloo for CPU) when WORLD_SIZE > 1;
    a no-op when it is already initialized or the job has one process."""
    info = dist_env()
    if info.enabled and not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return info


@contextlib.contextmanager
def distributed_session(device: torch.device) -> Iterator[DistInfo]:
    """``init_distributed`` for the duration of a block; destroys the group on exit only if this
    block created it (so nested sessions share one group)."""
    owned = not dist.is_initialized()
    info = init_distributed(device)
    try:
        yield info
    finally:
        if owned:
            cleanup()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks (a copy; ``t`` itself when not distributed)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj from rank 0, obj from rank 1, ...]`` on every rank (``[obj]`` when not distributed)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------- wrapping
@dataclass
class ParallelModel:
    """``module``: what training calls (maybe DDP, maybe compiled); ``raw``: the model itself
    (state_dict, evaluation, optimizer parameters); ``ddp``: the DDP wrapper or None."""

    module: nn.Module
    raw: nn.Module
    ddp: DistributedDataParallel | None = None

    def sync_context(self, sync: bool) -> contextlib.AbstractContextManager:
        """Gradient all-reduce only when ``sync`` (the last micro-step); ``no_sync`` otherwise."""
        if self.ddp is None or sync:
            return contextlib.nullcontext()
        return self.ddp.no_sync()


def apply_ddp(model: nn.Module, cfg: TrainConfig, info: DistInfo, device: torch.device) -> ParallelModel:
    """Move to ``device``, wrap in DDP when the job has several ranks, then ``torch.compile``
    when ``cfg.compile`` (compiling the DDP wrapper lets dynamo split graphs at buckets)."""
    model = model.to(device)
    module: nn.Module = model
    ddp = None
    if info.enabled:
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        module = ddp
    if cfg.compile:
        module = torch.compile(module)
    return ParallelModel(module=module, raw=model, ddp=ddp)
