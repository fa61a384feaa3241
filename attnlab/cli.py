"""Command line: ``attnlab compile | run | train | sample | bench | eval | report | export | prepare``. Thin: parses arguments and
calls library functions. User errors print one line and exit 2; bugs keep their traceback."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

from attnlab.errors import AttnlabError

EXIT_USER_ERROR = 2


def _add_manifest_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", type=Path, help="experiment manifest (YAML)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides applied to every run, e.g. train.steps=200 model.attention.num_kv_heads=2")
    p.add_argument("--group", help="only this group of the manifest")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnlab", description="attnlab: manifests, training, KV-cache inference, benchmarks and "
                                    "upcycling for KV-cache-efficient attention. `attnlab COMMAND --help` for each.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("compile", help="validate a manifest; --print-plan shows params, FLOPs and KV bytes per run",
                       description="Validate a manifest without building tensors, and check that every run's "
                                   "data.path exists. With --print-plan, print every run's parameter count, "
                                   "FLOPs/token and KV-cache bytes/token per layer and format (a missing "
                                   "data.path is then a warning).")
    _add_manifest_args(p)
    p.add_argument("--print-plan", action="store_true", help="print the per-run table")

    p = sub.add_parser("run", help="execute a manifest: train every run (resuming), print a summary",
                       description="Execute every run of a manifest (or one --group). Runs resume from their "
                                   "last.pt. Works under torchrun (DDP).")
    _add_manifest_args(p)
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan; write nothing")
    p.add_argument("--no-resume", action="store_true", help="refuse to continue existing runs")
    p.add_argument("--rebench", action="store_true",
                   help="measure every declared benchmark again (default: only those whose record is missing "
                        "or stale: settings changed or checkpoint newer)")

    p = sub.add_parser("train", help="train one run of a manifest",
                       description="Train a single run of a manifest, selected with --run ID or GROUP/ID "
                                   "(optional when the manifest has exactly one run).")
    _add_manifest_args(p)
    p.add_argument("--run", dest="run_key", help="run id or group/id")
    p.add_argument("--no-resume", action="store_true", help="refuse to continue an existing run")

    p = sub.add_parser("sample", help="generate text from a trained run or checkpoint",
                       description="Generate a continuation of a prompt from a run folder or checkpoint, over "
                                   "a KV cache (optionally quantized, optionally with a speculative draft model). "
                                   "The text goes to stdout, speed and cache statistics to stderr.")
    p.add_argument("--ckpt", required=True, type=Path, help="run folder (best.pt/last.pt) or .pt file")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text prompt, encoded with the run's tokenizer")
    src.add_argument("--prompt-ids", help="token ids, space or comma separated")
    p.add_argument("--max-new-tokens", type=int, default=64, help="stop after this many new tokens (default 64)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache-policy", metavar="POLICY",
                   help="KV-cache formats per field, e.g. q8_0 or k_sem=q4_0,k_geo=q8_0,v=q4_0,tail=128 "
                        "(default: the model's dtype)")
    p.add_argument("--stop", action="append", default=[], metavar="TOKEN",
                   help="also stop after this token (repeatable): a token id with --prompt-ids, a single-token "
                        "string with --prompt (backslash escapes like \\n work); the tokenizer's end-of-text "
                        "token always stops")
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                   help="prefill the prompt N tokens per forward (default: the model's block_size)")
    p.add_argument("--draft", type=Path, metavar="CKPT",
                   help="speculative decoding with this draft model (run folder or .pt; same vocabulary); "
                        "--cache-policy applies to the target, the draft caches in its own dtype")
    p.add_argument("--draft-k", type=int, default=4, metavar="K", help="draft tokens proposed per round (default 4)")

    p = sub.add_parser("bench", help="benchmark a run folder, checkpoint or manifest; saves records",
                       description="Run benchmarks. TARGET is a run folder or checkpoint (suites from --suite) "
                                   "or a manifest (the benchmarks its groups declare, on its trained runs; "
                                   "then the group reports are rewritten). Records go to <run_dir>/bench/.")
    p.add_argument("target", type=Path, help="run folder, checkpoint, or manifest (.yml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="manifest overrides (manifest targets)")
    p.add_argument("--group", help="manifest targets: only this group")
    p.add_argument("--suite", nargs="+", choices=["perplexity", "latency", "memory", "context_sweep", "downstream", "quality",
                                                  "retrieval"],
                   help="which benchmarks (run folder/checkpoint default: perplexity; manifest: filter its benchmarks)")
    p.add_argument("--policies", nargs="+", help="perplexity: cache policies (default fp16 q8_0 q4_0 nf4 + heterogeneous)")
    p.add_argument("--policy", help="cache policy for latency/memory/context_sweep/quality")
    p.add_argument("--contexts", nargs="+", type=int, help="memory contexts, context_sweep and retrieval lengths")
    p.add_argument("--depths", nargs="+", type=float, help="retrieval: needle depths in [0, 1] (default 0 .25 .5 .75 1)")
    p.add_argument("--trials", type=int, help="retrieval: tasks per kind x length x depth (default 10)")
    p.add_argument("--task", action="append", default=[], metavar="NAME=PATH", help="downstream JSONL task (repeatable)")
    p.add_argument("--limit", type=int, help="downstream: examples per task")
    p.add_argument("--reference", default="fp16", help="quality: 'fp16' or 'run:<id>'")
    p.add_argument("--windows", type=int, help="perplexity/quality: held-out windows")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    p.add_argument("--report", type=Path, help="run folder/checkpoint targets: also write a report folder here")

    p = sub.add_parser("eval", help="lm-evaluation-harness tasks on a run folder or checkpoint; saves a bench record",
                       description="Evaluate with lm-evaluation-harness (pip install attnlab[eval]): "
                                   "lm_eval.simple_evaluate with attnlab's AttnlabLM adapter. Task names come from "
                                   "lm-eval's registry (their data is downloaded by lm-eval: needs network), from "
                                   "--include-path folders of task YAMLs, or are local multiple-choice JSONL files "
                                   "({query, choices, gold}) given as --local-task NAME=PATH (offline). The result is "
                                   "saved as <run_dir>/bench/<id>.json, so reports pick it up.")
    p.add_argument("target", type=Path, help="run folder or checkpoint")
    p.add_argument("--tasks", default="", help="comma-separated task or group names")
    p.add_argument("--local-task", action="append", default=[], metavar="NAME=PATH",
                   help="a local JSONL of {query, choices, gold} records as the task NAME (repeatable)")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="a folder of lm-eval task YAML files (repeatable)")
    p.add_argument("--limit", type=int, help="documents per task")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--cache-policy", help="KV cache policy for generation tasks (default: the run's)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="lm-eval's seeds (0: its defaults)")
    p.add_argument("--tokenizer-path", help="local .tiktoken for a GPT-2-tokenized bare checkpoint")
    p.add_argument("--id", help="record name (default lm_eval)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto")

    p = sub.add_parser("tune-cache", help="search KV-cache policies for a run under a quality guard; the choice "
                                          "becomes the run's default policy",
                       description="Search per-field cache formats, an exact tail and an edge-layer override: "
                                   "KV bytes for every candidate, a short held-out dNLL screen (vs the fp16 cache), "
                                   "then dNLL, KL(fp16 || candidate), decode ms/token and optionally retrieval "
                                   "accuracy on the survivors. Writes <run>/tune/ (candidates, fronts, plot) and, "
                                   "if a candidate meets every constraint, <run>/tuned_policy.json, which sample, "
                                   "bench and eval then use by default.")
    p.add_argument("run", type=Path, help="run folder")
    p.add_argument("--max-bytes-per-token", type=int, help="KV bytes per token, all layers")
    p.add_argument("--max-ms-per-token", type=float, help="decode ms/token at --context")
    p.add_argument("--max-dnll", type=float, default=0.01, help="held-out delta NLL vs the fp16 cache, nats/token "
                                                                  "(default 0.01)")
    p.add_argument("--max-kl", type=float, help="KL(fp16 cache || candidate), nats/token")
    p.add_argument("--min-retrieval", type=float, help="exact-match accuracy on the retrieval suite")
    p.add_argument("--formats", nargs="+", default=["fp16", "fp8_e4m3", "q8_0", "q4_0", "nf4"])
    p.add_argument("--tails", nargs="+", type=int, default=[0], help="exact-tail lengths to try")
    p.add_argument("--edge-format", default="q8_0", help="first/last layers override to try ('none': skip)")
    p.add_argument("--windows", type=int, default=8, help="thorough stage: held-out windows")
    p.add_argument("--seq-len", type=int, help="thorough stage: window length (default: min(block_size, 256))")
    p.add_argument("--screen-windows", type=int, default=2)
    p.add_argument("--screen-seq-len", type=int, default=64)
    p.add_argument("--context", type=int, help="decode ms/token measured at this context (default: block_size)")
    p.add_argument("--retrieval-lengths", nargs="+", type=int, help="retrieval suite prompt lengths "
                                                                     "(default: half and all of block_size)")
    p.add_argument("--retrieval-kinds", nargs="+", choices=["passkey", "multikey"], default=["passkey", "multikey"])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")

    p = sub.add_parser("report", help="regenerate a report folder from run folders (nothing re-measured)",
                       description="Write report.json, CSVs, LaTeX tables, PNG plots and report.md from "
                                   "finished run folders and their saved benchmark records.")
    p.add_argument("runs", nargs="+", type=Path,
                   help="run folders, or group folders (<out_dir>/<name>/<group>: their run folders)")
    p.add_argument("--out", required=True, type=Path, help="report folder")
    p.add_argument("--title", default="attnlab report")

    p = sub.add_parser("export", help="write a model as a Hugging Face folder (config, safetensors, tokenizer)",
                       description="Export a run folder, .pt checkpoint, Hugging Face Llama folder or llama2.c "
                                   ".bin as a folder that transformers loads with the same logits: a "
                                   "LlamaForCausalLM for standard/bottleneck attention, a partial-rotary "
                                   "Phi3ForCausalLM for DBA (without null token or gate, v dims = sem + geo). "
                                   "Interleaved-RoPE models get their q/k rows permuted to Hugging Face's "
                                   "half-split layout. Layernorm, gelu and topology-tree models cannot be exported.")
    p.add_argument("--ckpt", required=True, type=Path, help="run folder, .pt, HF folder or llama2.c .bin")
    p.add_argument("--out", required=True, type=Path, help="output folder (must not exist or be empty)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="weight dtype in the export (default: the model's)")
    p.add_argument("--no-tokenizer", action="store_true",
                   help="write the weights alone (default: a run folder's tokenizer travels as tokenizer.json, "
                        "with bos/eos/pad ids and generation_config.json; needs transformers)")

    p = sub.add_parser("retrofit", help="zero-training retrofit of a model's attention (butterfly)",
                       description="Swap selected standard-attention layers of a run folder, .pt checkpoint, Hugging "
                                   "Face Llama folder or llama2.c .bin for Butterfly attention (sliding window + "
                                   "sink/local/partner block summaries) with the same weights; nothing is trained. "
                                   "Writes a run folder that sample, bench and report read.")
    p.add_argument("kind", choices=["butterfly"], help="the retrofit")
    p.add_argument("source", type=Path, help="run folder, .pt, HF folder or llama2.c .bin")
    p.add_argument("--out", required=True, type=Path, help="output run folder (must not hold a checkpoint)")
    p.add_argument("--layers", default="all", help="all (default), every:K, or indices such as 0,2,5")
    p.add_argument("--window", type=int, default=64, help="raw positions each query sees (default 64)")
    p.add_argument("--block-size", type=int, default=128, help="positions per summarised block (default 128)")
    p.add_argument("--partner", default="causal_shift", help="causal_shift (default), xor, random, local_only")
    p.add_argument("--stage-by", default="layer", help="layer (default: layer index mod stages) or swapped")
    p.add_argument("--num-stages", type=int, default=None, help="default: ceil(log2(context blocks))")

    p = sub.add_parser("prepare", help="tokenize text files, folders or JSONL into a token file",
                       description="Tokenize inputs into a memory-mappable .npy token file (+ JSON sidecar).")
    p.add_argument("inputs", nargs="+", type=Path, help="text files, folders or .jsonl files")
    p.add_argument("-o", "--output", required=True, type=Path, help="output .npy path")
    p.add_argument("--tokenizer", choices=["byte", "gpt2"], default="byte",
                   help="byte (default, as in manifests) or gpt2")
    p.add_argument("--tokenizer-path", metavar="FILE",
                   help="local .tiktoken file for gpt2 (offline; without it tiktoken's cache or the network)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.add_argument("--max-tokens", type=int, default=None)
    return parser


# ---------------------------------------------------------------- commands
def cmd_compile(args, command: str) -> int:
    from attnlab.errors import ConfigError
    from attnlab.manifest import check_data_paths, load_plan
    from attnlab.summary import format_plan

    plan = load_plan(args.manifest, args.overrides, group=args.group)
    if args.print_plan:  # the plan of a preset whose data is not prepared yet is still worth seeing
        print(format_plan(plan))
        try:
            check_data_paths(plan)
        except ConfigError as err:
            print(f"attnlab compile: warning: {err}", file=sys.stderr)
    else:
        check_data_paths(plan)
        print(f"ok: {args.manifest}: {len(plan.runs)} run(s) valid: " + ", ".join(r.key for r in plan.runs))
    return 0


def cmd_run(args, command: str) -> int:
    from attnlab.manifest import load_plan
    from attnlab.run import execute_plan
    from attnlab.summary import format_plan, format_results
    from attnlab.train.distributed import dist_env

    plan = load_plan(args.manifest, args.overrides, group=args.group)
    if args.dry_run:
        print(format_plan(plan))
        print("\ndry run: nothing written")
        return 0
    results = execute_plan(plan, command, resume=not args.no_resume, rebench=args.rebench)
    if dist_env().rank == 0:
        print()
        print(format_results(results, plan))
    return 0


def cmd_train(args, command: str) -> int:
    from attnlab.manifest import load_plan
    from attnlab.run import execute_run

    plan = load_plan(args.manifest, args.overrides, group=args.group)
    runs = plan.runs
    if args.run_key:
        runs = [r for r in runs if args.run_key in (r.key, r.run_id)]
    if len(runs) != 1:
        choices = ", ".join(r.key for r in plan.runs)
        what = f"--run {args.run_key!r} matches {len(runs)} runs" if args.run_key else "the manifest has several runs"
        raise AttnlabError(f"{what}; choose one with --run among: {choices}")
    execute_run(runs[0], command, resume=not args.no_resume)
    return 0


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise AttnlabError(f"--prompt-ids: expected integers, got {text!r}") from None


def cmd_sample(args, command: str) -> int:
    import codecs

    import torch

    from attnlab.api import load
    from attnlab.cache import CachePolicy
    from attnlab.data import build_tokenizer
    from attnlab.infer import SamplingConfig, generate, speculative_generate
    from attnlab.runfolder import RunFolder

    # the run's manifest `cache` section, if any; --cache-policy overrides it
    folder = RunFolder.of(args.ckpt)
    policy_text = args.cache_policy if args.cache_policy is not None else folder.cache_policy()
    policy = CachePolicy.parse(policy_text)  # a bad policy: ConfigError, one line
    if args.cache_policy is None and policy_text is not None and policy_text == folder.tuned_policy():
        print(f"cache policy: {policy.label} (tuned: {folder.tuned_policy_path}; --cache-policy overrides)",
              file=sys.stderr)
    if args.max_new_tokens < 0:
        raise AttnlabError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.draft is not None and args.draft_k < 1:
        raise AttnlabError(f"--draft-k must be >= 1, got {args.draft_k}")
    try:
        sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    except ValueError as err:
        raise AttnlabError(str(err)) from None
    model = load(args.ckpt).to(args.device)
    tok_cfg = folder.tokenizer_config()
    tokenizer = build_tokenizer(tok_cfg) if tok_cfg is not None else None
    text_mode = args.prompt is not None
    if text_mode:
        if tokenizer is None:
            raise AttnlabError(f"{args.ckpt}: the run's tokenizer is unknown (no resolved_config.json); use --prompt-ids")
        prompt = tokenizer.encode(args.prompt)
    else:
        prompt = _parse_ids(args.prompt_ids)
    if not prompt:
        raise AttnlabError("the prompt is empty: give at least one token")
    bad = [t for t in prompt if not 0 <= t < model.config.vocab_size]
    if bad:
        raise AttnlabError(f"prompt token id {bad[0]} is outside the model's vocab (size {model.config.vocab_size})")
    eot = tokenizer.eot_id if tokenizer is not None else None
    stop = {eot} if eot is not None else set()
    for value in args.stop:  # ids with --prompt-ids, single-token strings with --prompt
        if not text_mode:
            try:
                stop.add(int(value))
            except ValueError:
                raise AttnlabError(f"--stop: expected a token id with --prompt-ids, got {value!r}") from None
            continue
        encoded = tokenizer.encode(codecs.decode(value.encode("latin-1", "backslashreplace"), "unicode_escape"))
        if len(encoded) != 1:
            raise AttnlabError(f"--stop {value!r} encodes to {len(encoded)} tokens; give a single-token string")
        stop.add(encoded[0])
    torch.manual_seed(args.seed)
    if args.draft is not None:
        draft = load(args.draft).to(args.device)
        draft_tok = RunFolder.of(args.draft).tokenizer_config()
        if tok_cfg is not None and draft_tok is not None and draft_tok != tok_cfg:
            raise AttnlabError(f"--draft {args.draft}: its tokenizer ({draft_tok.type}) differs from the "
                               f"target's ({tok_cfg.type})")
        res = speculative_generate(model, draft, prompt, args.max_new_tokens, sampling, k=args.draft_k,
                                   target_policy=policy, seed=args.seed, stop_ids=sorted(stop),
                                   prefill_chunk=args.prefill_chunk)
        new = res.tokens
    else:
        res = generate(model, [prompt], args.max_new_tokens, sampling, cache_policy=policy, seed=args.seed,
                       stop_ids=sorted(stop), prefill_chunk=args.prefill_chunk)
        new = res.tokens[0]
    if text_mode:
        shown = new[:-1] if new and new[-1] == eot else new  # the end-of-text marker is not text
        text = tokenizer.decode(prompt) + tokenizer.decode(shown)
        sys.stdout.write(text if text.endswith("\n") else text + "\n")  # the stats start on their own line
    else:  # ids in, ids out
        print(" ".join(str(t) for t in prompt + new))
    sys.stdout.flush()
    print(res.stats.summary(_policy_label(policy, model)), file=sys.stderr)
    return 0


def _policy_label(policy, model) -> str:
    """The cache policy as the stats line shows it, naming what "native" is for this model:
    ``native = fp32``, or ``k_sem=q4_0; native = bf16`` when some fields keep the native dtype."""
    from attnlab.cache.policy import native_format
    from attnlab.config.variants import stored_fields

    param = next(iter(model.parameters()), None)
    native = native_format(param.dtype) if param is not None else "fp32"
    if policy.default or stored_fields(model.config.layer_dims()) <= set(policy.formats):
        return policy.label  # no field keeps the native dtype
    return f"native = {native}" if policy.label == "native" else f"{policy.label}; native = {native}"


def cmd_prepare(args, command: str) -> int:
    from attnlab.config.data import TokenizerConfig
    from attnlab.data import prepare
    from attnlab.progress import byte_progress

    if args.tokenizer_path is not None and args.tokenizer != "gpt2":
        raise AttnlabError("--tokenizer-path is a gpt2 ranks file; add --tokenizer gpt2")
    tok = TokenizerConfig(type=args.tokenizer, path=args.tokenizer_path)
    with byte_progress("tokenizing") as progress:
        stats = prepare(list(args.inputs), args.output, tok, text_field=args.text_field,
                        max_tokens=args.max_tokens, progress=progress, tokenizer_key="--tokenizer-path")
    print(f"wrote {stats.output}: {stats.num_tokens:,} tokens ({stats.dtype}) from {stats.num_documents} "
          f"document(s) in {stats.seconds:.1f}s")
    return 0


def _bench_configs_from_args(args) -> list:
    from attnlab.config.bench import validate_benchmarks

    common = {"device": args.device, "dtype": args.dtype}
    specs = []
    for kind in args.suite or ["perplexity"]:
        spec = {"type": kind, **common}
        if kind == "perplexity":
            spec.update({k: v for k, v in (("policies", args.policies), ("windows", args.windows)) if v})
        if kind in ("latency", "memory", "context_sweep", "quality") and args.policy:
            spec["policy"] = args.policy
        if kind == "memory" and args.contexts:
            spec["contexts"] = args.contexts
        if kind == "context_sweep" and args.contexts:
            spec["lengths"] = args.contexts
        if kind == "retrieval":
            if not args.contexts:
                raise AttnlabError("retrieval needs --contexts (prompt lengths in tokens)")
            spec.update({"lengths": args.contexts, **({"policy": args.policy} if args.policy else {}),
                         **({"depths": args.depths} if args.depths else {}),
                         **({"trials": args.trials} if args.trials else {})})
        if kind == "downstream":
            if not args.task:
                raise AttnlabError("downstream needs at least one --task NAME=PATH")
            tasks = []
            for text in args.task:
                name, sep, path = text.partition("=")
                if not sep:
                    raise AttnlabError(f"--task {text!r}: expected NAME=PATH")
                tasks.append({"name": name, "path": path, **({"limit": args.limit} if args.limit else {})})
            spec["tasks"] = tasks
        if kind == "quality":
            spec.update({"reference": args.reference, **({"windows": args.windows} if args.windows else {})})
        specs.append(spec)
    return validate_benchmarks(specs, "bench")


def _say_tuned(target) -> None:
    """Say when a run's tuned cache policy is the default its benchmarks decode with."""
    tuned = target.folder.tuned_policy() if target.config is not None else None
    if tuned is not None:
        print(f"cache policy: {tuned} (tuned: {target.folder.tuned_policy_path}; the benchmarks' own policies "
              "override it)", file=sys.stderr)


