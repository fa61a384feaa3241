"""CUDA paths: bf16 autocast, fused AdamW, torch.compile, NCCL DDP. Skipped without CUDA."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import attnlab.run as run_mod
from attnlab.train.checkpoint import read_checkpoint
from attnlab.train.events import read_events
from train_helpers import REPO, make_run, synthetic_splits, train_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _capture_trainers(monkeypatch):
    trainers = []
    real = run_mod.build_trainer

    def capture(*args, **kwargs):
        trainers.append(real(*args, **kwargs))
        return trainers[-1]
    monkeypatch.setattr(run_mod, "build_trainer", capture)
    return trainers


@pytest.mark.parametrize("compile_", [False, True])
def test_cuda_bf16_fused_run_and_resume(tmp_path, monkeypatch, compile_):
    trainers = _capture_trainers(monkeypatch)
    cfg = train_config(device="cuda", steps=20, eval_every=10, log_every=5, compile=compile_)
    run = make_run(tmp_path, train=cfg)
    splits = synthetic_splits()
    run_mod.execute_run(run, stop_after=10, splits=splits)
    result = run_mod.execute_run(run, splits=splits)
    trainer = trainers[-1]
    assert trainer.device.type == "cuda"
    assert all(g.get("fused") for g in trainer.optimizer.param_groups)
    with trainer.autocast():
        assert torch.get_autocast_dtype("cuda") == torch.bfloat16 and torch.is_autocast_enabled("cuda")
    losses = [e["loss"] for e in read_events(run.run_dir / "train.jsonl", "train")]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert result.steps == 20 and result.val_loss < 4.0
    payload = read_checkpoint(run.run_dir / "last.pt")
    assert "cuda" in payload["rng"][0]
    assert all(not k.startswith("_orig_mod") for k in payload["model"])
    assert all(v.device.type == "cpu" for v in payload["model"].values())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("compile_", [False, True])
def test_two_gpu_nccl_ddp(tmp_path, compile_):
    script = tmp_path / "ddp_gpu.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        from pathlib import Path
        import torch
        sys.path.insert(0, {str(REPO / "tests" / "train")!r})
        import attnlab.run as R
        from train_helpers import make_run, synthetic_splits, train_config
        trainers = []
        real = R.build_trainer
        def capture(*a, **k):
            trainers.append(real(*a, **k))
            return trainers[-1]
        R.build_trainer = capture
        out = Path(sys.argv[1])
        cfg = train_config(device="cuda", steps=12, batch_size=4, grad_accum=2, eval_every=6,
                           compile={compile_!r})
        R.execute_run(make_run(out, train=cfg), "torchrun gpu", splits=synthetic_splits())
        rank = trainers[0].info.rank
        sd = {{k: v.cpu() for k, v in trainers[0].model.raw.state_dict().items()}}
        torch.save(sd, out / f"rank{{rank}}.pt")
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    print(proc.stderr[-4000:])  # shown with -s: warnings from compile/DDP
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    run_dir = tmp_path / "test" / "g" / "r0"
    meta = read_events(run_dir / "train.jsonl", "meta")
    assert meta[0]["world_size"] == 2 and meta[0]["device"].startswith("cuda")
    assert read_events(run_dir / "train.jsonl", "done")
    losses = [e["loss"] for e in read_events(run_dir / "train.jsonl", "train")]
    assert len(losses) == 12 and losses[-1] < losses[0]
