"""Profile one compiled training step of a paper preset on the GPU: top CUDA kernels by time.

    python benchmarks/profile_train_step.py [--preset 125m] [--run baseline] [--batch 32]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attnlab.manifest import load_plan  # noqa: E402
from attnlab.model import build_model  # noqa: E402
from attnlab.train.distributed import DistInfo, apply_ddp  # noqa: E402
from attnlab.train.optim import build_optimizer  # noqa: E402
from attnlab.train.step import autocast_factory, train_step  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="125m")
    ap.add_argument("--run", default="baseline")
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    run = next(r for r in load_plan(ROOT / f"configs/paper/dba_{args.preset}.yml").runs if r.run_id == args.run)
    cfg = run.train.model_copy(update={"compile": True, "precision": "bf16", "device": "cuda"})
    model = build_model(run.model).cuda()
    wrapped = apply_ddp(model, cfg, DistInfo(), torch.device("cuda"))
    opt = build_optimizer(model, cfg)
    autocast = autocast_factory("bf16", torch.device("cuda"))
    x = torch.randint(0, run.model.vocab_size, (args.batch, 1024), device="cuda")

    def step():
        train_step(wrapped, opt, [(x, x)], lr=1e-4, grad_clip=1.0, autocast=autocast)

    for _ in range(4):
        step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
