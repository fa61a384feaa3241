"""PNG plots for a report: loss curves, latency vs context, memory vs context, and the
perplexity vs KV-bytes Pareto view. Each plot is drawn only when its data exists.

Conventions every figure keeps (checked by ``tests/report/test_report_plots.py``):
- every axis has a label with its unit in parentheses;
- each run has one colour and one marker, from a fixed palette keyed by the run's position in the
  report (the same run looks the same in every figure); each policy / memory config / split has one
  line style;
- a series that is identical for every run (a shared reference) is drawn once, in grey;
- legends sit outside the axes (right of them), never over the data;
- an estimate is drawn with its interval when the record has one: latency p10-p90 bands, a
  bootstrap 95% interval over windows for perplexity when per-window NLLs are recorded
  (``window_nll``); nothing is invented when they are not;
- point labels are placed so that no two overlap (a label with no free spot is left out and the
  figure says how many were).

``draw_*`` functions return a matplotlib Figure (or None without data); the unprefixed ones save
it as a PNG and return the path."""

from __future__ import annotations

import math
from pathlib import Path

from attnlab.report.collect import RunData
from attnlab.report.tables import Table, ppl_interval

#: Okabe-Ito colour-blind-safe palette, then tab10 extras: run i gets PALETTE[i % len]
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000",
           "#8C564B", "#7F7F7F", "#BCBD22", "#17BECF"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p"]
LINESTYLES = ["-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)), (0, (8, 2))]
REFERENCE_COLOR = "#7F7F7F"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def run_style(index: int) -> dict:
    """Colour and marker of the run at position ``index`` of the report (several runs beyond
    the palette's length repeat a colour but pair it with another marker)."""
    return {"color": PALETTE[index % len(PALETTE)], "marker": MARKERS[index % len(MARKERS)]}


def _run_order(order: list[str] | None, *tables: Table | None) -> list[str]:
    """The report's run order, extended by runs met in the tables (first appearance)."""
    out = list(order or [])
    for table in tables:
        for row in (table.rows if table is not None else []):
            if row.get("run") not in out:
                out.append(row.get("run"))
    return out


def _styles(order: list[str]) -> dict[str, dict]:
    return {run: run_style(i) for i, run in enumerate(order)}


def _linestyles(keys) -> dict:
    seen: list = []
    for key in keys:
        if key not in seen:
            seen.append(key)
    return {key: LINESTYLES[i % len(LINESTYLES)] for i, key in enumerate(seen)}


def _figure(num_axes: int = 1, width: float = 6.0, height: float = 3.8):
    plt = _pyplot()
    fig, axes = plt.subplots(1, num_axes, figsize=(width * num_axes + 2.6, height), squeeze=False,
                             layout="constrained")
    return fig, list(axes[0])


def _legends(fig, sections: list[tuple[str, list]]) -> None:
    """One legend per section (title, [(handle, label)]), stacked outside the axes, right of them."""
    handles, labels = [], []
    for title, entries in sections:
        if not entries:
            continue
        if handles:
            handles.append(_blank())
            labels.append("")
        handles.append(_blank())
        labels.append(title)
        for handle, label in entries:
            handles.append(handle)
            labels.append(label)
    if handles:
        legend = fig.legend(handles, labels, loc="outside right upper", fontsize=7, frameon=False,
                            handlelength=2.6)
        for text, label in zip(legend.get_texts(), labels):
            if any(label == title for title, _ in sections):
                text.set_fontweight("bold")


def _blank():
    from matplotlib.patches import Rectangle

    return Rectangle((0, 0), 0, 0, fill=False, edgecolor="none", visible=False)


def _run_handle(style: dict, linestyle="-", line: bool = True):
    from matplotlib.lines import Line2D

    return Line2D([], [], color=style["color"], marker=style["marker"], linestyle=linestyle if line else "none",
                  markersize=5)


def _style_handle(linestyle, marker=None, color="#333333"):
    from matplotlib.lines import Line2D

    return Line2D([], [], color=color, linestyle=linestyle, marker=marker, markersize=5,
                  markerfacecolor="none" if marker else None)


def _plain_log_ticks(axis) -> None:
    """Log-axis tick labels as plain numbers (0.5, 2, 1,024), not 5x10^-1; when fewer than two
    major ticks are in view (a narrow range), the minor ticks are labelled too, so every axis
    shows numbers."""
    from matplotlib.ticker import FuncFormatter

    def plain(value, _pos=None) -> str:
        return f"{value:,.6g}"

    def minor(value, _pos=None) -> str:
        lo, hi = sorted(axis.get_view_interval())
        majors = [t for t in axis.get_majorticklocs() if lo <= t <= hi]
        if len(majors) >= 2 or value <= 0:
            return ""
        mantissa = round(value / 10 ** math.floor(math.log10(value) + 1e-9))
        return plain(value) if hi / max(lo, 1e-300) < 3 or mantissa in (2, 5) else ""  # wide: 2 and 5 only

    axis.set_major_formatter(FuncFormatter(plain))
    axis.set_minor_formatter(FuncFormatter(minor))


def _save(fig, path: Path) -> Path:
    """Render to memory, then write atomically (a full disk: one-line error, old plot kept)."""
    import io

    from attnlab.fsutil import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=150, metadata={"Software": None})  # no version stamp: reproducible bytes
    _pyplot().close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _saved(fig, path: Path) -> Path | None:
    return None if fig is None else _save(fig, path)


