"""Random planar caches, queries and an independent float64 reference for the decode kernel
(``attnlab.kernels.decode``): fields are quantized with ``attnlab.quant.planar.quantize`` and
dequantized with ``planar.dequantize``; attention is computed densely in float64."""

from __future__ import annotations

import math

import torch

from attnlab.kernels.decode import BLOCK_FORMATS, FieldData, FieldSpec
from attnlab.quant import planar

_DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_case(*, num_heads=4, num_kv=2, key_dims=(16,), v_dim=16, formats=None, lengths=(37,), capacity=None,
              tail=0, ring_extra=4, null=False, dtype=torch.float32, q_dtype=None, device="cpu", seed=0,
              value_alias=False):
    """Fields (key names k | k_sem, k_geo | k0, k1, ...), their FieldData, queries and reference
    inputs. ``formats``: field -> format (missing: the model dtype's float format).
    ``value_alias``: values are key field 0's rows (MLA's latent; ``v_dim`` must equal its dim)."""
    gen = torch.Generator().manual_seed(seed)
    names = {1: ("k",), 2: ("k_sem", "k_geo")}.get(len(key_dims), tuple(f"k{i}" for i in range(len(key_dims))))
    model_fmt = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    formats = dict(formats or {})
    specs = [FieldSpec(n, formats.get(n, model_fmt), num_kv, d) for n, d in zip(names + ("v",), key_dims + (v_dim,))]
    batch = len(lengths)
    cap = capacity or max(lengths)
    ring_size = tail + ring_extra if tail > 0 else 0
    datas, exact, stored = [], [], []
    for s in specs:
        n = s.row_length
        x = torch.randn(batch, cap, n, generator=gen).to(dtype).float()             # the model's rows
        fd = FieldData()
        if s.format in BLOCK_FORMATS:
            fd.codes, fd.scales = planar.quantize(x, s.format)
            deq = planar.dequantize(fd.codes, fd.scales, s.format, n, torch.float64)
        else:
            fd.data = x.to(_DT[s.format])
            deq = fd.data.double()
        if tail > 0:
            ring = torch.full((batch, ring_size, n), float("nan"))
            for b, length in enumerate(lengths):
                for j in range(max(0, length - ring_size), length):
                    ring[b, j % ring_size] = x[b, j]
            fd.ring = ring.to(dtype).to(device)
        for attr in ("data", "codes", "scales"):
            if getattr(fd, attr) is not None:
                setattr(fd, attr, getattr(fd, attr).to(device))
        datas.append(fd)
        exact.append(x.to(dtype).double())
        stored.append(deq)
    if value_alias:
        assert v_dim == key_dims[0]
        specs[-1] = FieldSpec("v", specs[0].format, num_kv, v_dim)
        datas[-1], exact[-1], stored[-1] = datas[0], exact[0], stored[0]
    q_dtype = q_dtype or dtype
    q = [torch.randn(batch, num_heads, 1, d, generator=gen).to(q_dtype).to(device) for d in key_dims]
    scales = [1.0 / math.sqrt(d) for d in key_dims]
    q_positions = torch.tensor([[n - 1] for n in lengths], device=device)
    null_k = null_v = None
    if null:
        null_k = [torch.randn(num_kv, d, generator=gen).to(dtype).to(device) for d in key_dims]
        null_v = torch.randn(num_kv, v_dim, generator=gen).to(dtype).to(device)
    return dict(specs=specs, keys=datas[:-1], value=datas[-1], exact=exact, stored=stored, q=q, scales=scales,
                lengths=torch.tensor(lengths, dtype=torch.int32, device=device), q_positions=q_positions,
                null_k=null_k, null_v=null_v, tail=tail, ring_size=ring_size, num_heads=num_heads,
                num_kv=num_kv, dtype=dtype, q_dtype=q_dtype, device=device, max_length=cap)


def reference64(case) -> torch.Tensor:
    """Dense float64 attention of each sequence's one query over its visible keys (exact tail
    from the full-precision rows, older keys as stored), null token first."""
    specs, kv = case["specs"], case["num_kv"]
    num_heads = case["num_heads"]
    group = num_heads // kv
    lengths = case["lengths"].cpu().tolist()
    pos = case["q_positions"].reshape(-1).cpu().tolist()
    tail = case["tail"]
    outs = []
    for b, (length, p) in enumerate(zip(lengths, pos)):
        vis = min(length, p + 1)
        j = torch.arange(vis)
        use_exact = (j > p - tail) if tail > 0 else torch.zeros(vis, dtype=torch.bool)

        def rows(i):  # (KV, vis, d) of field i
            st = case["stored"][i][b, :vis]
            ex = case["exact"][i][b, :vis]
            r = torch.where(use_exact[:, None], ex, st)
            return r.view(vis, kv, -1).transpose(0, 1)

        score = 0
        for i in range(len(specs) - 1):
            qf = case["q"][i][b, :, 0].double().cpu().view(kv, group, -1)             # (KV, G, d)
            score = score + case["scales"][i] * torch.einsum("kgd,kjd->kgj", qf, rows(i))
        v = rows(len(specs) - 1)
        if case["null_k"] is not None:
            ns = 0
            for i in range(len(specs) - 1):
                qf = case["q"][i][b, :, 0].double().cpu().view(kv, group, -1)
                ns = ns + case["scales"][i] * torch.einsum("kgd,kd->kg", qf, case["null_k"][i].double().cpu())
            score = torch.cat([ns[..., None], score], -1)
            v = torch.cat([case["null_v"].double().cpu()[:, None], v], 1)
        w = torch.softmax(score, -1)
        outs.append(torch.einsum("kgj,kjd->kgd", w, v).reshape(num_heads, 1, -1))
    return torch.stack(outs)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return float((out - ref).norm() / ref.norm())
