"""``attnlab tune-cache`` on a tiny run: the chosen policy meets the constraints, is the cheapest
that does, lies on the measured front and its recorded dNLL is what an independent cached decode
measures; ``sample`` picks it up and says so; an impossible budget names the missed constraint,
writes nothing as chosen and keeps an earlier choice."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))

from attnlab.cli import main  # noqa: E402
from attnlab.config.data import DataConfig  # noqa: E402
from attnlab.run import execute_run  # noqa: E402
from train_helpers import make_run, model_config, train_config  # noqa: E402

FAST = ["--formats", "fp16", "q8_0", "q4_0", "--edge-format", "none", "--windows", "2", "--seq-len", "16",
        "--screen-windows", "1", "--screen-seq-len", "8"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("tune") / "out", "r0",
                   model=model_config(vocab_size=256, attention={"type": "standard", "num_heads": 4, "num_kv_heads": 2}),
                   data=DataConfig.model_validate({"source": "embedded", "max_tokens": 20000}),
                   train=train_config(steps=4, eval_every=4, log_every=2))
    execute_run(run, "test")
    return run.run_dir


def test_the_choice_meets_the_constraints_and_is_the_cheapest_on_the_front(run_dir, capsys):
    import torch

    from attnlab.api import load
    from attnlab.bench.nll import cached_decode_nll, eval_windows
    from attnlab.runfolder import RunFolder

    assert main(["tune-cache", str(run_dir), "--max-dnll", "0.05", "--max-bytes-per-token", "600", *FAST]) == 0
    assert "chosen:" in capsys.readouterr().out
    tuned = json.loads((run_dir / "tuned_policy.json").read_text())
    rows = list(csv.DictReader(open(run_dir / "tune" / "front.csv")))
    ok = [r for r in rows if float(r["dnll"]) <= 0.05 and int(r["bytes_per_token"]) <= 600]
    chosen = next(r for r in rows if r["chosen"] == "True")
    assert chosen["policy"] == tuned["policy"] and chosen["on_bytes_front"] == "True"
    assert int(chosen["bytes_per_token"]) == min(int(r["bytes_per_token"]) for r in ok)
    every = list(csv.DictReader(open(run_dir / "tune" / "candidates.csv")))
    assert len(every) == 9 and all(r["dropped"].startswith("bytes") for r in every
                                   if int(r["bytes_per_token"]) > 600)
    assert (run_dir / "tune" / "tune_fronts.png").stat().st_size > 0
    # the recorded dNLL is what an independent cached decode gives on the same windows
    model = load(run_dir).eval()
    tokens, align = RunFolder(run_dir).heldout_tokens(with_align=True)
    windows = eval_windows(tokens, 16, 2, align)
    with torch.no_grad():
        got = cached_decode_nll(model, windows, tuned["policy"])[0].nll - cached_decode_nll(model, windows, "fp16")[0].nll
    assert got == pytest.approx(tuned["evidence"]["dnll"], abs=1e-9)
    # sample uses it by default and says so
    assert main(["sample", "--ckpt", str(run_dir), "--prompt-ids", "1 2 3", "--max-new-tokens", "3",
                 "--temperature", "0"]) == 0
    assert f"cache policy: {tuned['policy']} (tuned:" in capsys.readouterr().err


def test_an_impossible_budget_chooses_nothing_and_keeps_the_earlier_choice(run_dir, capsys):
    before = (run_dir / "tuned_policy.json").read_text() if (run_dir / "tuned_policy.json").exists() else None
    assert main(["tune-cache", str(run_dir), "--max-bytes-per-token", "10", *FAST]) == 2
    err = capsys.readouterr().err
    assert "max_bytes_per_token missed by" in err and "nothing chosen" in err
    after = (run_dir / "tuned_policy.json").read_text() if (run_dir / "tuned_policy.json").exists() else None
    assert after == before
    record = json.loads((run_dir / "tune" / "tune.json").read_text())
    assert record["chosen"] is None and record["closest"]
