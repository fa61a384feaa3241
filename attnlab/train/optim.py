"""AdamW with decoupled weight decay and parameter groups by role.

Decay applies to ``nn.Linear`` weight matrices only. Embeddings and norm weights decay too
when ``decay_norms_and_embeddings``; biases and other parameters (1-D learned vectors such as
null tokens and gates, or anything outside a Linear) never decay. A weight tied between an
embedding and the LM head is one parameter, counted once, as an embedding.
"""

from __future__ import annotations

import inspect
from typing import Literal

import torch
from torch import nn

from attnlab.config.train import TrainConfig

ParamRole = Literal["linear", "embedding", "norm", "bias", "other"]
_ROLE_PRIORITY = {"embedding": 0, "norm": 1, "linear": 2, "bias": 3, "other": 4}


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)) or \
        "norm" in type(module).__name__.lower()


def _role(module: nn.Module, name: str) -> ParamRole:
    if isinstance(module, nn.Embedding) and name == "weight":
        return "embedding"
    if name == "bias":
        return "bias"
    if _is_norm(module) and name == "weight":
        return "norm"
    if isinstance(module, nn.Linear) and name == "weight":
        return "linear"
    return "other"


def classify_parameters(model: nn.Module) -> dict[str, ParamRole]:
    """First qualified name of every trainable parameter -> its role (tied weights once; a
    weight shared by an embedding and a Linear counts as an embedding)."""
    roles: dict[int, ParamRole] = {}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            role = _role(module, name)
            prev = roles.get(id(param))
            if prev is None or _ROLE_PRIORITY[role] < _ROLE_PRIORITY[prev]:
                roles[id(param)] = role
    return {name: roles[id(p)] for name, p in model.named_parameters() if p.requires_grad}


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Two AdamW groups, ``decay`` (weight_decay=cfg.weight_decay) and ``no_decay`` (0.0),
    in ``named_parameters`` order; empty groups are left out."""
    decaying = {"linear"} | ({"embedding", "norm"} if cfg.decay_norms_and_embeddings else set())
    roles = classify_parameters(model)
    params = dict(model.named_parameters())
    decay = [params[n] for n, role in roles.items() if role in decaying]
    no_decay = [params[n] for n, role in roles.items() if role not in decaying]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def _supports_fused(params: list[torch.Tensor]) -> bool:
    if "fused" not in inspect.signature(torch.optim.AdamW).parameters:
        return False
    return all(p.is_cuda and p.is_floating_point() for p in params)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over ``param_groups(model, cfg)``; ``fused=True`` when every parameter is a CUDA
    float tensor (move the model to its device first), else PyTorch's default implementation."""
    groups = param_groups(model, cfg)
    params = [p for g in groups for p in g["params"]]
    kwargs = {"fused": True} if _supports_fused(params) else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kwargs)
