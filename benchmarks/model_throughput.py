"""Whole-model GPU throughput in one run: which SDPA backends each attention variant can use,
training tokens/s and MFU for the ~125M and ~350M presets (baseline vs DBA), and full-model
decode ms/token at long context for the paper's 1B shapes (random weights; the decode runtime's
cache planes filled with random rows, so no prefill is needed to reach the context; each step is
``DecodeRuntime.step``, a CUDA-graph replay where the kernels allow it).

    python benchmarks/model_throughput.py [--quick] [--out benchmarks/results]

Writes ``model_throughput.json`` and ``model_throughput.md``. MFU counts matmul FLOPs (6 per
weight per token, LM head included) plus attention score/value FLOPs (causal), against the bf16
matmul rate measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attnlab.bench.synthetic_cache import fill_random  # noqa: E402
from attnlab.infer.runtime import DecodeRuntime  # noqa: E402
from attnlab.manifest import load_plan  # noqa: E402
from attnlab.model import build_model  # noqa: E402
from attnlab.model.stats import model_stats  # noqa: E402


def timed(fn, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end) / 1e3)
    return sorted(out)


def matmul_ceiling() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = timed(lambda: a @ b, 5, 20)[10]
    return 2 * 8192**3 / t


def copy_ceiling() -> float:
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = timed(lambda: y.copy_(x), 3, 10)[5]
    return 2 * x.numel() / t


def sdpa_backends(runs) -> list[dict]:
    """Which SDPA backends accept each variant's fused call (B=4, T=1024, bf16, causal)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from attnlab.nn.context import ForwardContext

    rows = []
    for run in runs:
        model = build_model(run.model).cuda().to(torch.bfloat16)
        layer = model.attention_layers()[0]
        x = torch.randn(4, 1024, run.model.d_model, device="cuda", dtype=torch.bfloat16)
        row = {"run": f"{run.name}/{run.key}"}
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                              ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)):
            try:
                with sdpa_kernel([backend]), torch.no_grad():
                    layer(x, ForwardContext(torch.arange(1024, device="cuda")))
                row[name] = True
            except RuntimeError:
                row[name] = False
        rows.append(row)
        del model
    return rows