def _print_record(record) -> None:
    from attnlab.report.tables import Table, fmt
    from attnlab.summary import format_table

    table = Table(record.benchmark, record.benchmark, list(dict.fromkeys(k for r in record.rows for k in r)), record.rows)
    cols = [c for c in table.display_columns(record.type) if c != "run"]
    print(f"\n{record.run} - {record.benchmark} ({record.meta.get('device_name')}, {record.meta.get('dtype')})")
    print(format_table(cols, [[fmt(r.get(c)) for c in cols] for r in record.rows]))


def _print_group_records(plan, group: str) -> None:
    """The result table of each declared benchmark of ``group``, per run (its primary record,
    ``<run_dir>/bench/<name>.json``)."""
    from attnlab.bench.suite import saved_records

    for run in plan.group_runs(group):
        for cfg in plan.benchmarks.get(group, []):
            primary = Path(run.run_dir) / "bench" / f"{cfg.name}.json"
            for path, record in saved_records(primary.parent, cfg.name):
                if path == primary:
                    _print_record(record)


def cmd_bench(args, command: str) -> int:
    from attnlab.bench.suite import Target, run_benchmarks

    if args.target.suffix in (".yml", ".yaml"):
        from attnlab.manifest import load_plan
        from attnlab.run import benchmark_and_report
        from attnlab.runfolder import RunFolder

        plan = load_plan(args.target, args.overrides, group=args.group)
        if args.suite:
            import dataclasses

            plan = dataclasses.replace(plan, benchmarks={g: [b for b in bs if b.type in args.suite]
                                                         for g, bs in plan.benchmarks.items()})
        for group in plan.benchmarks:
            missing = [r.key for r in plan.group_runs(group) if not RunFolder(r.run_dir).last.is_file()]
            if missing:
                raise AttnlabError(f"runs not trained yet: {', '.join(missing)}; run `attnlab run {args.target}` first")
            benchmark_and_report(plan, group, command)
            _print_group_records(plan, group)
        return 0
    if args.overrides:
        raise AttnlabError("key=value overrides apply to manifest targets only")
    target = Target(args.target)
    _say_tuned(target)
    for record in run_benchmarks(_bench_configs_from_args(args), target, command, save=target.config is not None,
                                 progress=lambda m: print(m, file=sys.stderr, flush=True)):
        _print_record(record)
    if args.report:
        from attnlab.report import write_report

        files = write_report([target.run_dir], args.report, command=command)
        print(f"\nreport: {files.markdown}")
    return 0


