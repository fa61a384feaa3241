"""End-to-end decode speed of the paper's 1B shapes through the decode runtime, against the
physical floor and a peer measured in the same run.

    python benchmarks/decode_e2e.py [--out DIR] [--contexts 8192 32768 131072] [--batches 1 8]
                                    [--quick] [--no-hf] [--dry-run]

Rows: the 1B standard baseline with a bf16 cache, DBA with a bf16 cache and DBA with the
heterogeneous ``k_sem=q4_0,k_geo=q8_0,v=q4_0`` cache; batch 1 and 8; contexts 8k/32k/128k; each
eager (``cuda_graphs=False``), graph-captured, and (batch 1) compiled + graph-captured
(``compile=True``: torch.compile around the opaque cache op). Random bf16 weights; caches filled with random
rows up to the context (``attnlab.bench.synthetic_cache.fill_random``), so no prefill is timed.

* ms/token: CUDA-event time of ``steps`` consecutive ``DecodeRuntime.step`` calls / steps.
* floor: (weight bytes + KV bytes the step must read) / copy bandwidth measured in the same run
  (a 2 GiB device-to-device copy, bytes read + written).
* GPU busy: the summed duration of the step's GPU kernels (torch.profiler, CUPTI) / wall time.
* peer: Hugging Face ``LlamaForCausalLM`` on the baseline's shape, bf16, ``generate`` over a
  ``StaticCache`` of one size for every call (greedy; whatever compilation ``generate`` does for a
  static cache happens in the warm-up); ms/token = (time(1 + n new) - time(1 new)) / n.
* prefill: one real ``DecodeRuntime.prefill`` of a random prompt (GPU chunk kernel), tokens/s.

Writes ``decode_e2e.json`` and ``decode_e2e.md`` (device, versions, command) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attnlab.bench.synthetic_cache import fill_random  # noqa: E402
from attnlab.infer import DecodeRuntime  # noqa: E402
from attnlab.manifest import load_plan  # noqa: E402
from attnlab.model import build_model  # noqa: E402

HETERO = "k_sem=q4_0,k_geo=q8_0,v=q4_0"


def copy_ceiling(device) -> float:
    x = torch.empty(2**31, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        y.copy_(x)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del x, y
    torch.cuda.empty_cache()
    return 2 * 2**31 / sorted(times)[len(times) // 2]


def timed_steps(rt: DecodeRuntime, token: torch.Tensor, steps: int) -> float:
    """Seconds per step over ``steps`` consecutive steps (after 3 warm-up steps)."""
    sync = torch.cuda.synchronize if rt.device.type == "cuda" else (lambda: None)
    for _ in range(3):
        rt.step(token)
    sync()
    if rt.device.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(steps):
            rt.step(token)
        b.record()
        sync()
        return a.elapsed_time(b) / 1e3 / steps
    t0 = time.perf_counter()
    for _ in range(steps):
        rt.step(token)
    return (time.perf_counter() - t0) / steps


def gpu_busy_share(rt: DecodeRuntime, token: torch.Tensor, steps: int = 5) -> float | None:
    """Summed kernel time / wall time over ``steps`` steps (None if the profiler saw nothing)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            rt.step(token)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    kernel_us = sum(e.self_device_time_total for e in prof.key_averages())
    return kernel_us / 1e6 / wall if kernel_us else None


