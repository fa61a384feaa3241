"""Compile the decode kernels for a GPU target on a machine without one (no launch) and print
ptxas' resource report (registers, spills, stack) per kernel: ``python benchmarks/offline_compile.py``.

Uses a stand-in Triton driver that reports the target; needs Triton's bundled ptxas."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "kernels"))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

from attnlab.kernels import triton_decode as td  # noqa: E402

CASES = {
    "std_bf16_hd64": dict(num_heads=32, num_kv=32, key_dims=(64,), v_dim=64, dtype=torch.bfloat16),
    "gqa_bf16_hd64": dict(num_heads=32, num_kv=8, key_dims=(64,), v_dim=64, dtype=torch.bfloat16),
    "gqa_q4_0_hd64": dict(num_heads=32, num_kv=8, key_dims=(64,), v_dim=64, dtype=torch.bfloat16,
                          formats={"k": "q4_0", "v": "q4_0"}),
    "dba_fp16": dict(num_heads=32, num_kv=32, key_dims=(8, 32), v_dim=40, dtype=torch.float16),
    "dba_q8_0": dict(num_heads=32, num_kv=32, key_dims=(8, 32), v_dim=40, dtype=torch.bfloat16,
                     formats={"k_sem": "q8_0", "k_geo": "q8_0", "v": "q8_0"}),
    "dba_q4_0": dict(num_heads=32, num_kv=32, key_dims=(8, 32), v_dim=40, dtype=torch.bfloat16,
                     formats={"k_sem": "q4_0", "k_geo": "q4_0", "v": "q4_0"}),
    "dba_hetero": dict(num_heads=32, num_kv=32, key_dims=(8, 32), v_dim=40, dtype=torch.bfloat16,
                       formats={"k_sem": "q4_0", "k_geo": "q8_0", "v": "q4_0"}),
    "dba_hetero_tail_null": dict(num_heads=32, num_kv=32, key_dims=(8, 32), v_dim=40, dtype=torch.bfloat16,
                                 formats={"k_sem": "q4_0", "k_geo": "q8_0", "v": "q4_0"}, tail=16, null=True),
}


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    ap.add_argument("--block-n", type=int, default=None)
    ap.add_argument("--num-warps", type=int, default=None)
    ap.add_argument("--hp", type=int, default=None, help="kv heads per program")
    ap.add_argument("--dump", default=None, help="folder for ttgir/ptx/sass")
    ap.add_argument("--grid", type=int, default=0, help="also compile N random test-like shapes")
    args = ap.parse_args()
    from decode_cases import make_case

    driver.set_active(_Driver(args.arch))
    from attnlab.kernels import triton_decode_jit as tj
    kernels = [tj.split_kernel, tj.reduce_kernel]
    def compile_only(run):
        return lambda *a, grid, warmup, **kw: run(*a, grid=grid, warmup=True, **kw)

    for k in kernels:
        k.run = compile_only(k.run)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    cases = {name: CASES[name] for name in args.cases}
    import random
    rng = random.Random(0)
    fmts = ["fp16", "bf16", "fp32", "q8_0", "q4_0", "nf4"]
    for i in range(args.grid):
        dims = rng.choice([((16,), 16), ((8, 32), 40), ((20,), 20), ((40,), 40), ((64,), 64), ((8, 16), 24),
                           ((32,), 32), ((128,), 128)])
        kv = rng.choice([1, 2, 3, 4])
        names = ("k",) if len(dims[0]) == 1 else ("k_sem", "k_geo")
        cases[f"grid{i}"] = dict(num_heads=kv * rng.choice([1, 2, 4]), num_kv=kv, key_dims=dims[0], v_dim=dims[1],
                                 formats={n: rng.choice(fmts) for n in names + ("v",)},
                                 tail=rng.choice([0, 0, 5]), null=rng.choice([False, True]),
                                 dtype=rng.choice([torch.float32, torch.bfloat16]))
    for name, spec in cases.items():
        c = make_case(lengths=(300,), **spec)
        for k in kernels:
            k.device_caches.clear()
        try:
            td.decode_attention(c["q"], c["cache"], c["scales"], q_positions=c["q_positions"],
                                key_lengths=c["key_lengths"], null_k=c["null_k"], null_v=c["null_v"],
                                block_n=args.block_n, num_warps=args.num_warps, heads_per_program=args.hp)
        except Exception as e:  # the stand-in launch returns None; a compile error is what we look for
            if "NoneType" not in repr(e):
                raise
        for k in kernels:
            for compiled in k.device_caches[0][0].values():
                ptx = compiled.asm["ptx"]
                with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                    f.write(ptx)
                res = subprocess.run([ptxas, f"-arch=sm_{args.arch}a" if args.arch == 90 else f"-arch=sm_{args.arch}",
                                      "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
                info = " ".join(re.findall(r"(Used \d+ registers|\d+ bytes stack frame|\d+ bytes spill stores"
                                           r"|\d+ bytes spill loads)", res.stderr))
                cvt = len(re.findall(r"convert_layout", compiled.asm["ttgir"]))
                print(f"{name:24s} {k.fn.__name__:15s} {info}  convert_layout={cvt} "
                      f"shared={compiled.metadata.shared}" + (f"  {spec}" if name.startswith("grid") else ""))
                if args.dump:
                    os.makedirs(args.dump, exist_ok=True)
                    for ext in ("ttgir", "ptx"):
                        with open(os.path.join(args.dump, f"{name}.{k.fn.__name__}.{ext}"), "w") as out:
                            out.write(compiled.asm[ext])


if __name__ == "__main__":
    main()
