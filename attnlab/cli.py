"""Command line: ``attnlab compile | run | train | sample | prepare``. Thin: parses arguments and
calls library functions. User errors print one line and exit 2; bugs keep their traceback."""

from __future__ import annotations

import argparse
import os
import shlex
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
    parser = argparse.ArgumentParser(prog="attnlab", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("compile", help="validate a manifest; --print-plan shows params, FLOPs and KV bytes per run",
                       description="Validate a manifest without building tensors. With --print-plan, print every "
                                   "run's parameter count, FLOPs/token and KV-cache bytes/token per layer and format.")
    _add_manifest_args(p)
    p.add_argument("--print-plan", action="store_true", help="print the per-run table")

    p = sub.add_parser("run", help="execute a manifest: train every run (resuming), print a summary",
                       description="Execute every run of a manifest (or one --group). Runs resume from their "
                                   "last.pt. Works under torchrun (DDP).")
    _add_manifest_args(p)
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan; write nothing")
    p.add_argument("--no-resume", action="store_true", help="refuse to continue existing runs")

    p = sub.add_parser("train", help="train one run of a manifest",
                       description="Train a single run of a manifest, selected with --run ID or GROUP/ID "
                                   "(optional when the manifest has exactly one run).")
    _add_manifest_args(p)
    p.add_argument("--run", dest="run_key", help="run id or group/id")
    p.add_argument("--no-resume", action="store_true", help="refuse to continue an existing run")

    p = sub.add_parser("sample", help="generate text from a trained run or checkpoint",
                       description="Generate a continuation of a prompt from a run folder or checkpoint.")
    p.add_argument("--ckpt", required=True, type=Path, help="run folder (best.pt/last.pt) or .pt file")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text prompt, encoded with the run's tokenizer")
    src.add_argument("--prompt-ids", help="token ids, space or comma separated")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")

    p = sub.add_parser("prepare", help="tokenize text files, folders or JSONL into a token file",
                       description="Tokenize inputs into a memory-mappable .npy token file (+ JSON sidecar).")
    p.add_argument("inputs", nargs="+", type=Path, help="text files, folders or .jsonl files")
    p.add_argument("-o", "--output", required=True, type=Path, help="output .npy path")
    p.add_argument("--tokenizer", choices=["byte", "gpt2"], default="gpt2")
    p.add_argument("--tokenizer-path", help="local .tiktoken file for gpt2 (offline)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.add_argument("--max-tokens", type=int, default=None)
    return parser


# ---------------------------------------------------------------- commands
def cmd_compile(args, command: str) -> int:
    from attnlab.manifest import load_plan
    from attnlab.summary import format_plan

    plan = load_plan(args.manifest, args.overrides, group=args.group)
    if args.print_plan:
        print(format_plan(plan))
    else:
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
    results = execute_plan(plan, command, resume=not args.no_resume)
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
    import torch

    from attnlab.api import load, run_tokenizer
    from attnlab.data import build_tokenizer
    from attnlab.infer import SamplingConfig, generate_uncached

    model = load(args.ckpt).to(args.device)
    tok_cfg = run_tokenizer(args.ckpt)
    tokenizer = build_tokenizer(tok_cfg) if tok_cfg is not None else None
    if args.prompt is not None:
        if tokenizer is None:
            raise AttnlabError(f"{args.ckpt}: the run's tokenizer is unknown (no resolved_config.json); use --prompt-ids")
        prompt = tokenizer.encode(args.prompt)
    else:
        prompt = _parse_ids(args.prompt_ids)
    bad = [t for t in prompt if not 0 <= t < model.config.vocab_size]
    if bad:
        raise AttnlabError(f"prompt token id {bad[0]} is outside the model's vocab (size {model.config.vocab_size})")
    try:
        sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    except ValueError as err:
        raise AttnlabError(str(err)) from None
    stop = (tokenizer.eot_id,) if tokenizer is not None and tokenizer.eot_id is not None else ()
    torch.manual_seed(args.seed)
    new = generate_uncached(model, prompt, args.max_new_tokens, sampling, seed=args.seed, stop_ids=stop)
    if args.prompt is not None:
        print(tokenizer.decode(prompt) + tokenizer.decode(new))
    else:  # ids in, ids out
        print(" ".join(str(t) for t in prompt + new))
    return 0


def cmd_prepare(args, command: str) -> int:
    from attnlab.config.data import TokenizerConfig
    from attnlab.data import prepare
    from attnlab.progress import byte_progress

    tok = TokenizerConfig(type=args.tokenizer, path=args.tokenizer_path)
    with byte_progress("tokenizing") as progress:
        stats = prepare(list(args.inputs), args.output, tok, text_field=args.text_field,
                        max_tokens=args.max_tokens, progress=progress)
    print(f"wrote {stats.output}: {stats.num_tokens:,} tokens ({stats.dtype}) from {stats.num_documents} "
          f"document(s) in {stats.seconds:.1f}s")
    return 0


COMMANDS = {"compile": cmd_compile, "run": cmd_run, "train": cmd_train, "sample": cmd_sample, "prepare": cmd_prepare}


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
        return COMMANDS[args.command](args, command)
    except AttnlabError as err:
        print(f"attnlab {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"attnlab {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
