"""The command line end to end: help, compile/--print-plan, every shipped manifest, user errors
(one line, exit 2, nothing lost), run -> sample on a tiny manifest."""

from pathlib import Path

import pytest
import yaml

from attnlab.cli import main

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p for p in (ROOT / "configs").rglob("*.yml") if "pieces" not in p.parts)


@pytest.mark.parametrize("command", ["compile", "run", "train", "sample", "prepare"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: attnlab " + command in capsys.readouterr().out


@pytest.mark.parametrize("manifest", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_manifest_compiles_with_a_plan(manifest, capsys):
    assert main(["compile", str(manifest), "--print-plan"]) == 0
    out = capsys.readouterr().out
    assert "KV B/tok fp16" in out and "params" in out


def test_paper_1b_plan_shows_dba_smaller_than_baseline(capsys):
    assert main(["compile", str(ROOT / "configs/paper/dba_1b.yml"), "--print-plan"]) == 0
    out = capsys.readouterr().out
    # 22 layers x 2 x 2048 x 2 bytes vs 22 x (256 + 1024 + 1280) x 2
    assert "180,224" in out and "112,640" in out
    assert "k_sem=q4_0,k_geo=q8_0,v=q4_0" in out and "42,944" in out


def _tiny_manifest(tmp_path: Path, steps: int = 6) -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    manifest = {
        "version": 1, "name": "tiny", "defaults": {"out_dir": str(tmp_path / "runs")},
        "model": {"vocab_size": 256, "d_model": 32, "num_layers": 2, "block_size": 32,
                  "attention": {"type": "standard", "num_heads": 4}},
        "data": {"source": "text", "path": str(corpus), "tokenizer": {"type": "byte"}},
        "train": {"steps": steps, "batch_size": 4, "eval_every": 3, "eval_batches": 2, "log_every": 2},
        "groups": [{"name": "g", "runs": [
            {"id": "base"},
            {"id": "dba", "model": {"attention": {"type": "decoupled", "num_heads": 4, "sem_dim": 8, "geo_dim": 16, "null_token": True}}},
        ]}],
    }
    path = tmp_path / "tiny.yml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def test_run_then_sample_end_to_end(tmp_path, capsys):
    manifest = _tiny_manifest(tmp_path)
    assert main(["run", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert "g/base" in out and "g/dba" in out and "val ppl" in out
    run_dir = tmp_path / "runs" / "tiny" / "g" / "dba"
    for name in ("command.txt", "resolved_config.json", "env.json", "train.jsonl", "last.pt", "best.pt"):
        assert (run_dir / name).is_file(), name
    assert main(["sample", "--ckpt", str(run_dir), "--prompt", "the quick", "--max-new-tokens", "8", "--temperature", "0"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("the quick") and len(text.rstrip("\n")) >= len("the quick")
    assert main(["sample", "--ckpt", str(run_dir), "--prompt-ids", "1 2 3", "--max-new-tokens", "4"]) == 0
    assert len(capsys.readouterr().out.split()) == 7


def test_dry_run_writes_nothing(tmp_path, capsys):
    manifest = _tiny_manifest(tmp_path)
    assert main(["run", str(manifest), "--dry-run", "train.steps=2"]) == 0
    assert "dry run" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv, needle", [
    (["compile", "missing.yml"], "missing.yml"),
    (["run", "{manifest}", "model.attention.num_kv_heads=3"], "num_kv_heads"),
    (["run", "{manifest}", "train.steps=ten"], "train.steps"),
    (["run", "{manifest}", "--group", "nope"], "nope"),
    (["sample", "--ckpt", "{tmp}/nowhere", "--prompt-ids", "1"], "nowhere"),
    (["train", "{manifest}"], "--run"),
])
def test_user_errors_are_one_line_with_exit_2(argv, needle, tmp_path, capsys):
    manifest = _tiny_manifest(tmp_path)
    argv = [a.format(manifest=manifest, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err


def test_corrupted_checkpoint_is_a_one_line_error_and_is_left_alone(tmp_path, capsys):
    manifest = _tiny_manifest(tmp_path, steps=2)
    assert main(["train", str(manifest), "--run", "g/base"]) == 0
    ckpt = tmp_path / "runs" / "tiny" / "g" / "base" / "last.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(ckpt), "--prompt-ids", "1"]) == 2
    err = capsys.readouterr().err
    assert "last.pt" in err and len(err.strip().splitlines()) == 1
    assert ckpt.read_bytes() == data[: len(data) // 2]


def test_prepare_command(tmp_path, capsys):
    src = tmp_path / "a.txt"
    src.write_text("hello world\n" * 50)
    out = tmp_path / "tokens.npy"
    assert main(["prepare", str(src), "-o", str(out), "--tokenizer", "byte"]) == 0
    assert out.is_file() and "600 tokens" in capsys.readouterr().out