def cmd_eval(args, command: str) -> int:
    from attnlab.bench.suite import Target, run_benchmarks
    from attnlab.config.bench import validate_benchmarks

    local = {}
    for item in args.local_task:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise AttnlabError(f"--local-task expects NAME=PATH, got {item!r}")
        local[name.strip()] = path.strip()
    spec = {"type": "lm_eval", "tasks": [t.strip() for t in args.tasks.split(",") if t.strip()],
            "local_tasks": local, "include_path": args.include_path,
            "limit": args.limit, "num_fewshot": args.num_fewshot, "policy": args.cache_policy,
            "batch_size": args.batch_size, "seed": args.seed, "tokenizer_path": args.tokenizer_path, "id": args.id,
            "device": args.device, "dtype": args.dtype}
    (cfg,) = validate_benchmarks([{k: v for k, v in spec.items() if v is not None}], "eval")
    target = Target(args.target)
    if args.cache_policy is None:
        _say_tuned(target)
    for record in run_benchmarks([cfg], target, command, save=target.config is not None,
                                 progress=lambda m: print(m, file=sys.stderr, flush=True)):
        _print_record(record)
    if target.config is not None:
        print(f"\nrecord saved in {target.run_dir / 'bench'} ({cfg.name}.json, or {cfg.name}.<hash>.json beside "
              f"a record with other settings)")
    return 0