# ---------------------------------------------------------------------------------------- loss

def draw_loss_curves(runs: list[RunData]):
    if not any(r.train or r.evals for r in runs):
        return None
    fig, (ax,) = _figure()
    styles = _styles([r.key for r in runs])
    for run in runs:
        style = styles[run.key]
        if run.train:
            ax.plot([e["step"] for e in run.train], [e["loss"] for e in run.train], color=style["color"],
                    alpha=0.6, linewidth=1, linestyle="-")
        if run.evals:
            ax.plot([e["step"] for e in run.evals], [e["val_loss"] for e in run.evals], color=style["color"],
                    marker=style["marker"], markersize=4, linewidth=1.6, linestyle="--")
    ax.set_xlabel("training step (optimizer updates)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Training and held-out loss")
    ax.grid(alpha=0.3)
    _legends(fig, [("run", [(_run_handle(styles[r.key]), r.key) for r in runs]),
                   ("split", [(_style_handle("-"), "train (logged batches)"),
                              (_style_handle("--", "o"), "held-out (training eval)")])])
    return fig


def loss_curves(runs: list[RunData], path: Path) -> Path | None:
    return _saved(draw_loss_curves(runs), path)


# ------------------------------------------------------------------------------------- latency

def _points(table: Table, x: str, y: str, where=lambda row: True) -> dict[tuple, list[dict]]:
    """(run, policy) -> rows with x and y, sorted by x."""
    series: dict[tuple, list[dict]] = {}
    for row in table.rows:
        if row.get(x) is None or row.get(y) is None or not where(row):
            continue
        series.setdefault((row.get("run"), row.get("policy")), []).append(row)
    return {k: sorted(v, key=lambda r: r[x]) for k, v in series.items()}