def train_throughput(run, batch: int, seq: int, steps: int, peak: float) -> dict:
    from attnlab.train.distributed import DistInfo, apply_ddp
    from attnlab.train.optim import build_optimizer
    from attnlab.train.objectives import LanguageModeling
    from attnlab.train.step import autocast_factory, train_step

    cfg = run.train.model_copy(update={"compile": True, "precision": "bf16", "device": "cuda"})
    torch.manual_seed(0)
    model = build_model(run.model).cuda()
    wrapped = apply_ddp(model, cfg, DistInfo(), torch.device("cuda"))
    optimizer = build_optimizer(model, cfg)
    autocast = autocast_factory("bf16", torch.device("cuda"))
    objective = LanguageModeling(compile=True)  # what the Trainer uses with train.compile
    vocab = run.model.vocab_size
    batches = [(torch.randint(0, vocab, (batch, seq), device="cuda"),) * 2 for _ in range(4)]

    def step(i=[0]):
        x, y = batches[i[0] % 4]
        i[0] += 1
        train_step(wrapped, optimizer, [(x, y)], lr=1e-4, grad_clip=1.0, autocast=autocast, objective=objective)

    t0 = time.perf_counter()
    for _ in range(3):  # compile + warmup
        step()
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    times = timed(step, 2, steps)
    median = times[len(times) // 2]
    tokens_per_s = batch * seq / median
    stats = model_stats(run.model.model_copy(update={"block_size": seq}))
    flops = stats.flops_per_token_train * tokens_per_s
    out = {"run": f"{run.name}/{run.key}", "params": stats.params, "batch": batch, "seq": seq, "step_s": median,
           "tokens_per_s": tokens_per_s, "tflops": flops / 1e12, "mfu": flops / peak, "compile_s": compile_s,
           "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9}
    del model, wrapped, optimizer
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return out


def decode_speed(run, policy: str | None, context: int, steps: int, copy_bw: float) -> dict:
    torch.manual_seed(0)
    model = build_model(run.model).cuda().to(torch.bfloat16).eval()
    runtime = DecodeRuntime(model, policy, batch=1, max_length=context + 1)
    fill_random(runtime, context)
    token = torch.randint(0, run.model.vocab_size, (1,), device="cuda")
    lengths = [context] * runtime.batch

    def step():
        runtime.step(token)  # a CUDA-graph replay once captured (the first warm-up call)
        runtime.set_lengths(lengths)  # keep the context fixed

    times = timed(step, 3, steps)
    median = times[len(times) // 2]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kv = runtime.cache.bytes_per_token() * context
    floor = (weights + kv) / copy_bw
    out = {"run": f"{run.name}/{run.key}", "policy": policy or "bf16", "context": context, "ms_per_token": median * 1e3,
           "tokens_per_s": 1 / median, "floor_ms": floor * 1e3, "x_floor": median / floor,
           "weight_bytes": weights, "kv_bytes": kv, "cuda_graph": runtime.cuda_graphs}
    del model, runtime
    torch.cuda.empty_cache()
    return out


def table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--sections", nargs="+", default=["backends", "training", "decode"],
                    choices=["backends", "training", "decode"])
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    result = {"command": "python " + " ".join(sys.argv), "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    result["matmul_bf16_flops"] = peak = matmul_ceiling()
    result["copy_bytes_per_s"] = copy_bw = copy_ceiling()
    print(f"# ceilings: bf16 matmul {peak / 1e12:.0f} TFLOP/s, copy {copy_bw / 1e12:.2f} TB/s", flush=True)
    small, medium, large = (load_plan(ROOT / f"configs/paper/dba_{s}.yml").runs for s in ("125m", "350m", "1b"))
    result["sdpa_backends"] = sdpa_backends(small + large) if "backends" in args.sections else []
    print(table(result["sdpa_backends"], ["run", "flash", "efficient", "cudnn", "math"]), flush=True)
    steps = 5 if args.quick else 15
    result["training"] = []
    for runs, batch in ((small, 32), (medium, 16)) if "training" in args.sections else ():
        for run in runs:
            try:
                row = train_throughput(run, batch, 1024, steps, peak)
                print(f"train {row['run']}: {row['tokens_per_s'] / 1e3:.0f}k tok/s, MFU {row['mfu']:.1%}", flush=True)
            except Exception as err:  # record and go on: one failure must not lose the rest
                row = {"run": run.key, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
                print(f"train {run.key}: FAILED {row['error']}", flush=True)
                torch.cuda.empty_cache()
            result["training"].append(row)
    result["decode"] = []
    for context in (32 * 1024, 128 * 1024) if "decode" in args.sections else ():
        for run in large:
            for policy in ([None] if run.run_id == "baseline" else [None, "k_sem=q4_0,k_geo=q8_0,v=q4_0"]):
                try:
                    row = decode_speed(run, policy, context, 10 if args.quick else 30, copy_bw)
                    print(f"decode {row['run']} {row['policy']} @{context}: {row['ms_per_token']:.2f} ms "
                          f"(floor {row['floor_ms']:.2f}, x{row['x_floor']:.1f})", flush=True)
                except Exception as err:
                    row = {"run": run.key, "policy": policy or "bf16", "context": context,
                           "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
                    print(f"decode {run.key} @{context}: FAILED {row['error']}", flush=True)
                    torch.cuda.empty_cache()
                result["decode"].append(row)
    stem = "model_throughput" if len(args.sections) == 3 else "model_throughput_" + "_".join(args.sections)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str))
    md = [f"# Model throughput ({result['device']})", "", f"`{result['command']}`; torch {result['torch']}, "
          f"CUDA {result['cuda']}; bf16 matmul ceiling {peak / 1e12:.0f} TFLOP/s, copy {copy_bw / 1e12:.2f} TB/s.",
          "", "## SDPA backends accepting the fused call (bf16, B=4, T=1024)", "",
          table(result["sdpa_backends"], ["run", "flash", "efficient", "cudnn", "math"]),
          "", "## Training (torch.compile, bf16 autocast, fused AdamW, T=1024)", "",
          table(result["training"], ["run", "params", "batch", "tokens_per_s", "tflops", "mfu", "peak_mem_gb", "error"]),
          "", "## Full-model decode, batch 1 (DecodeRuntime.step; cuda_graph: replayed as a CUDA graph)", "",
          table(result["decode"], ["run", "policy", "context", "ms_per_token", "floor_ms", "x_floor", "cuda_graph",
                                   "error"])]
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    print(f"wrote {out / (stem + '.md')}")


if __name__ == "__main__":
    main()
