"""Experiment tracking beside ``train.jsonl``: TensorBoard event files (``train.tracking:
tensorboard``), written by rank 0 from the same events the log records.

``<run_dir>/tensorboard/`` receives, at each logged step, ``train/loss``, ``train/lr``,
``train/grad_norm``, ``train/tokens_per_s``, and at each evaluation ``eval/val_loss`` and
``eval/val_ppl`` (TensorBoard's writer from ``torch.utils.tensorboard``; needs the ``tensorboard``
package: ``pip install attnlab[tracking]``). A resumed run purges what an earlier attempt wrote
after the resume step, so curves do not fork. ``attnlab report`` reads ``train.jsonl`` and is
unaffected.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from attnlab.errors import ConfigError

TENSORBOARD_DIR = "tensorboard"
#: event kind -> (field, tag) pairs written as scalars at the event's step
SCALARS = {
    "train": (("loss", "train/loss"), ("lr", "train/lr"), ("grad_norm", "train/grad_norm"),
              ("tokens_per_s", "train/tokens_per_s")),
    "eval": (("val_loss", "eval/val_loss"), ("val_ppl", "eval/val_ppl")),
}


class TensorBoardTracker:
    """An ``EventLog`` sink: scalars of ``train``/``eval`` events into TensorBoard event files."""

    def __init__(self, run_dir: str | Path, resume_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ConfigError("train.tracking", f"tensorboard needs the tensorboard package "
                                                f"(pip install tensorboard) ({err})", "tensorboard") from None
        self.log_dir = Path(run_dir) / TENSORBOARD_DIR
        # a resume at step S re-does S+1..: hide what an earlier attempt logged from S+1 on
        self.writer = SummaryWriter(str(self.log_dir), purge_step=None if resume_step is None else resume_step + 1)

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        step = fields.get("step")
        pairs = SCALARS.get(event)
        if pairs is None or step is None:
            return
        for field, tag in pairs:
            value = fields.get(field)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(tag, float(value), int(step))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def build_tracker(kind: str, run_dir: str | Path, resume_step: int | None = None):
    """The tracker for ``train.tracking`` (None for ``none``)."""
    if kind == "tensorboard":
        return TensorBoardTracker(run_dir, resume_step)
    return None