def draw_latency_vs_context(sweep: Table | None, latency: Table | None, order: list[str] | None = None):
    # (title, table, x, y, (lo, hi) interval columns or None, x label, y label, y scale)
    specs = []
    if latency is not None:
        specs.append(("Decode step (latency benchmark)", latency, "prompt_len", "decode_ms_per_token",
                      ("decode_p10_ms_per_token", "decode_p90_ms_per_token"), "prompt length (tokens)",
                      "decode time (ms/token; median, p10-p90 band)"))
        specs.append(("Prefill (latency benchmark)", latency, "prompt_len", "prefill_median_s",
                      ("prefill_p10_s", "prefill_p90_s"), "prompt length (tokens)",
                      "prefill time (s; median, p10-p90 band)"))
    if sweep is not None:
        ok = lambda r: r.get("ok", True)  # noqa: E731
        specs.append(("Decode step after prefill (context sweep)", sweep, "length", "decode_ms", None,
                      "context length (tokens)", "decode time (ms/token; median of steps)", ok))
        specs.append(("Chunked prefill (context sweep)", sweep, "length", "prefill_s", None,
                      "context length (tokens)", "prefill time (s; one measurement)", ok))
    panels = []
    for spec in specs:
        title, table, x, y, band, xlabel, ylabel = spec[:7]
        where = spec[7] if len(spec) > 7 else (lambda r: True)
        series = _points(table, x, y, where)
        if series:
            panels.append((title, series, x, y, band, xlabel, ylabel))
    if not panels:
        return None
    order = _run_order(order, sweep, latency)
    styles = _styles(order)
    policies = _linestyles(p for _, series, *_ in panels for (_, p) in sorted(series, key=str))
    fig, axes = _figure(len(panels), width=4.2)
    used_runs, band_drawn = [], False
    for ax, (title, series, x, y, band, xlabel, ylabel) in zip(axes, panels):
        for (run, policy), rows in sorted(series.items(), key=lambda kv: (order.index(kv[0][0]), str(kv[0][1]))):
            style = styles[run]
            xs, ys = [r[x] for r in rows], [r[y] for r in rows]
            ax.plot(xs, ys, color=style["color"], marker=style["marker"], markersize=4,
                    linestyle=policies[policy], linewidth=1.4)
            if band and all(r.get(band[0]) is not None and r.get(band[1]) is not None for r in rows):
                ax.fill_between(xs, [r[band[0]] for r in rows], [r[band[1]] for r in rows],
                                color=style["color"], alpha=0.18, linewidth=0)
                band_drawn = True
            if run not in used_runs:
                used_runs.append(run)
        ax.set_xscale("log", base=2)
        _plain_log_ticks(ax.xaxis)
        ax.set_yscale("log")
        _plain_log_ticks(ax.yaxis)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, which="both")
    sections = [("run", [(_run_handle(styles[r]), r) for r in order if r in used_runs]),
                ("cache policy", [(_style_handle(ls), str(p)) for p, ls in policies.items()])]
    if band_drawn:
        from matplotlib.patches import Patch

        sections.append(("interval", [(Patch(color="#333333", alpha=0.18), "p10-p90 of repeats")]))
    _legends(fig, sections)
    return fig


def latency_vs_context(sweep: Table | None, latency: Table | None, path: Path,
                       order: list[str] | None = None) -> Path | None:
    return _saved(draw_latency_vs_context(sweep, latency, order), path)


# -------------------------------------------------------------------------------------- memory

def _allocated(row: dict) -> float | None:
    if row.get("measured_bytes") is None:
        return None
    return row["measured_bytes"] + (row.get("measured_tail_bytes") or 0)


def draw_memory_vs_context(memory: Table | None, order: list[str] | None = None):
    if memory is None or not memory.rows:
        return None
    order = _run_order(order, memory)
    styles = _styles(order)
    groups: dict[tuple, list[dict]] = {}
    for row in memory.rows:
        if row.get("context") is None or row.get("estimate_bytes") is None:
            continue
        groups.setdefault((row.get("config"), row.get("run")), []).append(row)
    if not groups:
        return None
    configs = _linestyles(config for config, _ in groups)
    fig, (ax,) = _figure(width=6.2)
    references, measured_drawn = [], False
    for config in configs:
        by_run = {run: sorted(rows, key=lambda r: r["context"]) for (c, run), rows in groups.items() if c == config}
        curves = {run: tuple((r["context"], r["estimate_bytes"], r.get("policy")) for r in rows)
                  for run, rows in by_run.items()}
        shared = len(by_run) > 1 and len(set(curves.values())) == 1
        for run in sorted(by_run, key=order.index):
            rows = by_run[run]
            xs = [r["context"] for r in rows]
            if shared:  # the same series for every run: a reference, drawn once
                if run == min(by_run, key=order.index):
                    ax.plot(xs, [r["estimate_bytes"] / 2**20 for r in rows], color=REFERENCE_COLOR,
                            linestyle=configs[config], linewidth=2.2, alpha=0.8)
                    references.append(config)
                meas = [r for r in rows if _allocated(r) is not None]
                if meas and run == min(by_run, key=order.index):
                    ax.scatter([r["context"] for r in meas], [_allocated(r) / 2**20 for r in meas],
                               facecolors="none", edgecolors=REFERENCE_COLOR, marker="o", s=30, zorder=3)
                    measured_drawn = True
                continue
            style = styles[run]
            ax.plot(xs, [r["estimate_bytes"] / 2**20 for r in rows], color=style["color"],
                    linestyle=configs[config], linewidth=1.4)
            meas = [r for r in rows if _allocated(r) is not None]
            if meas:
                ax.scatter([r["context"] for r in meas], [_allocated(r) / 2**20 for r in meas],
                           facecolors="none", edgecolors=style["color"], marker=style["marker"], s=30, zorder=3)
                measured_drawn = True
    ax.set_xscale("log", base=2)
    _plain_log_ticks(ax.xaxis)
    ax.set_yscale("log")
    _plain_log_ticks(ax.yaxis)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("KV cache, one sequence (MiB)")
    ax.set_title("KV-cache memory vs context")
    ax.grid(alpha=0.3, which="both")

    def config_label(config):
        policies = sorted({str(r.get("policy")) for (c, _), rows in groups.items() if c == config for r in rows})
        text = str(config) + (f" [{policies[0]}]" if len(policies) == 1 else " [per-run policy]")
        return text + (" (shared reference)" if config in references else "")

    sections = [("run", [(_run_handle(styles[r], line=False), r) for r in order
                         if any(run == r and c not in references for c, run in groups)]),
                ("config (line = analytic estimate)",
                 [(_style_handle(ls, color=REFERENCE_COLOR if c in references else "#333333"), config_label(c))
                  for c, ls in configs.items()])]
    if measured_drawn:
        sections.append(("measured", [(_style_handle("none", "o"), "allocated by the cache (hollow marker)")]))
    _legends(fig, sections)
    return fig


