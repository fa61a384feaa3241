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


# ---------------------------------------------------------------- sample: cache policies, --stop, --draft
def _tiny_checkpoint(folder: Path, attention: dict, seed: int, vocab: int = 256, d_model: int = 32,
                     cache: dict | None = None) -> Path:
    """A run folder with an untrained tiny model and a byte tokenizer (no training: fast)."""
    import json

    import torch

    from attnlab.api import build_model
    from attnlab.train.checkpoint import FORMAT, VERSION, save_checkpoint

    torch.manual_seed(seed)
    model = build_model({"vocab_size": vocab, "d_model": d_model, "num_layers": 2, "block_size": 32,
                         "attention": attention, "tie_embeddings": False, "init_std": 0.2})
    save_checkpoint(folder / "last.pt", {"format": FORMAT, "version": VERSION,
                                         "model_config": model.config.model_dump(mode="json"),
                                         "model": model.state_dict()})
    resolved = {"data": {"tokenizer": {"type": "byte"}}} | ({"cache": cache} if cache else {})
    (folder / "resolved_config.json").write_text(json.dumps(resolved))
    return folder


@pytest.fixture(scope="module")
def sample_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample_runs")
    dba = {"type": "decoupled", "num_heads": 4, "sem_dim": 8, "geo_dim": 16, "null_token": True}
    return {"target": _tiny_checkpoint(root / "target", dba, seed=0),
            "draft": _tiny_checkpoint(root / "draft", {"type": "standard", "num_heads": 2}, seed=1),
            "small_vocab": _tiny_checkpoint(root / "small_vocab", {"type": "standard", "num_heads": 2}, seed=1,
                                            vocab=128),
            "with_cache": _tiny_checkpoint(root / "with_cache", dba, seed=0, cache={"k_sem": "q4_0", "tail": 4})}


