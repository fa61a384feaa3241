"""Render checks for every report plot with 1, 2 and 4 synthetic runs, read from the matplotlib
Figure objects (not pixels): every axis labelled with a unit, legends outside the axes' data
area, no two text labels overlapping, one distinct colour (and marker) per run, the same run
styled the same in every figure; plus the report tables' headers, formats and splits."""

import math
from pathlib import Path

import pytest

from attnlab.report import plots
from attnlab.report.collect import RunData
from attnlab.report.tables import Table, benchmark_caption, bootstrap_interval, display_tables, fmt, ppl_interval

POLICIES = ["fp16", "q8_0", "q4_0", "nf4", "k_sem=q4_0,k_geo=q8_0,v=q4_0"]
CONFIGS = [("standard_fp16", 2048), ("arch_fp16", None), ("arch_policy", None)]


def _keys(n):
    return [f"zoo/run{i}" for i in range(n)]


def _runs(n):
    runs = []
    for i, key in enumerate(_keys(n)):
        run = RunData(key, Path("/nonexistent") / key, {})
        run.train = [{"step": s, "loss": 3.0 - 0.1 * s / 10 - 0.01 * i} for s in range(10, 110, 10)]
        run.evals = [{"step": s, "val_loss": 2.9 - 0.1 * s / 10 + 0.01 * i} for s in (50, 100)]
        runs.append(run)
    return runs


def _perplexity(n, windows=True):
    rows = []
    for i, key in enumerate(_keys(n)):
        for j, policy in enumerate(POLICIES):
            row = {"run": key, "policy": policy, "bytes_per_token": (1024 >> (i % 2)) // (1 + j) + 16 * i,
                   "nll": 1.28 + 0.002 * j + 0.001 * i, "delta_nll": 0.002 * j, "windows": 8, "seq_len": 128}
            row["ppl"] = math.exp(row["nll"])  # close points: labels must be placed apart
            if windows:
                row["window_nll"] = [row["nll"] + 0.03 * math.sin(k + j + i) for k in range(8)]
            rows.append(row)
    return Table("perplexity", "Perplexity", list(dict.fromkeys(k for r in rows for k in r)), rows)


def _memory(n):
    rows = []
    for i, key in enumerate(_keys(n)):
        for config, bpt in CONFIGS:
            bpt = bpt or (1280 - 200 * i if config == "arch_fp16" else 560 - 50 * i)
            for ctx in (128, 1024, 8192, 131072):
                measured = bpt * ctx if ctx <= 1024 else None
                rows.append({"run": key, "context": ctx, "config": config,
                             "policy": "fp16" if config != "arch_policy" else f"mixed{i}",
                             "bytes_per_token": bpt, "estimate_bytes": bpt * ctx, "measured_bytes": measured,
                             "measured_tail_bytes": 0 if measured else None, "peak_device_bytes": None,
                             "ratio_end_to_end": 2048 / bpt if config == "arch_policy" else None})
    return Table("memory", "Memory", list(rows[0]), rows)


def _latency(n):
    rows = []
    for i, key in enumerate(_keys(n)):
        for policy in ("fp16", "q4_0"):
            for p in (64, 256, 1024):
                ms = 0.5 + 0.1 * i + p / 2048
                rows.append({"run": key, "policy": policy, "prompt_len": p, "gen_len": 32, "batch_size": 1,
                             "prefill_median_s": p / 1e4, "prefill_p10_s": p / 1.2e4, "prefill_p90_s": p / 0.8e4,
                             "decode_ms_per_token": ms, "decode_p10_ms_per_token": 0.9 * ms,
                             "decode_p90_ms_per_token": 1.2 * ms, "prefill_tokens_per_s": 1e4,
                             "decode_tokens_per_s": 1000 / ms})
    return Table("latency", "Latency", list(rows[0]), rows)


def _sweep(n):
    rows = [{"run": key, "length": L, "ok": True, "policy": "fp16", "prefill_s": L / 1e4 * (1 + i),
             "decode_ms": 0.3 + i * 0.05 + L / 1e5, "last_chunk_loss": 1.3, "error": None}
            for i, key in enumerate(_keys(n)) for L in (256, 1024, 4096)]
    rows.append({"run": _keys(n)[0], "length": 65536, "ok": False, "policy": "fp16", "prefill_s": None,
                 "decode_ms": None, "last_chunk_loss": None, "error": "OutOfMemoryError"})
    return Table("context_sweep", "Sweep", list(rows[0]), rows)