def cmd_tune_cache(args, command: str) -> int:
    import torch

    from attnlab.api import load
    from attnlab.bench.nll import eval_windows
    from attnlab.bench.tune_cache import Constraints, candidate_policies, tune_cache
    from attnlab.report.tuning import describe, write_tune
    from attnlab.runfolder import RunFolder

    folder = RunFolder.of(args.run)
    if folder.resolved_config() is None:
        raise AttnlabError(f"{args.run}: not a run folder (tune-cache needs the run's held-out data)")
    for name in ("windows", "screen_windows", "screen_seq_len"):
        if getattr(args, name) < 1:
            raise AttnlabError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AttnlabError("--device cuda requested but CUDA is not available")
    model = load(folder.path).to(device).eval()
    block = model.config.block_size
    seq_len = min(args.seq_len or min(block, 256), block)
    candidates = candidate_policies(model, tuple(args.formats), tuple(args.tails),
                                    None if args.edge_format == "none" else args.edge_format)
    tokens, align = folder.heldout_tokens(with_align=True)
    windows = eval_windows(tokens, seq_len, args.windows, align)
    screen = eval_windows(tokens, min(args.screen_seq_len, seq_len), args.screen_windows, align)
    accuracy = None
    if args.min_retrieval is not None:
        from attnlab.bench.tune_cache import retrieval_scorer

        tokenizer = folder.tokenizer()
        if tokenizer is None:
            raise AttnlabError("--min-retrieval needs the run's tokenizer (this run has none)")
        accuracy = retrieval_scorer(model, tokenizer, args.retrieval_lengths or [block // 2, block - 16],
                                    kinds=args.retrieval_kinds)
    constraints = Constraints(args.max_bytes_per_token, args.max_ms_per_token, args.max_dnll, args.max_kl,
                              args.min_retrieval)
    result = tune_cache(model, windows, constraints, screen_windows=screen, candidates=candidates,
                        context=min(args.context or block, block), retrieval=accuracy,
                        progress=lambda m: print(m, file=sys.stderr, flush=True))
    paths = write_tune(result, folder.path, command)
    print(f"\nfront (bytes x dNLL), {len(result.front())} of {len(result.thorough)} thorough candidates:")
    for c in result.front():
        print("  " + describe(c))
    print(f"evidence: {paths['json'].parent}")
    if result.chosen is None:
        lines = [f"no candidate meets the constraints ({', '.join(f'{k}={v}' for k, v in vars(constraints).items() if v is not None)}); closest:"]
        for c, misses in result.closest():
            lines.append(f"  {c.policy}: " + ", ".join(f"{k} missed by {v:.4g}" for k, v in misses.items()))
        print("\n".join(lines), file=sys.stderr)
        raise AttnlabError("tune-cache: nothing chosen (no candidate met every constraint; see above)")
    print(f"chosen: {describe(result.chosen)}\nwritten to {paths['tuned_policy']} "
          "(sample, bench and eval use it by default; --cache-policy overrides)")
    return 0


def cmd_report(args, command: str) -> int:
    from attnlab.report import write_report
    from attnlab.report.collect import expand_run_dirs

    files = write_report(expand_run_dirs(args.runs), args.out, title=args.title, command=command)
    print(f"wrote {files.markdown}: {len(files.tables)} LaTeX tables, {len(files.csv)} CSV files, "
          f"{len(files.plots)} plots ({', '.join(p.name for p in files.plots.values())})")
    return 0


def cmd_export(args, command: str) -> int:
    from attnlab.api import load
    from attnlab.convert.hf import export_hf

    model = load(args.ckpt)
    tokenizer = None
    if not args.no_tokenizer:
        from attnlab.runfolder import RunFolder

        try:
            tokenizer = RunFolder.of(args.ckpt).tokenizer_config()
        except AttnlabError:
            tokenizer = None  # a bare checkpoint: no run folder, no known tokenizer
    out = export_hf(model, args.out, dtype=args.dtype, tokenizer=tokenizer)
    dtype = args.dtype or str(model.embed.weight.dtype).removeprefix("torch.")
    with_tok = f", tokenizer {tokenizer.type}" if tokenizer is not None else " (no tokenizer: not a run folder, or --no-tokenizer)"
    architecture = json.loads((out / "config.json").read_text())["architectures"][0]
    print(f"wrote {out}: {architecture}, {model.num_parameters():,} parameters, {dtype}{with_tok}")
    return 0


def cmd_retrofit(args, command: str) -> int:
    from attnlab.api import load
    from attnlab.convert.butterfly import retrofit_butterfly
    from attnlab.provenance import write_provenance
    from attnlab.runfolder import RunFolder

    out = RunFolder(args.out)
    if out.has_checkpoint():
        raise AttnlabError(f"{args.out} already holds a checkpoint; choose a new --out folder")
    model = load(args.source)
    options = dict(layers=args.layers, window=args.window, block_size=args.block_size, partner=args.partner,
                   stage_by=args.stage_by, num_stages=args.num_stages)
    new = retrofit_butterfly(model, **options)
    source = RunFolder(args.source) if args.source.is_dir() else None
    resolved = (source.resolved_config() if source is not None else None) or {}
    resolved = {**resolved, "model": new.config.model_dump(mode="json"),
                "retrofit": {"kind": "butterfly", "source": str(args.source), **options}}
    out.path.mkdir(parents=True, exist_ok=True)
    with out.lock("retrofit"):
        write_provenance(out.path, command, resolved)
        if source is not None and source.heldout_path.is_file():
            shutil.copyfile(source.heldout_path, out.heldout_path)
        out.save_model(new, {"source": str(args.source), "retrofit": resolved["retrofit"]})
    swapped = sum(1 for s in new.config.attention_specs() if s.type == "butterfly")
    print(f"wrote {out.path}: {swapped}/{len(new.config.attention_specs())} layers butterfly "
          f"(window {args.window}, block {args.block_size}, {args.partner}), no training")
    return 0


COMMANDS = {"compile": cmd_compile, "run": cmd_run, "train": cmd_train, "sample": cmd_sample,
            "bench": cmd_bench, "eval": cmd_eval, "tune-cache": cmd_tune_cache, "report": cmd_report, "export": cmd_export, "prepare": cmd_prepare,
            "retrofit": cmd_retrofit}

COMPUTE_COMMANDS = frozenset({"run", "train", "sample", "bench"})


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if argv and argv[0] in subparsers.choices:
        # options and key=value overrides may come in any order after the command
        args = subparsers.choices[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
    else:
        args = parser.parse_args(argv)
    command = "attnlab " + shlex.join(argv)
    try:
        if args.command in COMPUTE_COMMANDS:
            from attnlab.train.loop import configure_threads

            configure_threads()  # threads = the CPUs available, unless OMP_NUM_THREADS says otherwise
        return COMMANDS[args.command](args, command)
    except AttnlabError as err:
        print(f"attnlab {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as err:  # training saves last.pt first and says so (TrainingInterrupted)
        print(f"attnlab {args.command}: {str(err) or 'interrupted'}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
