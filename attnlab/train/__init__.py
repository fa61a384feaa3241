"""Training: optimizer/schedule, one step, evaluation, atomic resumable checkpoints, DDP setup,
and the loop that ties them together."""

from attnlab.train.checkpoint import (CheckpointError, CheckpointPayload, check_compatible, first_difference,
                                      load_resume_checkpoint, read_checkpoint, save_checkpoint)
from attnlab.train.distributed import (DistInfo, ParallelModel, all_reduce_mean, apply_ddp, barrier,
                                       cleanup, dist_env, init_distributed, is_main)
from attnlab.train.evaluate import EvalResult, Evaluator, perplexity
from attnlab.train.loop import Trainer, build_trainer
from attnlab.train.optim import build_optimizer, classify_parameters, param_groups
from attnlab.train.schedule import lr_at
from attnlab.train.state import TrainState
from attnlab.train.step import NonFiniteError, StepStats, autocast_factory, lm_loss, train_step

__all__ = [
    "CheckpointError", "CheckpointPayload", "DistInfo", "NonFiniteError", "EvalResult", "Evaluator", "ParallelModel", "StepStats", "TrainState",
    "Trainer", "all_reduce_mean", "apply_ddp", "autocast_factory", "barrier", "build_optimizer",
    "build_trainer", "check_compatible", "classify_parameters", "cleanup", "dist_env", "first_difference",
    "init_distributed", "is_main", "lm_loss", "load_resume_checkpoint", "lr_at", "param_groups", "perplexity", "read_checkpoint",
    "save_checkpoint", "train_step",
]
