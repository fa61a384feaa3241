"""Decode attention (one new token per sequence) over attnlab KV caches on one GPU.

Measures, in one run: the device's copy-bandwidth ceiling (large device-to-device copy, bytes
read + written / time); then the time of one layer's decode attention and the bandwidth it
achieves (cache bytes it must read / time, and that as a share of the copy ceiling) for

* ``sdpa``      PyTorch SDPA over a bf16 standard cache (32 heads x 64, d_model 2048)
* ``std-bf16``  attnlab's fused Triton kernel (``attnlab.kernels.decode``) over the same cache
* ``dba-*``     DBA, 32 heads, sem/geo/v = 256/1024/1280 (per head 8/32/40), formats fp16, q8_0,
                q4_0 and k_sem=q4_0,k_geo=q8_0,v=q4_0 (``dba-hetero``)
* ``gqa-*``     32 query heads / 8 kv heads, head dim 64, bf16 and q4_0

over contexts 4k..128k and batch 1/8/32. Caches are planar fields (``attnlab.quant.planar``:
float rows, or codes + block scales) filled with random rows (no model); the kernel runs on a
``plan_decode`` plan made once per shape. Timing: each call is captured ``R`` times into a CUDA graph,
cycling over enough independent copies of the inputs that they cannot stay in L2; the graph is
replayed (warm-up first) and the median replay time / R is reported.

    python benchmarks/decode_attention.py [--quick] [--sweep] [--out benchmarks/results]

Writes ``decode_attention.json`` and ``decode_attention.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from attnlab.quant import planar  # noqa: E402

KIB = 1024
CONTEXTS = [4 * KIB, 8 * KIB, 16 * KIB, 32 * KIB, 64 * KIB, 128 * KIB]
BATCHES = [1, 8, 32]
L2_BYTES = 50 * 2**20
ROTATE_BYTES = 5 * L2_BYTES          # rotate over copies until the inputs are 5x the L2
MAX_COPIES = 32
MEMORY_BUDGET = 0.7                  # share of free device memory one configuration may take

STD = dict(num_heads=32, num_kv=32, fields=(("k", 64),), v_dim=64)
DBA = dict(num_heads=32, num_kv=32, fields=(("k_sem", 8), ("k_geo", 32)), v_dim=40)
GQA = dict(num_heads=32, num_kv=8, fields=(("k", 64),), v_dim=64)
# MLA's absorbed decode on the same 32 query heads (DeepSeek-V2's widths): one shared latent c_kv
# (512, also the values: read once as keys, once as values, stored once) + a 64-wide RoPE key
MLA = dict(num_heads=32, num_kv=1, fields=(("c_kv", 512), ("k_rope", 64)), v_dim=512, value_alias=True)
CONFIGS = {
    "std-bf16": dict(STD, formats={}, dtype=torch.bfloat16),
    "dba-fp16": dict(DBA, formats={}, dtype=torch.float16),
    "dba-q8_0": dict(DBA, formats={"k_sem": "q8_0", "k_geo": "q8_0", "v": "q8_0"}, dtype=torch.bfloat16),
    "dba-q4_0": dict(DBA, formats={"k_sem": "q4_0", "k_geo": "q4_0", "v": "q4_0"}, dtype=torch.bfloat16),
    "dba-hetero": dict(DBA, formats={"k_sem": "q4_0", "k_geo": "q8_0", "v": "q4_0"}, dtype=torch.bfloat16),
    "gqa-bf16": dict(GQA, formats={}, dtype=torch.bfloat16),
    "gqa-q4_0": dict(GQA, formats={"k": "q4_0", "v": "q4_0"}, dtype=torch.bfloat16),
    "mla-bf16": dict(MLA, formats={}, dtype=torch.bfloat16),
    "mla-q8_0": dict(MLA, formats={"c_kv": "q8_0", "k_rope": "q8_0"}, dtype=torch.bfloat16),
}


# ------------------------------------------------------------------------------------- timing


def copy_bandwidth(device, nbytes: int = 4 * 2**30, reps: int = 20) -> dict:
    """Large device-to-device copy: (bytes read + bytes written) / median time."""
    if device.type == "cpu":  # --dry-run
        src = torch.randint(0, 255, (2**24,), dtype=torch.uint8)
        t = time.perf_counter()
        src.clone()
        t = time.perf_counter() - t
        return dict(bytes=2 * src.numel(), seconds=t, gbps=2 * src.numel() / t / 1e9)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    assert torch.equal(dst[:4096], src[:4096])
    t = statistics.median(times)
    del src, dst
    torch.cuda.empty_cache()
    return dict(bytes=2 * nbytes, seconds=t, gbps=2 * nbytes / t / 1e9)


def time_calls(calls: list, est_seconds: float, replays: int = 10) -> float:
    """Median seconds per call: a CUDA graph of R calls cycling over ``calls`` (one per input
    copy), replayed after warm-up."""
    n = len(calls)
    if not torch.cuda.is_available():  # --dry-run: the interpreter, one call
        calls[0]()
        t = time.perf_counter()
        calls[-1]()
        return time.perf_counter() - t
    reps = max(1, math.ceil(1e-3 / max(est_seconds, 1e-7)))             # ~1 ms per replay at least
    reps = min(256, math.ceil(max(reps, n) / n) * n)
    for c in calls:                                                      # compile + warm up
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        for i in range(reps):
            calls[i % n]()
    for _ in range(2):
        graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    del graph
    return statistics.median(times)


# ----------------------------------------------------------------------------------- caches

_FLOAT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def field_specs(cfg: dict):
    from attnlab.kernels.decode import FieldSpec

    model = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[cfg["dtype"]]
    names = list(cfg["fields"]) + [("v", cfg["v_dim"])]
    specs = [FieldSpec(n, cfg["formats"].get(n, model), cfg["num_kv"], d) for n, d in names]
    if cfg.get("value_alias"):  # values are the first key field (MLA's latent)
        specs[-1] = FieldSpec("v", specs[0].format, cfg["num_kv"], specs[0].head_dim)
    return specs


def stored_specs(cfg: dict):
    """The fields the cache stores (an aliased value field is not stored again)."""
    specs = field_specs(cfg)
    return specs[:-1] if cfg.get("value_alias") else specs


def row_bytes(spec) -> int:
    if spec.format in _FLOAT:
        return spec.row_length * torch.finfo(_FLOAT[spec.format]).bits // 8
    code_bytes, nblocks = planar.planar_widths(spec.format, spec.row_length)
    return code_bytes + 2 * nblocks


def build_fields(cfg: dict, batch: int, length: int, device, gen: torch.Generator) -> list:
    """Planar FieldData per field (keys..., v) filled with random rows."""
    from attnlab.kernels.decode import FieldData

    out = []
    for spec in stored_specs(cfg):
        n = spec.row_length
        fd = FieldData()
        if spec.format in _FLOAT:
            fd.data = torch.empty(batch, length, n, dtype=_FLOAT[spec.format], device=device)
        else:
            cb, nb = planar.planar_widths(spec.format, n)
            fd.codes = torch.empty(batch, length, cb, dtype=torch.uint8, device=device)
            fd.scales = torch.empty(batch, length, nb, dtype=torch.float16, device=device)
        chunk = max(1, (1 << 27) // (batch * n))  # ~512 MiB of fp32 at a time
        for s in range(0, length, chunk):
            e = min(length, s + chunk)
            rows = torch.randn(batch, e - s, n, device=device, generator=gen)
            if fd.data is not None:
                fd.data[:, s:e] = rows
            else:
                fd.codes[:, s:e], fd.scales[:, s:e] = planar.quantize(rows, spec.format)
        out.append(fd)
    if cfg.get("value_alias"):
        out.append(out[0])
    return out


def cache_bytes(cfg: dict, batch: int, length: int) -> int:
    return batch * length * sum(row_bytes(s) for s in stored_specs(cfg))


def make_queries(cfg: dict, batch: int, device, gen) -> list[torch.Tensor]:
    return [torch.randn(batch, cfg["num_heads"], 1, d, device=device, generator=gen).to(cfg["dtype"])
            for _, d in cfg["fields"]]


def make_plan(cfg: dict, batch: int, length: int, device, **kw):
    from attnlab.kernels.decode import plan_decode

    specs = field_specs(cfg)
    return plan_decode(specs[:-1], specs[-1], num_heads=cfg["num_heads"], batch=batch, max_length=length, tail=0,
                       ring_size=0, has_null=False, q_dtype=cfg["dtype"], device=device, **kw)


def kernel_call(plan, fields, q, scales, lengths_dev, q_pos):
    from attnlab.kernels.decode import decode_attention

    def call():
        return decode_attention(plan, q, fields[:-1], fields[-1], scales=scales, lengths=lengths_dev,
                                q_positions=q_pos)
    return call


def sdpa_call(cfg, fields, q, scales):
    kv = cfg["num_kv"]
    k = fields[0].data.unflatten(2, (kv, -1)).transpose(1, 2)  # (B, H, L, d) view
    v = fields[1].data.unflatten(2, (kv, -1)).transpose(1, 2)

    def call():
        return F.scaled_dot_product_attention(q[0], k, v, scale=scales[0])
    return call


# -------------------------------------------------------------------------------------- runs


def measure(name: str, cfg: dict, batch: int, length: int, device, copy_gbps: float, *, with_sdpa=False,
            variants=None) -> list[dict]:
    """All requested timings for one (configuration, batch, context); returns result rows."""
    gen = torch.Generator(device=device).manual_seed(batch * 7919 + length)
    one = cache_bytes(cfg, batch, length)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 2**32
    if one > MEMORY_BUDGET * free:
        return [dict(config=name, batch=batch, context=length, skipped=f"needs {one / 2**30:.1f} GiB")]
    copies = max(1, min(MAX_COPIES, math.ceil(ROTATE_BYTES / one), int(MEMORY_BUDGET * free // one)))
    caches = [build_fields(cfg, batch, length, device, gen) for _ in range(copies)]
    queries = [make_queries(cfg, batch, device, gen) for _ in range(copies)]
    scales = [1.0 / math.sqrt(d) for _, d in cfg["fields"]]
    lengths_dev = torch.full((batch,), length, dtype=torch.int32, device=device)
    q_pos = torch.full((batch, 1), length - 1, dtype=torch.long, device=device)
    est = one / (copy_gbps * 1e9)
    rows = []
    for label, kw in (variants or [("fused", {})]):
        try:
            plan = make_plan(cfg, batch, length, device, **kw)
            calls = [kernel_call(plan, c, q, scales, lengths_dev, q_pos) for c, q in zip(caches, queries)]
            t = time_calls(calls, est)
        except Exception as e:  # a sweep variant may not compile (resources): report, go on
            rows.append(dict(config=name, variant=label, batch=batch, context=length, error=repr(e)[:200]))
            continue
        rows.append(dict(config=name, variant=label, batch=batch, context=length, bytes=one, seconds=t,
                         gbps=one / t / 1e9, share=one / t / 1e9 / copy_gbps, copies=copies,
                         overrides=kw, plan=plan.describe()))
    if with_sdpa:
        calls = [sdpa_call(cfg, c, q, scales) for c, q in zip(caches, queries)]
        out_k = calls[0]()
        ref = kernel_call(make_plan(cfg, batch, length, device), caches[0], queries[0], scales, lengths_dev, q_pos)()
        err = float((out_k.float() - ref.float()).norm() / out_k.float().norm())
        t = time_calls(calls, est)
        rows.append(dict(config="sdpa", variant="torch", batch=batch, context=length, bytes=one, seconds=t,
                         gbps=one / t / 1e9, share=one / t / 1e9 / copy_gbps, copies=copies,
                         rel_diff_vs_fused=err))
    del caches, queries
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def sweep_variants(name: str, num_sms: int, batch: int, num_kv: int, length: int):
    """Kernel variants worth comparing for one configuration (benchmark --sweep): kv heads per
    program, block size, warps, splits."""
    from attnlab.kernels.decode import choose_heads_per_program

    cfg = CONFIGS[name]
    hp0 = choose_heads_per_program(field_specs(cfg), cfg["num_heads"] // num_kv)
    hps = sorted({h for h in (hp0 // 2, hp0, 2 * hp0) if h >= 1 and num_kv % h == 0 and
                  (not (name.startswith("dba-q") or name == "dba-hetero") or h % 4 == 0)})
    out = [(f"hp{hp}-bn{bn}", dict(heads_per_program=hp, block_n=bn)) for hp in hps for bn in (32, 64)]
    out += [(f"hp{hp0}-bn16", dict(heads_per_program=hp0, block_n=16)), (f"hp{hp0}-w8", dict(num_warps=8)),
            ("stages2", dict(num_stages=2)), ("stages4", dict(num_stages=4)),
            ("splits-x2", dict(num_splits=2 * max(1, -(-num_sms * 4 // max(1, batch * num_kv // hp0))))),
            ("splits-/2", dict(num_splits=max(1, num_sms * 2 // max(1, batch * num_kv // hp0))))]
    return out


TUNE = {  # candidate plan overrides per configuration (benchmark --tune)
    "dba": [("bn64", dict(block_n=64)), ("r128", dict(maxnreg=128, split_waves=4)),
            ("r168", dict(maxnreg=168, split_waves=3)), ("hp16", dict(heads_per_program=16)),
            ("w2", dict(num_warps=2, split_waves=4))],
    "gqa-q4_0": [("bn128", dict(block_n=128)), ("r128", dict(maxnreg=128, split_waves=4)),
                 ("hp4-bn64", dict(heads_per_program=4, block_n=64))],
    "mla": [("w8", dict(num_warps=8)), ("bn16-w8", dict(block_n=16, num_warps=8)),
            ("bn64-w8", dict(block_n=64, num_warps=8)), ("bn16", dict(block_n=16)),
            ("w8-waves1", dict(num_warps=8, split_waves=1))],
    "std": [("hp1-bn64", dict(heads_per_program=1, block_n=64)), ("hp2-bn64", dict(heads_per_program=2, block_n=64)),
            ("hp1-bn64-w2", dict(heads_per_program=1, block_n=64, split_waves=2))],
}


def tune_variants(name: str):
    if name.startswith("dba-") and name != "dba-fp16":
        return TUNE["dba"]
    if name == "std-bf16":
        return TUNE["std"]
    if name.startswith("mla-"):
        return TUNE["mla"]
    return TUNE.get(name, [])


def fmt_row(r: dict) -> str:
    if "skipped" in r or "error" in r:
        return f"| {r['config']} | {r.get('variant', '')} | {r['batch']} | {r['context'] // KIB}k | " \
               f"{r.get('skipped', r.get('error'))} | | | |"
    return (f"| {r['config']} | {r['variant']} | {r['batch']} | {r['context'] // KIB}k | {r['seconds'] * 1e6:.1f} | "
            f"{r['bytes'] / 2**20:.1f} | {r['gbps']:.0f} | {100 * r['share']:.1f}% |")


HEADER = ("| config | variant | batch | context | time (us) | MiB read | GB/s | of copy BW |\n"
          "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")


def targets(rows: list[dict], ref_bytes_ratio: float) -> list[str]:
    ok = [r for r in rows if "seconds" in r]
    lines = []
    fused = [r for r in ok if r["config"] != "sdpa" and r["variant"] in ("fused", "tuned") and r["context"] >= 32 * KIB]
    for name in CONFIGS:
        sel = [r for r in fused if r["config"] == name]
        if sel:
            best = max(sel, key=lambda r: r["share"])
            worst = min(sel, key=lambda r: r["share"])
            lines.append(f"- {name}: at >= 32k, {100 * worst['share']:.1f}% .. {100 * best['share']:.1f}% of copy "
                         f"bandwidth (target >= 85%: {'met' if worst['share'] >= 0.85 else 'met at some shapes' if best['share'] >= 0.85 else 'not met'})")
    for batch in BATCHES:
        h = [r for r in ok if r["config"] == "dba-hetero" and r["variant"] in ("fused", "tuned") and r["batch"] == batch
             and r["context"] == 128 * KIB]
        s = [r for r in ok if r["config"] == "sdpa" and r["batch"] == batch and r["context"] == 128 * KIB]
        if h and s:
            limit = 1.2 * ref_bytes_ratio * s[0]["seconds"]
            lines.append(f"- dba-hetero vs SDPA at 128k, batch {batch}: {h[0]['seconds'] * 1e6:.0f} us vs limit "
                         f"1.2 x {ref_bytes_ratio:.3f} x {s[0]['seconds'] * 1e6:.0f} us = {limit * 1e6:.0f} us "
                         f"({'met' if h[0]['seconds'] <= limit else 'not met'}; ratio {h[0]['seconds'] / limit:.2f})")
    return lines


def environment(device) -> dict:
    import triton

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name, sms, mem = props.name, props.multi_processor_count, round(props.total_memory / 2**30, 1)
    else:
        name, sms, mem = "cpu (dry run, Triton interpreter)", 0, 0
    return dict(command=" ".join(["python"] + sys.argv), device=name, sms=sms, memory_gib=mem,
                torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                python=platform.python_version(), date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                dtype="bf16 queries; caches bf16 (std, gqa-bf16), fp16 (dba-fp16) or quantized; fp32 accumulation")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--quick", action="store_true", help="batch 1 and 8, contexts 4k/32k/128k")
    ap.add_argument("--sweep", action="store_true", help="also try block sizes, warps, splits, stages")
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    ap.add_argument("--sweep-configs", nargs="*", default=list(CONFIGS))
    ap.add_argument("--time-limit", type=float, default=330.0, help="stop starting new shapes after this")
    ap.add_argument("--sweep-time-limit", type=float, default=200.0, help="stop sweeping after this")
    ap.add_argument("--tune", action="store_true", help="first time a few plan overrides per configuration "
                    "(batch 1 and 8, 32k); the main table then uses each configuration's best (variant 'tuned')")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (Triton interpreter): "
                    "checks the script, measures nothing")
    args = ap.parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before attnlab.kernels.decode is imported
        global CONTEXTS, BATCHES
        CONTEXTS, BATCHES = [96], [1, 2]
        device = torch.device("cpu")
        args.quick = False
    else:
        assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU (or --dry-run)"
        device = torch.device("cuda")
    t_start = time.time()
    env = environment(device)
    copy = copy_bandwidth(device)
    print(f"# {env['device']}: copy bandwidth {copy['gbps']:.0f} GB/s (read + write)", flush=True)
    contexts = [4 * KIB, 32 * KIB, 128 * KIB] if args.quick else CONTEXTS
    batches = [1, 8] if args.quick else BATCHES
    rows: list[dict] = []
    if args.sweep:
        from attnlab.kernels.decode import _num_sms
        for name in args.sweep_configs:
            cfg = CONFIGS[name]
            for batch, length in ((1, 32 * KIB), (8, 32 * KIB)) if not args.dry_run else ((1, 96),):
                if time.time() - t_start > args.sweep_time_limit:
                    continue
                rows += measure(name, cfg, batch, length, device, copy["gbps"],
                                variants=[("fused", {})] + sweep_variants(name, _num_sms(device), batch, cfg["num_kv"],
                                                                          length))
        for r in rows:
            r["sweep"] = True
        best: dict = {}
        for r in rows:
            if "seconds" in r:
                key = (r["config"], r["batch"], r["context"])
                if key not in best or r["seconds"] < best[key]["seconds"]:
                    best[key] = r
        for key, r in best.items():
            base = next(x for x in rows
                        if x.get("variant") == "fused" and (x["config"], x["batch"], x["context"]) == key)
            print(f"# sweep {key}: best {r['variant']} {100 * r['share']:.1f}% "
                  f"(default {100 * base.get('share', 0):.1f}%)")
    tuned: dict[str, dict] = {}
    if args.tune:
        for name in args.configs:
            cands = tune_variants(name)
            if not cands or time.time() - t_start > args.sweep_time_limit:
                continue
            trial = []
            for batch, length in ((1, 32 * KIB), (8, 32 * KIB)) if not args.dry_run else ((1, 96),):
                trial += measure(name, CONFIGS[name], batch, length, device, copy["gbps"],
                                 variants=[("fused", {})] + cands)
            for r in trial:
                r["sweep"] = True
            rows += trial
            scores = {}
            for label, kw in [("fused", {})] + cands:
                got = [r["share"] for r in trial if r.get("variant") == label and "share" in r]
                if len(got) == len(trial) // (len(cands) + 1):
                    scores[label] = (math.prod(got) ** (1 / len(got)), kw)
            best = max(scores.items(), key=lambda kv: kv[1][0])
            tuned[name] = dict(best[1][1], label=best[0])
            print(f"# tune {name}: {best[0]} ({', '.join(f'{k} {100 * v[0]:.1f}%' for k, v in scores.items())})",
                  flush=True)
    print(HEADER, flush=True)
    for name in args.configs:
        for batch in batches:
            for length in contexts:
                if time.time() - t_start > args.time_limit:
                    rows.append(dict(config=name, batch=batch, context=length, skipped="time limit"))
                    continue
                over = {k: v for k, v in tuned.get(name, {}).items() if k != "label"}
                variants = [("tuned" if over else "fused", over)]
                new = measure(name, CONFIGS[name], batch, length, device, copy["gbps"], with_sdpa=name == "std-bf16",
                              variants=variants)
                rows += new
                for r in new:
                    print(fmt_row(r), flush=True)
    std_bytes = 2 * 2048 * 2
    hetero_bytes = sum(row_bytes(s) for s in field_specs(CONFIGS["dba-hetero"]))
    ratio = hetero_bytes / std_bytes
    main_rows = [r for r in rows if not r.get("sweep")]
    goal = targets(main_rows, ratio)
    print("\n".join(goal))
    os.makedirs(args.out, exist_ok=True)
    result = dict(environment=env, copy=copy, bytes_per_token=dict(std_bf16=std_bytes, dba_hetero=hetero_bytes),
                  rows=rows, targets=goal, tuned=tuned, seconds=time.time() - t_start)
    with open(os.path.join(args.out, "decode_attention.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "decode_attention.md"), "w") as f:
        f.write("# Decode attention, one layer, one new token per sequence\n\n")
        f.write(f"- command: `{env['command']}`\n- device: {env['device']} ({env['sms']} SMs, {env['memory_gib']} GiB); "
                f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, Python {env['python']}; {env['date']}\n")
        f.write(f"- dtype: {env['dtype']}\n")
        f.write(f"- copy bandwidth ceiling (device-to-device copy, read + write): **{copy['gbps']:.0f} GB/s**\n")
        f.write(f"- bytes per token and layer: standard bf16 {std_bytes}, DBA hetero {hetero_bytes} "
                f"(ratio {ratio:.3f})\n")
        if tuned:
            f.write("- tuned plan overrides (variant `tuned`): " + "; ".join(
                f"{k}: {v['label']} {({a: b for a, b in v.items() if a != 'label'})}" for k, v in tuned.items()) + "\n")
        f.write("\n## Targets\n\n" + "\n".join(goal) + "\n\n## Results\n\n" + HEADER + " plan |\n")
        f.write("\n".join(fmt_row(r) + f" {r.get('plan', '')} |" for r in main_rows) + "\n")
        sweep = [r for r in rows if r.get("sweep")]
        if sweep:
            f.write("\n## Sweep (kv heads per program, block size, warps, splits)\n\n" + HEADER + " plan |\n")
            f.write("\n".join(fmt_row(r) + f" {r.get('plan', '')} |" for r in sweep) + "\n")
    print(f"# wrote {args.out}/decode_attention.json and .md in {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