def decode_row(model, name: str, policy: str | None, batch: int, context: int, mode: str, steps: int,
               copy_bw: float, busy: bool) -> dict:
    rt = DecodeRuntime(model, policy, batch=batch, max_length=context + steps + 8, cuda_graphs=mode != "eager",
                       compile=mode == "compiled")
    fill_random(rt, context)
    token = torch.randint(0, model.config.vocab_size, (batch,), device=rt.device)
    per_step = timed_steps(rt, token, steps)
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    kv = rt.cache.bytes_per_token() * context * batch
    floor = (weights + kv) / copy_bw if copy_bw else float("nan")
    row = {"model": name, "policy": policy or "bf16", "batch": batch, "context": context,
           "mode": mode if rt.cuda_graphs or mode == "eager" else f"{mode} (fell back to eager)",
           "ms_per_token": per_step * 1e3,
           "floor_ms": floor * 1e3, "x_floor": per_step / floor, "weight_bytes": weights, "kv_bytes": kv,
           "tokens_per_s": batch / per_step}
    if busy and rt.device.type == "cuda":
        row["gpu_busy"] = gpu_busy_share(rt, token)
    report = rt.report()
    row["cache_allocated"] = report.bytes_allocated
    row["cache_analytic"] = report.bytes_per_token * report.capacity * report.batch + report.tail_bytes
    del rt
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def hf_row(run_model, batch: int, context: int, new: int, device) -> dict:
    """transformers' static-cache generate on the baseline's shape (random weights)."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=run_model.vocab_size, hidden_size=run_model.d_model, intermediate_size=run_model.mlp.d_ff,
        num_hidden_layers=run_model.num_layers, num_attention_heads=run_model.attention.num_heads,
        num_key_value_heads=run_model.attention.kv_heads, max_position_embeddings=context + new + 8,
        rms_norm_eps=run_model.norm_eps, tie_word_embeddings=run_model.tie_embeddings, rope_theta=10000.0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, context), device=device)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cache_len = context + new + 2  # one static cache shape for every call: no recompilation between them

    def run(n):
        cache = transformers.StaticCache(config=cfg, max_cache_len=cache_len)
        sync()
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, past_key_values=cache, pad_token_id=0)
        sync()
        return time.perf_counter() - t0

    run(1 + new)  # warm-up (and compilation, if generate compiles)
    t_short, t_long = run(1), run(1 + new)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    ms = (t_long - t_short) / new * 1e3
    return {"model": "hf-llama (baseline shape)", "policy": "bf16 static", "batch": batch, "context": context,
            "mode": f"transformers {transformers.__version__} generate", "ms_per_token": ms}


def prefill_row(model, name: str, policy: str | None, context: int, chunk: int) -> dict:
    rt = DecodeRuntime(model, policy, batch=1, max_length=context + 8, cuda_graphs=False)
    prompt = torch.randint(0, model.config.vocab_size, (context,)).tolist()
    rt.prefill([prompt[:chunk]], chunk)  # warm-up (kernel compilation)
    rt.reset()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    rt.prefill([prompt], chunk)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    report = rt.report()
    analytic = report.bytes_per_token * report.capacity * report.batch + report.tail_bytes
    del rt
    torch.cuda.empty_cache()
    return {"model": name, "policy": policy or "bf16", "context": context, "chunk": chunk,
            "prefill_s": seconds, "prefill_tokens_per_s": context / seconds,
            "cache_allocated": report.bytes_allocated, "cache_analytic": analytic,
            "allocated_equals_analytic": report.bytes_allocated == analytic}


def table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--modes", nargs="+", default=["eager", "graph", "compiled"], choices=["eager", "graph", "compiled"],
                    help="compiled = torch.compile + CUDA graph (batch 1 only: one compilation per model)")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers peer")
    ap.add_argument("--prefill", type=int, nargs="*", default=[32768, 131072], help="prefill contexts to time")
    ap.add_argument("--time-limit", type=float, default=540, help="stop starting new rows after this many s")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: checks the script only")
    args = ap.parse_args()
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.dry_run else "cuda")
    runs = {r.run_id: r.model for r in load_plan(ROOT / "configs/paper/dba_1b.yml").runs}
    if args.dry_run:
        runs = {k: m.model_copy(update={"num_layers": 2, "vocab_size": 512}) for k, m in runs.items()}
        args.contexts, args.batches, args.steps, args.prefill, args.modes = [64], [1], 2, [], ["eager"]
    result = {"command": "python " + " ".join(sys.argv), "device": torch.cuda.get_device_name() if not args.dry_run else "cpu",
              "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
              "dtype": "bfloat16", "rows": [], "peer": [], "prefill": []}
    try:
        import triton
        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None
    copy_bw = copy_ceiling(device) if device.type == "cuda" else 0.0
    result["copy_bytes_per_s"] = copy_bw
    print(f"# copy ceiling {copy_bw / 1e9:.0f} GB/s", flush=True)
    configs = [("baseline", None), ("dba", None), ("dba", HETERO)]
    models = {}
    for run_id, policy in configs:
        if run_id not in models:
            torch.manual_seed(0)
            models[run_id] = build_model(runs[run_id]).to(device=device, dtype=torch.bfloat16).eval()
        model = models[run_id]
        for batch in args.batches:
            for context in args.contexts:
                kv = sum(l.dims.num_kv_heads * sum(l.dims.cache_fields.values()) for l in model.attention_layers())
                if batch * context * kv * 2 > 110e9 and policy is None:
                    result["rows"].append({"model": run_id, "policy": "bf16", "batch": batch, "context": context,
                                           "error": "bf16 cache does not fit next to the scratch (> 110 GB)"})
                    continue
                for mode in args.modes:
                    if mode == "compiled" and batch != 1:
                        continue
                    if time.perf_counter() - start > args.time_limit:
                        print("# time limit reached", flush=True)
                        break
                    try:
                        row = decode_row(model, run_id, policy, batch, context, mode, args.steps, copy_bw,
                                         busy=batch == 1)
                        print(f"{row['model']:9s} {row['policy']:28s} b{batch} {context:>6} {row['mode']:5s} "
                              f"{row['ms_per_token']:8.3f} ms/token  floor {row['floor_ms']:.3f}  "
                              f"x{row['x_floor']:.2f}  busy {row.get('gpu_busy')}", flush=True)
                    except Exception as err:  # record and go on
                        row = {"model": run_id, "policy": policy or "bf16", "batch": batch, "context": context,
                               "mode": mode, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
                        print(f"FAILED {row}", flush=True)
                        if torch.cuda.is_available():
                            torch.cuda.empty_cache()
                    result["rows"].append(row)
    for run_id, policy in (("baseline", None), ("dba", HETERO)):
        for context in args.prefill:
            if time.perf_counter() - start > args.time_limit:
                break
            try:
                row = prefill_row(models[run_id], run_id, policy, context, 2048)
                print(f"prefill {run_id} {row['policy']} {context}: {row['prefill_tokens_per_s']:.0f} tok/s", flush=True)
            except Exception as err:
                row = {"model": run_id, "policy": policy or "bf16", "context": context,
                       "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
                print(f"FAILED {row}", flush=True)
            result["prefill"].append(row)
    models.clear()
    if not args.no_hf:
        for context in args.contexts:
            if time.perf_counter() - start > args.time_limit:
                break
            try:
                row = hf_row(runs["baseline"], 1, context, 16, device)
                print(f"hf {context}: {row['ms_per_token']:.3f} ms/token", flush=True)
            except Exception as err:
                row = {"model": "hf-llama", "batch": 1, "context": context,
                       "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
                print(f"FAILED {row}", flush=True)
                torch.cuda.empty_cache()
            result["peer"].append(row)
    (out / "decode_e2e.json").write_text(json.dumps(result, indent=2, default=str))
    cols = ["model", "policy", "batch", "context", "mode", "ms_per_token", "floor_ms", "x_floor", "gpu_busy",
            "tokens_per_s", "error"]
    md = [f"# End-to-end decode ({result['device']})", "",
          f"`{result['command']}`; torch {result['torch']}, CUDA {result['cuda']}, Triton {result['triton']}, "
          f"Python {result['python']}; bf16 weights; copy ceiling {copy_bw / 1e9:.0f} GB/s.", "",
          table(result["rows"], cols), "", "## Peer: transformers static-cache generate (baseline shape, batch 1)", "",
          table(result["peer"], ["model", "policy", "batch", "context", "mode", "ms_per_token", "error"]), "",
          "## Prefill through the runtime (batch 1, chunks of 2048)", "",
          table(result["prefill"], ["model", "policy", "context", "chunk", "prefill_s", "prefill_tokens_per_s",
                                    "cache_allocated", "cache_analytic", "allocated_equals_analytic", "error"])]
    (out / "decode_e2e.md").write_text("\n".join(md) + "\n")
    print(f"wrote {out / 'decode_e2e.md'}")


if __name__ == "__main__":
    main()