def _retrieval(n):
    rows = [{"run": key, "kind": kind, "length": length, "depth": d, "policy": "native", "trials": 10,
             "accuracy": max(0.0, 1.0 - 0.2 * i - d * (length > 512)), "accuracy_lo": 0.0, "accuracy_hi": 1.0}
            for i, key in enumerate(_keys(n)) for kind in ("passkey", "multikey") for length in (512, 1024)
            for d in (0.0, 0.5, 1.0)]
    return Table("retrieval", "Retrieval", list(rows[0]), rows)


def _figures(n):
    order = _keys(n)
    return {
        "loss_curves": plots.draw_loss_curves(_runs(n)),
        "latency_vs_context": plots.draw_latency_vs_context(_sweep(n), _latency(n), order),
        "memory_vs_context": plots.draw_memory_vs_context(_memory(n), order),
        "pareto": plots.draw_pareto(_perplexity(n), order),
        "pareto_no_windows": plots.draw_pareto(_perplexity(n, windows=False), order),
        "retrieval": plots.draw_retrieval(_retrieval(n), order),
    }


def _legend_run_colors(fig, order):
    """run -> (colour, marker) from the figure legends' run entries."""
    from matplotlib.colors import to_hex

    out = {}
    for legend in fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]:
        for handle, text in zip(legend.legend_handles, legend.get_texts()):
            if text.get_text() in order:
                out[text.get_text()] = (to_hex(handle.get_color()), handle.get_marker())
    return out


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda n: f"{n}runs")
def rendered(request):
    import matplotlib.pyplot as plt

    figs = _figures(request.param)
    for fig in figs.values():
        fig.canvas.draw()
    yield request.param, figs
    for fig in figs.values():
        plt.close(fig)


def test_every_axis_is_labelled_with_a_unit(rendered):
    _, figs = rendered
    for name, fig in figs.items():
        assert fig is not None, name
        for ax in fig.axes:
            for label in (ax.get_xlabel(), ax.get_ylabel()):
                assert label and "(" in label and ")" in label, (name, label)
            for axis in (ax.xaxis, ax.yaxis):  # numbers on every axis (a narrow log range too)
                lo, hi = sorted(axis.get_view_interval())
                shown = [tick.label1.get_text() for tick in axis.get_major_ticks() + axis.get_minor_ticks()
                         if lo <= tick.get_loc() <= hi and tick.label1.get_visible() and tick.label1.get_text()]
                assert shown, (name, axis.axis_name)


def test_legends_sit_outside_the_data_area(rendered):
    _, figs = rendered
    for name, fig in figs.items():
        renderer = fig.canvas.get_renderer()
        legends = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
        assert legends, name
        for legend in legends:
            box = legend.get_window_extent(renderer)
            for ax in fig.axes:
                assert not box.overlaps(ax.get_window_extent(renderer)), name
            assert box.x1 <= fig.bbox.x1 + 1 and box.y0 >= fig.bbox.y0 - 1, name  # inside the figure


def test_no_two_text_labels_overlap(rendered):
    _, figs = rendered
    for name, fig in figs.items():
        renderer = fig.canvas.get_renderer()
        texts = [t for ax in fig.axes for t in ax.texts] + list(fig.texts)
        boxes = [t.get_window_extent(renderer) for t in texts if t.get_visible() and t.get_text()]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert not a.overlaps(b), name
        for ax in fig.axes:  # labels stay inside their axes
            inner = ax.get_window_extent(renderer)
            for t in ax.texts:
                box = t.get_window_extent(renderer)
                assert inner.x0 - 1 <= box.x0 and box.x1 <= inner.x1 + 1, name


def test_pareto_labels_are_mostly_placed(rendered):
    n, figs = rendered
    texts = [t for ax in figs["pareto"].axes for t in ax.texts]
    left_out = [t for t in figs["pareto"].texts if "left out" in t.get_text()]
    assert len(texts) >= len(POLICIES) * n * 0.75, len(texts)
    assert bool(left_out) == (len(texts) < len(POLICIES) * n)


def test_every_run_has_one_distinct_colour_and_keeps_it_across_figures(rendered):
    n, figs = rendered
    order = _keys(n)
    seen = None
    for name, fig in figs.items():
        styles = _legend_run_colors(fig, order)
        assert set(styles) == set(order), name
        assert len({c for c, _ in styles.values()}) == n and len({m for _, m in styles.values()}) == n, name
        assert seen is None or styles == seen, name
        seen = styles