def memory_vs_context(memory: Table | None, path: Path, order: list[str] | None = None) -> Path | None:
    return _saved(draw_memory_vs_context(memory, order), path)


# -------------------------------------------------------------------------------------- pareto

def _overlaps(box, boxes) -> bool:
    return any(box.overlaps(other) for other in boxes)


def _place_labels(fig, ax, points: list[tuple[float, float, str]]) -> int:
    """Annotate (x, y, text) points so that no two labels overlap each other or a marker; a label
    with no free spot among the candidate offsets is left out. Returns how many were left out."""
    from matplotlib.transforms import Bbox

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    marker_boxes = []
    for x, y, _ in points:
        px, py = ax.transData.transform((x, y))
        marker_boxes.append(Bbox([[px - 3, py - 3], [px + 3, py + 3]]))
    axes_box = ax.get_window_extent(renderer)
    offsets = [(dx * r, dy * r) for r in (4, 10, 18, 28) for dx, dy in
               ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1.4), (0, -1.4))]
    placed, skipped = [], 0
    for x, y, text in sorted(points, key=lambda p: (p[0], p[1])):
        for dx, dy in offsets:
            ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=6,
                              ha="left" if dx >= 0 else "right", va="bottom" if dy >= 0 else "top",
                              color="#333333",
                              arrowprops={"arrowstyle": "-", "color": "#777777", "linewidth": 0.6,
                                          "shrinkA": 0, "shrinkB": 2} if abs(dx) > 5 else None)
            box = ann.get_window_extent(renderer)
            inside = axes_box.containsx(box.x0) and axes_box.containsx(box.x1) and \
                axes_box.containsy(box.y0) and axes_box.containsy(box.y1)
            if inside and not _overlaps(box, placed) and not _overlaps(box, marker_boxes):
                placed.append(box)
                break
            ann.remove()
        else:
            skipped += 1
    return skipped


