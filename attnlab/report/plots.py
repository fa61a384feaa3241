"""PNG plots for a report: loss curves, latency vs context, memory vs context, and the
perplexity vs KV-bytes Pareto view. Each plot is drawn only when its data exists."""

from __future__ import annotations

from pathlib import Path

from attnlab.report.collect import RunData
from attnlab.report.tables import Table


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Render to memory, then write atomically (a full disk: one-line error, old plot kept)."""
    import io

    from attnlab.fsutil import atomic_write_bytes

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, metadata={"Software": None})  # no version stamp: reproducible bytes
    _pyplot().close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def loss_curves(runs: list[RunData], path: Path) -> Path | None:
    if not any(r.train or r.evals for r in runs):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, run in enumerate(runs):
        color = f"C{i}"
        if run.train:
            ax.plot([e["step"] for e in run.train], [e["loss"] for e in run.train], color=color, alpha=0.45,
                    linewidth=1, label=f"{run.key} train")
        if run.evals:
            ax.plot([e["step"] for e in run.evals], [e["val_loss"] for e in run.evals], color=color, marker="o",
                    linewidth=2, label=f"{run.key} held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Training and held-out loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _by_run(table: Table, x: str, y: str, where=lambda row: True) -> dict[str, tuple[list, list]]:
    series: dict[str, tuple[list, list]] = {}
    for row in table.rows:
        if row.get(x) is None or row.get(y) is None or not where(row):
            continue
        xs, ys = series.setdefault(row["run"], ([], []))
        xs.append(row[x])
        ys.append(row[y])
    return series


def latency_vs_context(sweep: Table | None, latency: Table | None, path: Path) -> Path | None:
    panels = []
    if sweep is not None:
        panels.append(("decode ms at context", _by_run(sweep, "length", "decode_ms", lambda r: r.get("ok")), "context (tokens)"))
        panels.append(("prefill time (s)", _by_run(sweep, "length", "prefill_s", lambda r: r.get("ok")), "context (tokens)"))
    if latency is not None:
        panels.append(("decode ms/token", _by_run(latency, "prompt_len", "decode_ms_per_token"), "prompt length (tokens)"))
    panels = [p for p in panels if p[1]]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, series, xlabel) in zip(axes[0], panels):
        for run, (xs, ys) in sorted(series.items()):
            order = sorted(range(len(xs)), key=xs.__getitem__)
            ax.plot([xs[i] for i in order], [ys[i] for i in order], marker="o", label=run)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def memory_vs_context(memory: Table | None, path: Path) -> Path | None:
    if memory is None or not memory.rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    groups: dict[tuple, list] = {}
    for row in memory.rows:
        groups.setdefault((row["run"], row["config"], row.get("policy")), []).append(row)
    for i, ((run, config, policy), rows) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
        rows = sorted(rows, key=lambda r: r["context"])
        label = f"{run} {config}" + (f" ({policy})" if policy else "")
        ax.plot([r["context"] for r in rows], [r["estimate_bytes"] / 2**20 for r in rows], color=f"C{i}", label=label)
        measured = [r for r in rows if r.get("measured_bytes") is not None]
        ax.scatter([r["context"] for r in measured], [(r["measured_bytes"] + (r.get("measured_tail_bytes") or 0)) / 2**20 for r in measured], color=f"C{i}",
                   marker="x", zorder=3)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("KV cache (MiB; line = estimate, x = measured)")
    ax.set_title("KV-cache memory vs context")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, path)


def pareto(perplexity: Table | None, path: Path) -> Path | None:
    if perplexity is None or not perplexity.rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (run, (xs, ys)) in enumerate(sorted(_by_run(perplexity, "bytes_per_token", "ppl").items())):
        ax.scatter(xs, ys, color=f"C{i}", label=run, zorder=3)
        labels = [r["policy"] for r in perplexity.rows if r["run"] == run and r.get("ppl") is not None]
        for x, y, text in zip(xs, ys, labels):
            ax.annotate(text, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KV-cache bytes per token (all layers)")
    ax.set_ylabel("held-out perplexity (cached decode)")
    ax.set_title("Perplexity vs KV bytes/token (lower-left is better)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)