def _sample(capsys, *argv):
    code = main(["sample", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_sample_with_cache_policy_prints_stats_to_stderr(sample_runs, capsys):
    from attnlab.api import load
    from attnlab.infer import generate

    target = sample_runs["target"]
    code, out, err = _sample(capsys, "--ckpt", target, "--prompt-ids", "5 6 7", "--max-new-tokens", 6,
                             "--temperature", 0, "--cache-policy", "k_sem=q4_0,k_geo=q8_0,v=q4_0,tail=2",
                             "--prefill-chunk", 2)
    assert code == 0
    ids = [int(t) for t in out.split()]
    expected = generate(load(target), [[5, 6, 7]], 6, cache_policy="k_sem=q4_0,k_geo=q8_0,v=q4_0,tail=2")
    assert ids == [5, 6, 7] + expected.tokens[0]
    assert "tok/s" in err and "ms/token" in err and "B/token analytic" in err and "B allocated" in err
    assert "KV cache (k_sem=q4_0,k_geo=q8_0,v=q4_0,tail=2)" in err and "acceptance" not in err


def test_sample_uses_the_runs_cache_section_unless_overridden(sample_runs, capsys):
    argv = ["--ckpt", sample_runs["with_cache"], "--prompt-ids", "1 2", "--max-new-tokens", 3]
    code, _, err = _sample(capsys, *argv)
    assert code == 0 and "KV cache (k_sem=q4_0,tail=4; native = fp32)" in err  # k_geo and v stay native
    code, _, err = _sample(capsys, *argv, "--cache-policy", "nf4")
    assert code == 0 and "KV cache (nf4)" in err


def test_sample_names_the_native_dtype_and_ends_the_text_with_a_newline(sample_runs, capsys):
    import torch

    from attnlab.api import load
    from attnlab.cache import CachePolicy
    from attnlab.cli import _policy_label

    code, out, err = _sample(capsys, "--ckpt", sample_runs["target"], "--prompt", "ab", "--max-new-tokens", 4,
                             "--temperature", 0)
    assert code == 0 and out.startswith("ab") and out.endswith("\n") and not out.endswith("\n\n")
    assert err.startswith("prefill ") and "KV cache (native = fp32):" in err
    model = load(sample_runs["target"]).to(dtype=torch.bfloat16)
    assert _policy_label(CachePolicy.parse(None), model) == "native = bf16"
    assert _policy_label(CachePolicy.parse("q8_0"), model) == "q8_0"
    assert _policy_label(CachePolicy.parse("k_sem=q4_0"), model) == "k_sem=q4_0; native = bf16"


def test_sample_with_a_draft_model_reports_acceptance(sample_runs, capsys):
    target, draft = sample_runs["target"], sample_runs["draft"]
    argv = ["--ckpt", target, "--prompt-ids", "1 2 3 4", "--max-new-tokens", 10, "--temperature", 0]
    code, plain, _ = _sample(capsys, *argv)
    assert code == 0
    code, out, err = _sample(capsys, *argv, "--draft", draft, "--draft-k", 3)
    assert code == 0 and out == plain  # greedy speculative decoding = the target's greedy output
    assert "acceptance rate" in err and "rounds" in err
    code, out, err = _sample(capsys, "--ckpt", target, "--prompt", "the quick", "--max-new-tokens", 8,
                             "--draft", draft, "--cache-policy", "q8_0", "--temperature", 0.9, "--top-k", 40)
    assert code == 0 and out.startswith("the quick") and "acceptance rate" in err


def test_sample_stop_token(sample_runs, capsys):
    target = sample_runs["target"]
    argv = ["--ckpt", target, "--prompt-ids", "104 101", "--max-new-tokens", 8, "--temperature", 0]
    _, out, _ = _sample(capsys, *argv)
    free = [int(t) for t in out.split()][2:]
    stop = free[3]
    code, out, _ = _sample(capsys, *argv, "--stop", stop)
    assert code == 0 and [int(t) for t in out.split()][2:] == free[: free.index(stop) + 1]
    # text mode: a single-byte stop string (here given as a backslash escape) on the same continuation
    text_argv = ["--ckpt", target, "--prompt", "he", "--max-new-tokens", 8, "--temperature", 0]
    stop = next(t for t in free if 32 < t < 127)  # the first printable ASCII byte generated
    expected = "he" + bytes(free[: free.index(stop) + 1]).decode("utf-8", errors="replace")
    code, cut, _ = _sample(capsys, *text_argv, "--stop", f"\\x{stop:02x}")
    assert code == 0 and cut == expected + "\n"


@pytest.mark.parametrize("extra, needle", [
    (["--cache-policy", "k=q3_k"], "unknown format"),
    (["--cache-policy", "k=q4_0"], "field 'k' does not exist"),  # the target is DBA: k_sem / k_geo
    (["--stop", "ab", "--prompt", "x"], "encodes to 2 tokens"),
    (["--stop", "x"], "expected a token id"),
    (["--draft", "{small_vocab}"], "draft vocab size 128 differs"),
    (["--draft", "{draft}", "--draft-k", "0"], "--draft-k must be >= 1"),
    (["--prefill-chunk", "99"], "prefill chunk size"),
])
def test_sample_user_errors_are_one_line(sample_runs, capsys, extra, needle):
    extra = [a.format(**{k: str(v) for k, v in sample_runs.items()}) for a in extra]
    prompt = [] if "--prompt" in extra else ["--prompt-ids", "1 2"]
    code, _, err = _sample(capsys, "--ckpt", sample_runs["target"], *prompt, "--max-new-tokens", 2, *extra)
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err


# ---------------------------------------------------------------- prepare defaults, data.path checks
def test_prepare_defaults_to_bytes_like_manifests(tmp_path, capsys):
    import json

    src = tmp_path / "a.txt"
    src.write_text("hello world\n" * 50)
    out = tmp_path / "tokens.npy"
    assert main(["prepare", str(src), "-o", str(out)]) == 0
    assert "600 tokens" in capsys.readouterr().out
    assert json.loads(out.with_suffix(".json").read_text())["tokenizer"]["type"] == "byte"
    assert main(["prepare", str(src), "-o", str(tmp_path / "x.npy"), "--tokenizer-path", "g.tiktoken"]) == 2
    assert "--tokenizer gpt2" in capsys.readouterr().err


def test_prepare_offline_error_names_the_flag_and_is_not_cut(tmp_path, capsys, monkeypatch):
    import tiktoken

    from attnlab.data import tokenizers as tk

    message = ("HTTPSConnectionPool(host='openaipublic.blob.core.windows.net', port=443): Max retries "
               "exceeded with url: /gpt-2/encodings/main/vocab.bpe (Caused by NameResolutionError: "
               "Failed to resolve 'openaipublic.blob.core.windows.net')")

    def offline(name):
        raise ConnectionError(message)

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    tk._build.cache_clear()
    src = tmp_path / "a.txt"
    src.write_text("hello\n")
    try:
        assert main(["prepare", str(src), "-o", str(tmp_path / "t.npy"), "--tokenizer", "gpt2"]) == 2
    finally:
        tk._build.cache_clear()
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "--tokenizer-path FILE" in err and "tokenizer.path" not in err
    reason = err.split("ConnectionError: ")[1].split(");")[0]
    assert reason.endswith("...")
    kept = reason[:-3].split()
    assert kept and " ".join(kept) == " ".join(message.split()[:len(kept)])  # whole words only
    missing = tmp_path / "nope.tiktoken"
    assert main(["prepare", str(src), "-o", str(tmp_path / "t.npy"), "--tokenizer", "gpt2",
                 "--tokenizer-path", str(missing)]) == 2
    assert "--tokenizer-path" in capsys.readouterr().err


def test_compile_checks_data_path_relative_to_the_manifest(tmp_path, capsys, monkeypatch):
    manifest = _tiny_manifest(tmp_path)
    tree = yaml.safe_load(manifest.read_text())
    sub = tmp_path / "cfg"
    (sub / "data").mkdir(parents=True)
    (sub / "data" / "corpus.txt").write_text("abc " * 100)
    tree["data"]["path"] = "data/corpus.txt"
    (sub / "m.yml").write_text(yaml.safe_dump(tree))
    monkeypatch.chdir(tmp_path)  # not the manifest's folder
    assert main(["compile", str(sub / "m.yml")]) == 0
    capsys.readouterr()
    tree["data"]["path"] = "data/missing.txt"
    (sub / "m.yml").write_text(yaml.safe_dump(tree))
    assert main(["compile", str(sub / "m.yml")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "groups(g).runs(base).data.path" in err and str(sub / "data" / "missing.txt") in err
    assert main(["compile", str(sub / "m.yml"), "--print-plan"]) == 0  # the plan, with a warning
    captured = capsys.readouterr()
    assert "params" in captured.out and "warning" in captured.err


def test_bench_on_a_manifest_prints_its_result_tables(tmp_path, capsys):
    manifest = _tiny_manifest(tmp_path, steps=2)
    tree = yaml.safe_load(manifest.read_text())
    tree["groups"][0]["runs"] = tree["groups"][0]["runs"][:1]
    tree["groups"][0]["benchmarks"] = [{"type": "perplexity", "windows": 1, "policies": ["fp16", "q8_0"]}]
    manifest.write_text(yaml.safe_dump(tree))
    assert main(["run", str(manifest)]) == 0
    capsys.readouterr()
    assert main(["bench", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert "report:" in out
    assert "g/base - perplexity" in out or "base - perplexity" in out
    table = out[out.index("- perplexity"):]
    assert "fp16" in table and "q8_0" in table
