"""Compile the decode kernels (``attnlab.kernels.decode``) for a GPU target on a machine without
one (no launch) and print ptxas' resource report (registers, spills) per kernel, plus the size
and instruction mix of the split kernel's main loop in SASS (per tile and per token):

    python benchmarks/offline_compile.py [--cases dba_hetero ...] [--hp 4 --block-n 64 ...] [--dump DIR]

Uses a stand-in Triton driver that reports the target; needs Triton's bundled ptxas/nvdisasm."""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "kernels"))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

DBA = dict(num_heads=32, num_kv=32, key_dims=(8, 32), v_dim=40)
CASES = {
    "std_bf16": dict(num_heads=32, num_kv=32, key_dims=(64,), v_dim=64, dtype=torch.bfloat16),
    "gqa_bf16": dict(num_heads=32, num_kv=8, key_dims=(64,), v_dim=64, dtype=torch.bfloat16),
    "gqa_q4_0": dict(num_heads=32, num_kv=8, key_dims=(64,), v_dim=64, dtype=torch.bfloat16,
                     formats={"k": "q4_0", "v": "q4_0"}),
    "dba_fp16": dict(DBA, dtype=torch.float16),
    "dba_q8_0": dict(DBA, dtype=torch.bfloat16, formats={"k_sem": "q8_0", "k_geo": "q8_0", "v": "q8_0"}),
    "dba_q4_0": dict(DBA, dtype=torch.bfloat16, formats={"k_sem": "q4_0", "k_geo": "q4_0", "v": "q4_0"}),
    "dba_hetero": dict(DBA, dtype=torch.bfloat16, formats={"k_sem": "q4_0", "k_geo": "q8_0", "v": "q4_0"}),
    "dba_hetero_tail_null": dict(DBA, dtype=torch.bfloat16, formats={"k_sem": "q4_0", "k_geo": "q8_0", "v": "q4_0"},
                                 tail=16, null=True),
    "three_keys_odd": dict(num_heads=6, num_kv=3, key_dims=(6, 10, 12), v_dim=40, dtype=torch.bfloat16,
                           formats={"k0": "q4_0", "k1": "q8_0", "k2": "fp16", "v": "nf4"}, tail=4, null=True),
}
_OPS = ("HMMA", "LDG", "LDS", "STS", "LDSM", "BAR", "SHFL", "PRMT", "LOP3", "HFMA2", "HADD2", "HMUL2", "FFMA",
        "FMUL", "FADD", "MUFU", "IMAD", "IADD3", "F2FP", "F2F", "I2F", "SEL", "FSEL", "ISETP", "FSETP", "LEA", "SHF")


class _Driver:
    def __init__(self, arch):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


def loop_stats(sass: str) -> tuple[int, collections.Counter]:
    """Instructions of the largest loop (a backward branch) in nvdisasm output, by opcode."""
    lines = []
    labels = {}
    for line in sass.splitlines():
        m = re.match(r"\s*(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(lines)
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)(.*?);", line)
        if m:
            lines.append((m.group(2), m.group(3)))
    best = (0, 0)
    for i, (op, rest) in enumerate(lines):
        if op.startswith("BRA"):
            t = re.search(r"(\.L_x_\d+)", rest)
            if t and labels.get(t.group(1), i + 1) <= i and i - labels[t.group(1)] > best[1] - best[0]:
                best = (labels[t.group(1)], i + 1)
    body = lines[best[0]:best[1]]
    return len(body), collections.Counter(op.split(".")[0] for op, _ in body)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    ap.add_argument("--block-n", type=int, default=None)
    ap.add_argument("--num-warps", type=int, default=None)
    ap.add_argument("--hp", type=int, default=None, help="kv heads per program")
    ap.add_argument("--maxnreg", type=int, default=None, help="register cap per thread")
    ap.add_argument("--dump", default=None, help="folder for ttgir/ptx/sass")
    args = ap.parse_args()
    driver.set_active(_Driver(args.arch))
    from planar_cases import make_case

    from attnlab.kernels import decode as dk
    from attnlab.kernels import decode_jit as dj
    kernels = [dj.split_kernel, dj.reduce_kernel]

    def compile_only(run):
        return lambda *a, grid, warmup, **kw: run(*a, grid=grid, warmup=True, **kw)

    for k in kernels:
        k.run = compile_only(k.run)
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in args.cases:
        spec = CASES[name]
        c = make_case(lengths=(300,), **spec)
        for k in kernels:
            k.device_caches.clear()
        plan = dk.plan_decode(c["specs"][:-1], c["specs"][-1], num_heads=c["num_heads"], batch=1, max_length=300,
                              tail=c["tail"], ring_size=c["ring_size"], has_null=c["null_k"] is not None,
                              q_dtype=c["q_dtype"], device="cpu", heads_per_program=args.hp, block_n=args.block_n,
                              num_warps=args.num_warps, use_asm=True, maxnreg=args.maxnreg)
        try:
            dk.decode_attention(plan, c["q"], c["keys"], c["value"], scales=c["scales"], lengths=c["lengths"],
                                q_positions=c["q_positions"], null_k=c["null_k"], null_v=c["null_v"])
        except Exception as e:  # the stand-in launch returns None; a compile error is what we look for
            if "NoneType" not in repr(e):
                raise
        print(f"{name}: {plan.describe()}")
        for k in kernels:
            for compiled in k.device_caches[0][0].values():
                with tempfile.TemporaryDirectory() as tmp:
                    cubin = os.path.join(tmp, "k.cubin")
                    with open(cubin, "wb") as f:
                        f.write(compiled.asm["cubin"])
                    sass = subprocess.run([os.path.join(bindir, "nvdisasm"), "-c", cubin],
                                          capture_output=True, text=True).stdout
                    usage = subprocess.run([os.path.join(bindir, "cuobjdump"), "-res-usage", cubin],
                                           capture_output=True, text=True).stdout
                info = " ".join(re.findall(r"(REG:\d+|STACK:\d+|LOCAL:\d+)", usage))
                n, ops = loop_stats(sass)
                cvt = len(re.findall(r"convert_layout", compiled.asm["ttgir"]))
                line = f"  {k.fn.__name__:13s} {info} convert_layout={cvt} shared={compiled.metadata.shared}"
                if k is dj.split_kernel:
                    line += (f"\n    loop: {n} SASS per tile, {n / plan.block_n:.1f} per token; " +
                             " ".join(f"{op}={ops[op]}" for op in _OPS if ops[op]))
                print(line)
                if args.dump:
                    os.makedirs(args.dump, exist_ok=True)
                    for ext, text in (("ttgir", compiled.asm["ttgir"]), ("ptx", compiled.asm["ptx"]), ("sass", sass)):
                        with open(os.path.join(args.dump, f"{name}.{k.fn.__name__}.{ext}"), "w") as out:
                            out.write(text)


if __name__ == "__main__":
    main()
