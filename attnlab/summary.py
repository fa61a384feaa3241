"""Plain-text tables for the terminal: the compiled plan and a side-by-side run summary."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby

from attnlab.model.stats import ModelStats, model_stats


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    """Aligned columns; ``align`` is one char per column, 'l' or 'r' (default: first l, rest r)."""
    align = align or "l" + "r" * (len(headers) - 1)
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}" if float(n).is_integer() else f"{n:.3g}{unit}"


def describe_attention(spec, d_model: int) -> str:
    """The variant's own compact label (``AttentionSpec.label``)."""
    return spec.label(spec.dims(d_model))


def describe_stack(cfg) -> str:
    """'decoupled h32 sem8/geo32/v40 x22' or a run-length list for hybrid stacks."""
    names = [describe_attention(s, cfg.d_model) for s in cfg.attention_specs()]
    return " | ".join(f"{name} x{len(list(g))}" for name, g in groupby(names))


def _per_layer(values: list[int]) -> str:
    parts, start = [], 0
    for value, group in groupby(values):
        n = len(list(group))
        parts.append(f"L{start}-{start + n - 1}: {value}" if n > 1 else f"L{start}: {value}")
        start += n
    return ", ".join(parts)


def format_plan(plan) -> str:
    """Every run with params, FLOPs/token and KV-cache bytes/token per format."""
    stats: dict[str, ModelStats] = {run.key: model_stats(run.model) for run in plan.runs}
    labels: list[str] = []
    for s in stats.values():
        labels += [k for k in s.kv_bytes if k not in labels]
    headers = ["run", "params", "non-emb", "fwd FLOPs/tok", "train FLOPs/tok"] + [f"KV B/tok {label}" for label in labels]
    rows = []
    for run in plan.runs:
        s = stats[run.key]
        rows.append([run.key, human(s.params), human(s.params_non_embedding), human(s.flops_per_token_forward),
                     human(s.flops_per_token_train)] + [f"{s.kv_total(lab):,}" if lab in s.kv_bytes else "-" for lab in labels])
    out = [f"plan {plan.name}: {len(plan.runs)} run(s)" + (f" from {plan.source}" if plan.source else "")]
    if plan.overrides:
        out.append("overrides: " + " ".join(plan.overrides))
    out += ["", format_table(headers, rows), ""]
    for run in plan.runs:
        s = stats[run.key]
        m = run.model
        out.append(f"{run.key}: d_model {m.d_model}, {len(s.attention_dims)} attention layers, block {m.block_size}, "
                   f"vocab {m.vocab_size}; {describe_stack(m)}")
        for lab, per_layer in s.kv_bytes.items():
            out.append(f"    KV bytes/token/layer {lab}: {_per_layer(per_layer)}  (total {sum(per_layer):,})")
    # the reference: the run with the largest fp16 cache (the first of equals)
    baseline = max(stats, key=lambda k: stats[k].kv_total("fp16"), default=None) if stats else None
    if baseline is not None and len(stats) > 1:
        ref = stats[baseline].kv_total("fp16")
        out.append("")
        out.append(f"KV-cache size relative to {baseline} in fp16:")
        for key, s in stats.items():
            ratios = ", ".join(f"{lab} {s.kv_total(lab) / ref:.3f}x" for lab in s.kv_bytes)
            out.append(f"    {key}: {ratios}")
    out.append("")
    out.append("FLOPs/token at a full block_size context (causal mean); train = 3x forward. "
               "Quantized rows are padded to whole blocks.")
    return "\n".join(out)


def format_results(results, plan) -> str:
    """Side-by-side summary of finished runs (quickstart table)."""
    by_key = {run.key: run for run in plan.runs}
    rows = []
    for r in results:
        run = by_key[f"{r.group}/{r.run_id}"]
        s = model_stats(run.model, formats=("fp16",))
        rows.append([f"{r.group}/{r.run_id}", describe_stack(run.model), human(r.params), f"{r.val_loss:.4f}",
                     f"{r.val_ppl:.2f}", f"{s.kv_total('fp16'):,}", human(r.train_tokens_per_s)])
    headers = ["run", "attention", "params", "val loss", "val ppl", "KV B/tok fp16", "train tok/s"]
    return format_table(headers, rows, align="llrrrrr")
