"""Two CPU processes under torchrun (gloo): identical weights on both ranks, a sane loss curve,
and a resumed DDP run equal to an uninterrupted one."""

import math
import os
import subprocess
import sys
import textwrap

import torch

from attnlab.train.checkpoint import read_checkpoint
from attnlab.train.events import read_events
from train_helpers import REPO

SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    sys.path.insert(0, {helpers!r})
    import attnlab.run as R
    from attnlab.train.distributed import distributed_session, dist_env
    from train_helpers import make_run, synthetic_splits, train_config

    out = Path(sys.argv[1])
    trainers = []
    real_build = R.build_trainer
    def capture(*args, **kwargs):
        trainers.append(real_build(*args, **kwargs))
        return trainers[-1]
    R.build_trainer = capture

    cfg = train_config(steps=8, batch_size=2, grad_accum=2, eval_every=4, lr=1e-2, warmup_steps=1)
    splits = synthetic_splits()
    with distributed_session(torch.device("cpu")) as info:
        full = R.execute_run(make_run(out / "full", train=cfg), "torchrun full", splits=splits)
        part = make_run(out / "part", train=cfg)
        R.execute_run(part, "torchrun part", stop_after=3, splits=splits)
        R.execute_run(part, "torchrun part resume", splits=splits)
        torch.save(trainers[0].model.raw.state_dict(), out / f"full_rank{{info.rank}}.pt")
        torch.save(trainers[-1].model.raw.state_dict(), out / f"part_rank{{info.rank}}.pt")
        print("rank", info.rank, "tokens", full.train_tokens_per_s > 0, trainers[0].state.tokens_seen)
""")


def test_two_process_ddp(tmp_path):
    script = tmp_path / "ddp_script.py"
    script.write_text(SCRIPT.format(helpers=str(REPO / "tests" / "train")))
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(script), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    full_dir = tmp_path / "full" / "test" / "g" / "r0"
    part_dir = tmp_path / "part" / "test" / "g" / "r0"
    for kind in ("full", "part"):
        r0 = torch.load(tmp_path / f"{kind}_rank0.pt", weights_only=True)
        r1 = torch.load(tmp_path / f"{kind}_rank1.pt", weights_only=True)
        for k in r0:
            assert torch.equal(r0[k], r1[k]), (kind, k)
    saved = read_checkpoint(full_dir / "last.pt")
    assert saved["world_size"] == 2 and len(saved["rng"]) == 2
    assert not torch.equal(saved["rng"][0]["cpu"], saved["rng"][1]["cpu"])  # per-rank streams
    for k, v in torch.load(tmp_path / "full_rank0.pt", weights_only=True).items():
        assert torch.equal(saved["model"][k], v)
    assert saved["tokens_seen"] == 8 * 2 * 2 * 2 * 16  # steps * ranks * batch * accum * seq_len

    meta = read_events(full_dir / "train.jsonl", "meta")
    assert len(meta) == 1 and meta[0]["world_size"] == 2
    losses = [e["loss"] for e in read_events(full_dir / "train.jsonl", "train")]
    assert len(losses) == 8 and all(math.isfinite(x) and x < 10 for x in losses)
    assert losses[-1] < losses[0] - 0.1
    evals = read_events(full_dir / "train.jsonl", "eval")
    assert [e["step"] for e in evals] == [4, 8] and evals[1]["val_loss"] < evals[0]["val_loss"] + 1e-3
    assert read_events(full_dir / "train.jsonl", "done")

    # resumed DDP run == uninterrupted DDP run
    part_losses = {e["step"]: e["loss"] for e in read_events(part_dir / "train.jsonl", "train")}
    assert part_losses == dict(enumerate(losses, start=1))
    part_saved = read_checkpoint(part_dir / "last.pt")
    for k in saved["model"]:
        assert torch.equal(saved["model"][k], part_saved["model"][k]), k
