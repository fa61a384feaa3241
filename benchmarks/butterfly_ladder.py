"""Butterfly vs the dense model it was retrofitted from: retained KV, peak memory and decode
ms/token over a context ladder (the seed's 4k..128k), on one GPU, plus the physical floor.

    python benchmarks/butterfly_ladder.py [--out DIR] [--contexts 4096 16384 32768 65536 131072]
                                          [--steps 32] [--window 64] [--block-size 128] [--quick]

The dense model is the 1B standard baseline of ``configs/paper/dba_1b.yml`` (random bf16
weights); the butterfly model is ``attnlab.convert.butterfly.retrofit_butterfly`` of it (every
layer, causal_shift, same weights). For each context: a real chunked prefill of a random prompt
through ``DecodeRuntime.prefill`` (dense: the bf16 cache and the fused chunk kernel; butterfly:
window ring + summary pool), then ``--steps`` graph-captured decode steps.

* retained KV: ``CacheReport.retained_bytes`` after prefill (analytic bytes the sequence holds;
  dense = bytes/token x context);
* peak memory: ``torch.cuda.max_memory_allocated`` over allocation + prefill + decode (weights
  included, as the seed reports "peak");
* ms/token: CUDA-event time of consecutive steps / steps; floor: (weight bytes + the KV bytes one
  step reads) / the device-to-device copy bandwidth measured in the same run;
* the ``x`` columns are butterfly / dense at the same context (lower is better).

Writes ``butterfly_ladder.json`` / ``.md`` (device, versions, command) to ``--out``.
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

from attnlab.convert.butterfly import retrofit_butterfly  # noqa: E402
from attnlab.infer import DecodeRuntime  # noqa: E402
from attnlab.manifest import load_plan  # noqa: E402
from attnlab.model import build_model  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from decode_e2e import copy_ceiling, timed_steps  # noqa: E402


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def measure(model, context: int, steps: int, chunk: int, copy_bw: float, policy: str | None) -> dict:
    device = next(model.parameters()).device
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    rt = DecodeRuntime(model, policy, batch=1, max_length=context + steps + 8)
    prompt = torch.randint(0, model.config.vocab_size, (context,), generator=torch.Generator().manual_seed(0)).tolist()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    logits = rt.prefill([prompt], chunk_size=chunk)
    torch.cuda.synchronize()
    prefill_s = time.perf_counter() - t0
    report = rt.report()
    token = logits.argmax(-1)
    step_s = timed_steps(rt, token, steps)
    peak = torch.cuda.max_memory_allocated(device)
    kv_read = report.retained_bytes  # what one step reads of the cache (dense: every row; butterfly: the pools)
    floor = (weight_bytes(model) + kv_read) / copy_bw
    out = {"context": context, "prefill_s": prefill_s, "retained_kv_bytes": report.retained_bytes,
           "allocated_kv_bytes": report.bytes_allocated, "peak_bytes": peak, "ms_per_token": step_s * 1e3,
           "floor_ms": floor * 1e3, "graphs": rt.cuda_graphs}
    del rt
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768, 65536, 131072])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=2048, help="prefill chunk (tokens per forward)")
    ap.add_argument("--quick", action="store_true", help="a 2-layer model, contexts 4k and 8k (a smoke run)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("butterfly_ladder.py needs a CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    cfg = next(r.model for r in load_plan(ROOT / "configs/paper/dba_1b.yml").runs if r.run_id == "baseline")
    if args.quick:
        cfg = cfg.model_copy(update={"num_layers": 2})
        args.contexts = [4096, 8192]
    contexts = sorted(args.contexts)
    cfg = cfg.model_copy(update={"block_size": max(contexts) + args.steps + 8})
    dense = build_model(cfg).to(device=device, dtype=torch.bfloat16).eval()
    sparse = retrofit_butterfly(dense, window=args.window, block_size=args.block_size)
    copy_bw = copy_ceiling(device)
    rows = []
    for context in contexts:
        for name, model in (("dense", dense), ("butterfly", sparse)):
            row = {"model": name, **measure(model, context, args.steps, args.chunk, copy_bw, "rollback=0")}
            rows.append(row)
            print(f"{name:9s} {context:7d}: prefill {row['prefill_s']:.2f}s, retained {row['retained_kv_bytes'] / 2**20:.1f} MiB, "
                  f"peak {row['peak_bytes'] / 2**30:.2f} GiB, {row['ms_per_token']:.2f} ms/token "
                  f"(floor {row['floor_ms']:.2f})", flush=True)
    by = {(r["model"], r["context"]): r for r in rows}
    ladder = []
    for context in contexts:
        d, b = by[("dense", context)], by[("butterfly", context)]
        ladder.append({"context": context, "retained_x": b["retained_kv_bytes"] / d["retained_kv_bytes"],
                       "peak_x": b["peak_bytes"] / d["peak_bytes"], "ms_x": b["ms_per_token"] / d["ms_per_token"],
                       "dense_ms": d["ms_per_token"], "butterfly_ms": b["ms_per_token"],
                       "dense_floor_ms": d["floor_ms"], "butterfly_floor_ms": b["floor_ms"],
                       "prefill_x": b["prefill_s"] / d["prefill_s"]})
    meta = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "python": platform.python_version(),
            "dtype": "bfloat16", "command": "python " + " ".join(sys.argv), "copy_bandwidth_GBps": copy_bw / 1e9,
            "model": f"configs/paper/dba_1b.yml baseline ({cfg.num_layers} layers, d_model {cfg.d_model}), random weights",
            "butterfly": {"window": args.window, "block_size": args.block_size, "partner": "causal_shift",
                          "layers": "all"}, "steps": args.steps, "prefill_chunk": args.chunk}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "butterfly_ladder.json").write_text(json.dumps({"meta": meta, "rows": rows, "ladder": ladder}, indent=2))
    lines = [f"# Butterfly vs dense: retained KV, peak memory, decode ms/token ({meta['device']})", "",
             f"`{meta['command']}` — torch {meta['torch']}, {meta['dtype']}, {meta['model']}; butterfly window "
             f"{args.window}, block {args.block_size}, causal_shift, every layer; copy bandwidth "
             f"{meta['copy_bandwidth_GBps']:.0f} GB/s. `x` = butterfly / dense (lower is better).", "",
             "| context | retained KV x | peak x | ms/token x | dense ms/token (floor) | butterfly ms/token (floor) | prefill x |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in ladder:
        lines.append(f"| {r['context']:,} | {r['retained_x']:.4f} | {r['peak_x']:.3f} | {r['ms_x']:.3f} | "
                     f"{r['dense_ms']:.2f} ({r['dense_floor_ms']:.2f}) | {r['butterfly_ms']:.2f} "
                     f"({r['butterfly_floor_ms']:.2f}) | {r['prefill_x']:.2f} |")
    (args.out / "butterfly_ladder.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