def draw_pareto(perplexity: Table | None, order: list[str] | None = None):
    if perplexity is None or not perplexity.rows:
        return None
    rows = [r for r in perplexity.rows if r.get("bytes_per_token") is not None and r.get("ppl") is not None]
    if not rows:
        return None
    order = _run_order(order, perplexity)
    styles = _styles(order)
    fig, (ax,) = _figure(width=6.2, height=4.2)
    with_interval = 0
    for run in order:
        mine = sorted((r for r in rows if r.get("run") == run), key=lambda r: r["bytes_per_token"])
        if not mine:
            continue
        style = styles[run]
        xs, ys = [r["bytes_per_token"] for r in mine], [r["ppl"] for r in mine]
        ax.scatter(xs, ys, color=style["color"], marker=style["marker"], s=28, zorder=3)
        for r in mine:
            interval = ppl_interval(r)
            if interval is not None:
                ax.errorbar([r["bytes_per_token"]], [r["ppl"]],
                            yerr=[[r["ppl"] - interval[0]], [interval[1] - r["ppl"]]],
                            color=style["color"], linewidth=0.9, capsize=2, zorder=2)
                with_interval += 1
    ax.set_xscale("log", base=2)
    _plain_log_ticks(ax.xaxis)
    ax.set_xlabel("KV cache per token, analytic (bytes; all layers)")
    ax.set_ylabel("held-out perplexity (exp nats/token; cached decode)")
    ax.set_title("Perplexity vs KV-cache bytes per token (lower left is better)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.margins(x=0.12, y=0.12)
    note = ("bars: bootstrap 95% interval over windows" if with_interval == len(rows) else
            "no interval: per-window NLLs not recorded" if with_interval == 0 else
            f"bars: bootstrap 95% interval ({with_interval}/{len(rows)} points)")
    _legends(fig, [("run", [(_run_handle(styles[r], line=False), r) for r in order
                            if any(x.get("run") == r for x in rows)]),
                   ("interval", [(_blank(), note)])])
    skipped = _place_labels(fig, ax, [(r["bytes_per_token"], r["ppl"], str(r.get("policy"))) for r in rows])
    fig.set_layout_engine("none")  # labels were placed against this layout: keep it
    if skipped:
        legend = fig.legends[0]
        box = legend.get_window_extent(fig.canvas.get_renderer()).transformed(fig.transFigure.inverted())
        fig.text(box.x0, box.y0 - 0.02, f"{skipped} policy label(s) left\nout for space: see the\n"
                 "perplexity table", fontsize=6, color="#666666", va="top")
    return fig


def pareto(perplexity: Table | None, path: Path, order: list[str] | None = None) -> Path | None:
    return _saved(draw_pareto(perplexity, order), path)


# ---------------------------------------------------------------------------------------- retrieval
def draw_retrieval(retrieval: Table | None, order: list[str] | None = None):
    """Retrieval accuracy against needle depth: one panel per (task, context length), one line
    per run (and policy, by line style) with its bootstrap interval over trials."""
    if retrieval is None or not retrieval.rows:
        return None
    rows = [r for r in retrieval.rows if r.get("accuracy") is not None]
    if not rows:
        return None
    order = _run_order(order, retrieval)
    styles = _styles(order)
    kinds = sorted({str(r["kind"]) for r in rows})
    lengths = sorted({int(r["length"]) for r in rows})
    policies = sorted({str(r.get("policy")) for r in rows})
    lines = _linestyles(policies)
    # a grid: one row per task, one column per context length
    fig, grid = _pyplot().subplots(len(kinds), len(lengths), figsize=(3.0 * len(lengths) + 2.6, 2.8 * len(kinds)),
                                   squeeze=False, layout="constrained")
    panels = [(kind, length) for kind in kinds for length in lengths]
    axes = [grid[i][j] for i in range(len(kinds)) for j in range(len(lengths))]
    for ax, (kind, length) in zip(axes, panels):
        for run in order:
            for policy in policies:
                pts = sorted((r for r in rows if r.get("run") == run and str(r["kind"]) == kind
                              and int(r["length"]) == length and str(r.get("policy")) == policy),
                             key=lambda r: r["depth"])
                if not pts:
                    continue
                style = styles[run]
                xs, ys = [r["depth"] for r in pts], [r["accuracy"] for r in pts]
                err = [[max(0.0, r["accuracy"] - r.get("accuracy_lo", r["accuracy"])) for r in pts],
                       [max(0.0, r.get("accuracy_hi", r["accuracy"]) - r["accuracy"]) for r in pts]]
                ax.errorbar(xs, ys, yerr=err, color=style["color"], marker=style["marker"], markersize=4,
                            linestyle=lines[policy], linewidth=1.1, capsize=2)
        ax.set_title(f"{kind}, {length:,} tokens", fontsize=9)
        ax.set_xlabel("needle depth (fraction of the haystack)")
        ax.set_ylabel("exact-match accuracy (fraction)")
        ax.set_xlim(-0.05, 1.05)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    sections = [("run", [(_run_handle(styles[r]), r) for r in order if any(x.get("run") == r for x in rows)]),
                ("interval", [(_blank(), "bars: bootstrap 95% interval over trials")])]
    if len(policies) > 1:
        sections.insert(1, ("KV-cache policy", [(_style_handle(lines[p]), p) for p in policies]))
    _legends(fig, sections)
    return fig


def retrieval(table: Table | None, path: Path, order: list[str] | None = None) -> Path | None:
    return _saved(draw_retrieval(table, order), path)