def test_intervals_are_drawn_only_where_recorded(rendered):
    from matplotlib.collections import LineCollection, PolyCollection

    n, figs = rendered
    bars = lambda fig: [c for ax in fig.axes for c in ax.collections if isinstance(c, LineCollection)]  # noqa: E731
    assert len(bars(figs["pareto"])) == len(POLICIES) * n  # error bars, one per point
    assert not bars(figs["pareto_no_windows"])
    legend_text = " ".join(t.get_text() for t in figs["pareto_no_windows"].legends[0].get_texts())
    assert "not recorded" in legend_text
    bands = [c for ax in figs["latency_vs_context"].axes for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2 * 2 * n  # p10-p90: decode and prefill panels, per run and policy


def test_a_shared_reference_is_drawn_once():
    fig = plots.draw_memory_vs_context(_memory(4), _keys(4))
    ax = fig.axes[0]
    grey = [line for line in ax.get_lines() if line.get_color() == plots.REFERENCE_COLOR]
    assert len(grey) == 1  # standard_fp16 is the same for every run
    assert len(ax.get_lines()) == 1 + 2 * 4
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert sum("standard_fp16" in label for label in labels) == 1
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_save_writes_pngs(tmp_path):
    assert plots.pareto(_perplexity(2), tmp_path / "p.png", _keys(2)).read_bytes()[:4] == b"\x89PNG"
    assert plots.pareto(None, tmp_path / "none.png") is None


def test_bootstrap_interval_is_deterministic_and_brackets_the_mean():
    values = [1.0, 1.2, 0.9, 1.1, 1.3, 0.8]
    lo, hi = bootstrap_interval(values)
    assert lo < sum(values) / len(values) < hi and (lo, hi) == bootstrap_interval(values)
    assert bootstrap_interval([1.0]) is None
    assert ppl_interval({"ppl": 3.0}) is None
    lo, hi = ppl_interval({"window_nll": values})
    assert math.exp(0.8) < lo < hi < math.exp(1.3)


def test_tables_have_human_headers_consistent_numbers_and_split_memory():
    summary = Table("summary", "Summary", ["run", "kv_bytes_per_token_fp16", "train_tokens_per_s"],
                    [{"run": "a", "kv_bytes_per_token_fp16": 1280, "train_tokens_per_s": 17524.7},
                     {"run": "b", "kv_bytes_per_token_fp16": 640, "train_tokens_per_s": 6157.2}])
    md = summary.to_markdown(summary.columns)
    assert "KV bytes/token (fp16)" in md and "kv_bytes_per_token_fp16" not in md
    assert "17,525" in md and "6,157" in md and "e+" not in md
    tex = summary.to_latex(summary.columns)
    assert "kv\\_bytes" not in tex and r"\toprule" in tex

    (ppl,) = display_tables("perplexity", _perplexity(2))
    md = ppl.to_markdown(ppl.columns)
    assert "ΔNLL vs full forward (mnats/token)" in md and "+2.00" in md and "perplexity 95% interval" in md
    assert r"$\Delta$NLL" in ppl.to_latex(ppl.columns)
    assert fmt(1.4094e-05, "delta_nll") == "+0.01" and fmt(3.613877, "ppl") == "3.614"
    assert fmt(0.000123, "sig3") == "0.000123" and fmt(11290.0, "sig4") == "11,290"

    memory = display_tables("memory", _memory(4))
    assert [t.name for t in memory] == ["memory", "memory_measured"]
    estimates, measured = memory
    assert len(estimates.rows) == 4 * len(CONFIGS) and "131,072 tokens (MiB)" in estimates.to_markdown(estimates.columns)
    assert "peak_device_bytes" not in measured.columns  # empty in every row: left out
    assert all(len(t.columns) <= 9 for t in memory)


def test_captions_say_what_and_under_which_settings():
    from attnlab.bench.context import BenchRecord

    meta = {"device_name": "cpu", "dtype": "float32", "threads": 2, "config": {"contexts": [128, 1024]}}
    rec = lambda windows: BenchRecord("perplexity", "perplexity", "g/a",  # noqa: E731
                                      [{"policy": "fp16", "ppl": 3.0, "windows": windows, "seq_len": 128}], meta)
    caption = benchmark_caption("perplexity", "perplexity", {"g/a": rec(8), "g/b": rec(8)})
    assert "8 windows of 128 tokens" in caption and "cpu" in caption and "not recorded" in caption
    assert "perplexity (perplexity)" not in caption
    mixed = benchmark_caption("perplexity", "perplexity", {"g/a": rec(8), "g/b": rec(2)})
    assert "differs by run" in mixed
