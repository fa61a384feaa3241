"""Chunked-prefill attention (a chunk of T new tokens over a long cache) on one GPU: attnlab's
Triton prefill kernel (``attnlab.kernels.prefill``) vs PyTorch SDPA over a bf16 standard cache.

One layer, batch 1, a chunk of ``--chunk`` tokens at the end of a context of ``--contexts``
positions (offset = context - chunk):

* ``sdpa``          SDPA, 32 heads x 64, bf16, bottom-right causal mask (the chunk's queries see
                    every earlier key and the causal part of the chunk)
* ``std-bf16``      the prefill kernel over the same values in a bf16 planar store (32 kv heads)
* ``gqa-bf16``      32 query / 8 kv heads x 64, bf16
* ``dba-hetero``    DBA, 32 heads, per head k_sem 8 (q4_0), k_geo 32 (q8_0), v 40 (q4_0), null token
* ``dba-hetero-t64``  the same with an exact tail of 64 (ring + fresh rows)

``--sweep`` first times a few block configurations per kernel case at ``--sweep-context`` and
uses the fastest for the long contexts (the heuristic's own choice is timed too). Stores hold
random values (block formats: random codes and scales): timing does not depend on them. Timing:
CUDA events, one warm-up, median of ``--reps``. ``std-bf16`` is also checked against SDPA
(same inputs; max abs difference reported).

    python benchmarks/prefill_attention.py [--sweep] [--contexts 32768 131072] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from attnlab.bench.timing import time_fn  # noqa: E402
from attnlab.kernels import prefill as pf  # noqa: E402
from attnlab.kernels.fields import FieldData, FieldSpec  # noqa: E402
from attnlab.quant import planar  # noqa: E402

CASES = {
    "std-bf16": dict(num_heads=32, num_kv=32, keys=(("k", 64, "bf16"),), v=(64, "bf16"), null=False, tail=0),
    "gqa-bf16": dict(num_heads=32, num_kv=8, keys=(("k", 64, "bf16"),), v=(64, "bf16"), null=False, tail=0),
    "dba-hetero": dict(num_heads=32, num_kv=32, keys=(("k_sem", 8, "q4_0"), ("k_geo", 32, "q8_0")), v=(40, "q4_0"),
                       null=True, tail=0),
    "dba-hetero-t64": dict(num_heads=32, num_kv=32, keys=(("k_sem", 8, "q4_0"), ("k_geo", 32, "q8_0")),
                           v=(40, "q4_0"), null=True, tail=64),
}
SWEEP = [  # (block_m, block_n, num_warps, num_stages, prefetch, maxnreg)
    (128, 64, 8, 2, False, None), (128, 64, 8, 3, False, None), (128, 64, 8, 2, True, None),
    (128, 64, 8, 2, False, 128), (64, 64, 4, 2, False, None), (64, 32, 4, 2, False, None),
    (128, 128, 8, 2, False, None), (128, 32, 4, 2, False, None),
]


def field(spec: FieldSpec, capacity: int, device, gen) -> FieldData:
    n = spec.num_kv_heads * spec.head_dim
    if spec.format in planar.PLANAR_FORMATS:
        code_bytes, blocks = planar.planar_widths(spec.format, n)
        codes = torch.randint(0, 256, (1, capacity, code_bytes), dtype=torch.uint8, device=device, generator=gen)
        scales = (torch.rand(1, capacity, blocks, device=device, generator=gen) * 0.05 + 0.01).half()
        return FieldData(codes=codes, scales=scales)
    dt = pf.FLOAT_DTYPES[spec.format]
    return FieldData(data=torch.randn(1, capacity, n, device=device, generator=gen).to(dt))


def build(case: dict, context: int, chunk: int, device, seed=0) -> dict:
    gen = torch.Generator(device=device).manual_seed(seed)
    kv, h = case["num_kv"], case["num_heads"]
    specs = [FieldSpec(n, fmt, kv, d) for n, d, fmt in case["keys"]] + [FieldSpec("v", case["v"][1], kv, case["v"][0])]
    data = [field(s, context, device, gen) for s in specs]
    tail = case["tail"]
    fresh = None
    if tail:
        for s, d in zip(specs, data):
            d.ring = torch.randn(1, tail + 64, s.num_kv_heads * s.head_dim, device=device, generator=gen).bfloat16()
        fresh = [torch.randn(1, chunk, s.num_kv_heads * s.head_dim, device=device, generator=gen).bfloat16()
                 for s in specs]
    dims = [d for _, d, _ in case["keys"]]
    q = [torch.randn(1, chunk, h, d, device=device, generator=gen).bfloat16().transpose(1, 2) for d in dims]
    null_k = null_v = None
    if case["null"]:
        null_k = [torch.randn(kv, d, device=device, generator=gen).bfloat16() for d in dims]
        null_v = torch.randn(kv, case["v"][0], device=device, generator=gen).bfloat16()
    nf = len(case["keys"])
    return dict(q=q, keys=data[:nf], value=data[nf], key_specs=specs[:nf], value_spec=specs[nf],
                scales=[1.0 / math.sqrt(d) for _, d, _ in case["keys"]],
                offsets=torch.tensor([context - chunk], dtype=torch.int32, device=device),
                lengths=torch.tensor([context], dtype=torch.int32, device=device), max_length=context, tail=tail,
                fresh_keys=fresh[:nf] if fresh else None, fresh_value=fresh[nf] if fresh else None,
                null_k=null_k, null_v=null_v)


def run(inp: dict, cfg=None):
    kw = {}
    if cfg is not None:
        bm, bn, w, st, pre, mr = cfg
        kw = dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st, prefetch=pre)
        if mr is not None:
            kw["maxnreg"] = mr
    return pf.prefill_attention(**inp, **kw)


def timed(fn, reps: int) -> float:
    """Median seconds of ``reps`` CUDA-event-timed calls after one warm-up call."""
    return time_fn(fn, warmup=1, repeats=reps, device=torch.device("cuda")).median_s


def flops(case: dict, context: int, chunk: int) -> float:
    """Useful multiply-adds x 2 (causal: the chunk's queries see context - chunk + t + 1 keys)."""
    keys = chunk * (context - chunk) + chunk * (chunk + 1) / 2
    dqk = sum(d for _, d, _ in case["keys"])
    return 2.0 * case["num_heads"] * keys * (dqk + case["v"][0])


def sdpa_inputs(context: int, chunk: int, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(1, chunk, 32, 64, device=device, generator=gen).bfloat16().transpose(1, 2)
    k = torch.randn(1, context, 32, 64, device=device, generator=gen).bfloat16()
    v = torch.randn(1, context, 32, 64, device=device, generator=gen).bfloat16()
    return q, k, v


def sdpa_fn(q, k, v, chunk, context):
    try:
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(chunk, context)
        return lambda: F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask), \
            "bottom-right causal"
    except Exception:  # pragma: no cover
        return lambda: F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2)), "no mask"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-context", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--budget", type=float, default=1e9, help="seconds; later steps are skipped past it")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    t_start = time.time()
    device = torch.device("cuda")
    import triton

    results = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                   chunk=args.chunk, command=" ".join(sys.argv), sweep={}, rows=[])
    os.makedirs(args.out, exist_ok=True)

    def save():
        results["elapsed_s"] = time.time() - t_start
        with open(os.path.join(args.out, "prefill_attention.json"), "w") as f:
            json.dump(results, f, indent=1)

    def over_budget():
        return time.time() - t_start > args.budget

    def measure(name, context, cfg, label, inp, ref=None):
        if over_budget():
            return None
        case = CASES[name]
        try:
            s = timed(lambda: run(inp, cfg), args.reps)
        except Exception as e:  # a config that does not compile or fit
            print(f"{name} {context} {label} {cfg}: failed {type(e).__name__}: {str(e)[:300]}", flush=True)
            return None
        row = dict(case=name, context=context, config=label, cfg=cfg, ms=s * 1e3,
                   tflops=flops(case, context, args.chunk) / s / 1e12)
        if ref is not None:
            row["max_abs_diff_vs_sdpa"] = float((run(inp, cfg).float() - ref.float()).abs().max())
        results["rows"].append(row)
        print(f"{name} {context} {label} {cfg}: {s * 1e3:.2f} ms ({row['tflops']:.0f} TFLOP/s)"
              + (f" maxdiff vs sdpa {row['max_abs_diff_vs_sdpa']:.2e}" if ref is not None else ""), flush=True)
        save()
        return s

    def kernel_cases(context, names, configs):
        """Time each case at ``context`` with each (label, cfg); std-bf16 on SDPA's values."""
        ref = None
        if "std-bf16" in names:
            q, k, v = sdpa_inputs(context, args.chunk, device)
            fn, mask_kind = sdpa_fn(q, k, v, args.chunk, context)
            if "sdpa" in names:
                s = timed(fn, args.reps)
                results["rows"].append(dict(case="sdpa", context=context, ms=s * 1e3, mask=mask_kind,
                                            tflops=flops(CASES["std-bf16"], context, args.chunk) / s / 1e12))
                print(f"sdpa {context} ({mask_kind}): {s * 1e3:.2f} ms", flush=True)
            ref = fn()
        for name in names:
            if name == "sdpa" or over_budget():
                continue
            inp = build(CASES[name], context, args.chunk, device)
            if name == "std-bf16":  # the same values SDPA saw
                inp["keys"][0].data = k.reshape(1, context, -1)
                inp["value"].data = v.reshape(1, context, -1)
                inp["q"] = [q]
            for label, cfg in configs(name):
                measure(name, context, cfg, label, inp, ref if name == "std-bf16" else None)
            del inp
            torch.cuda.empty_cache()

    heuristic = lambda name: [("heuristic", None)]  # noqa: E731
    # 1. the asked-for numbers: SDPA, standard bf16 and DBA hetero with the heuristic blocks
    for context in args.contexts:
        kernel_cases(context, ["sdpa", "std-bf16", "dba-hetero"], heuristic)
    # 2. block configurations at a shorter context
    best = {}
    if args.sweep:
        for name in ("dba-hetero", "std-bf16"):
            inp = build(CASES[name], args.sweep_context, args.chunk, device)
            rows = [(cfg, measure(name, args.sweep_context, cfg, "sweep", inp)) for cfg in [None] + SWEEP]
            results["sweep"][name] = [dict(cfg=c, ms=None if t is None else t * 1e3) for c, t in rows]
            timed_rows = [(c, t) for c, t in rows if t is not None]
            if timed_rows and min(timed_rows, key=lambda r: r[1])[0] is not None:
                best[name] = min(timed_rows, key=lambda r: r[1])[0]
            del inp
            torch.cuda.empty_cache()
        print("best:", best, flush=True)
    # 3. the exact tail and GQA; the sweep's best where it differs from the heuristic
    if "dba-hetero" in best:
        best["dba-hetero-t64"] = best["dba-hetero"]
    for context in args.contexts:
        kernel_cases(context, ["dba-hetero-t64", "gqa-bf16"], heuristic)
    for context in args.contexts[::-1]:
        names = [n for n in ("dba-hetero", "std-bf16", "dba-hetero-t64") if n in best]
        kernel_cases(context, names, lambda name: [("best", best[name])])
    save()


if __name__ == "__main__":
    main()
