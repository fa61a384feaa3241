"""A report folder from run folders: report.json (every number + provenance), one CSV per table,
LaTeX tables (booktabs), PNG plots and report.md embedding them. Re-running on the same run
folders writes identical files (nothing is re-measured; no generation timestamp)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from attnlab.errors import AttnlabError
from attnlab.fsutil import atomic_write_text, write_error
from attnlab.paths import check_name, safe_child
from attnlab.report import plots
from attnlab.report.collect import RunData, load_runs
from attnlab.report.tables import Table, arms_table, benchmark_tables, display_tables, summary_table


RESERVED_TABLES = ("summary", "curves", "arms")  # the report's own tables (csv/<name>.csv)
METRICS_DOC = "docs/metrics.md"  # in the attnlab repository: what every reported metric means


@dataclass
class ReportFiles:
    folder: Path
    tables: dict[str, Path] = field(default_factory=dict)   # name -> .tex
    csv: dict[str, Path] = field(default_factory=dict)
    plots: dict[str, Path] = field(default_factory=dict)
    markdown: Path | None = None
    json: Path | None = None


def curves_table(runs: list[RunData]) -> Table:
    rows = [{"run": r.key, "step": e["step"], "split": "train", "loss": e["loss"]} for r in runs for e in r.train]
    rows += [{"run": r.key, "step": e["step"], "split": "heldout", "loss": e["val_loss"]} for r in runs for e in r.evals]
    return Table("curves", "Training and held-out loss by step", ["run", "step", "split", "loss"], rows)


def write_report(run_dirs: list[str | Path], out_dir: str | Path, *, title: str = "attnlab report",
                 command: str = "") -> ReportFiles:
    runs = load_runs(run_dirs)  # records of differing settings keyed apart (their own tables)
    folder = Path(out_dir)
    summary = summary_table(runs)
    benches = benchmark_tables(runs)
    arms = arms_table(runs)
    all_tables: list[tuple[str | None, Table]] = [(None, summary)] + ([("arms", arms)] if arms is not None else [])
    all_tables += [(kind, t) for kind, t in benches.values()]
    for _, table in benches.values():  # benchmark names become file names: check before writing any
        check_name(table.name, "benchmark")
        if table.name in RESERVED_TABLES:
            raise AttnlabError(f"benchmark {table.name!r}: the name is taken by the report's own "
                               f"{table.name} table; give the benchmark another id")
    try:
        (folder / "tables").mkdir(parents=True, exist_ok=True)
        (folder / "csv").mkdir(exist_ok=True)
    except OSError as err:
        raise write_error(folder, err, "cannot create report folder") from None
    files = ReportFiles(folder)
    rendered = {table.name: display_tables(kind, table) for kind, table in all_tables}
    tex_names = [view.name for views in rendered.values() for view in views]
    if len(set(tex_names)) != len(tex_names):
        taken = sorted({n for n in tex_names if tex_names.count(n) > 1})
        raise AttnlabError(f"benchmark {taken[0]!r}: the name is taken by a split table of another "
                           "benchmark; give the benchmark another id")
    for kind, table in all_tables:
        files.csv[table.name] = atomic_write_text(safe_child(folder / "csv", table.name, "benchmark", ".csv"),
                                                  table.to_csv())
        for view in rendered[table.name]:
            files.tables[view.name] = atomic_write_text(
                safe_child(folder / "tables", view.name, "benchmark", ".tex"), view.to_latex(view.columns))
    files.csv["curves"] = atomic_write_text(folder / "csv" / "curves.csv", curves_table(runs).to_csv())

    by_type = {kind: table for kind, table in benches.values()}
    order = [r.key for r in runs]  # one colour + marker per run, in this order, in every figure
    drawn = {
        "loss_curves": plots.loss_curves(runs, folder / "loss_curves.png"),
        "latency_vs_context": plots.latency_vs_context(by_type.get("context_sweep"), by_type.get("latency"),
                                                       folder / "latency_vs_context.png", order),
        "memory_vs_context": plots.memory_vs_context(by_type.get("memory"), folder / "memory_vs_context.png", order),
        "pareto": plots.pareto(by_type.get("perplexity"), folder / "pareto_ppl_vs_kv_bytes.png", order),
        "retrieval": plots.retrieval(by_type.get("retrieval"), folder / "retrieval_accuracy_vs_depth.png", order),
    }
    files.plots = {k: v for k, v in drawn.items() if v is not None}

    report = {
        "title": title, "command": command,
        "runs": [{"key": r.key, "run_dir": str(r.run_dir), "config": r.config, "done": r.done, "env": r.env,
                  "benchmarks": {n: rec.to_dict() for n, rec in sorted(r.benchmarks.items())}} for r in runs],
        "tables": {t.name: t.rows for _, t in all_tables},
    }
    files.json = atomic_write_text(folder / "report.json", json.dumps(report, indent=2, default=str))
    files.markdown = atomic_write_text(folder / "report.md", _markdown(title, command, runs, all_tables, rendered, files))
    return files


PLOT_HEADINGS = {"loss_curves": "Figure: loss curves", "latency_vs_context": "Figure: latency vs context",
                 "memory_vs_context": "Figure: KV-cache memory vs context",
                 "pareto": "Figure: perplexity vs KV-cache bytes per token",
                 "retrieval": "Figure: retrieval accuracy vs needle depth and context length"}
PLOT_CAPTIONS = {
    "loss_curves": "Training loss (logged batches, solid) and held-out loss of the training loop's evaluation "
                   "(dashed, markers) by step; one colour and marker per run.",
    "latency_vs_context": "Decode time per token and prefill time against prompt / context length; median with "
                          "the p10-p90 band over repeats where the latency benchmark records them (the context "
                          "sweep records one prefill and the median of its decode steps: no band).",
    "memory_vs_context": "KV-cache bytes for one sequence against context: lines are the analytic estimate (line "
                         "style = config; a config identical for every run is drawn once in grey), hollow "
                         "markers the bytes the cache allocated where measured.",
    "pareto": "Held-out perplexity (cached decode, perplexity benchmark) against analytic KV-cache bytes per "
              "token, one point per run and policy; bars are bootstrap intervals over windows when per-window "
              "NLLs are recorded.",
    "retrieval": "Exact-match accuracy of greedy decoding (passkey / multi-key needle) against the needle's depth "
                 "in the haystack, one panel per task and context length, one colour and marker per run; bars "
                 "are bootstrap 95% intervals over trials.",
}


def _markdown(title: str, command: str, runs: list[RunData], tables, rendered, files: ReportFiles) -> str:
    lines = [f"# {title}", ""]
    if command:
        lines += [f"Generated by `{command}` from the run folders below; every number comes from their "
                  "records (`report.json`, `csv/`).", ""]
    lines += [f"What each metric means, how it is measured and how intervals are computed: `{METRICS_DOC}` "
              "in the attnlab repository. The summary's held-out loss/perplexity (training eval) and the "
              "perplexity benchmark's are measured on different windows and differ; see there.", ""]
    lines += ["## Runs", ""]
    for run in runs:
        env = run.env or {}
        devices = ", ".join(env.get("devices") or ["-"])
        lines.append(f"- `{run.key}` ({run.run_dir}): torch {env.get('torch', '-')}, trained on {devices}")
    for name, path in files.plots.items():
        lines += ["", f"## {PLOT_HEADINGS.get(name, name.replace('_', ' '))}", "", f"![{name}]({path.name})", ""]
        if name in PLOT_CAPTIONS:
            lines.append(f"*Figure: {PLOT_CAPTIONS[name]}*")
    for kind, table in tables:
        for i, view in enumerate(rendered[table.name]):
            lines += ["", f"## {view.title}" if i == 0 else f"### {view.title}", ""]
            lines.append(view.to_markdown(view.columns))
            lines += ["", f"*Table: {view.caption or view.title}*"]
        provenance = _provenance_line(runs, table.name)
        if provenance:
            lines += ["", provenance]
    return "\n".join(lines) + "\n"


def _provenance_line(runs: list[RunData], bench_name: str) -> str | None:
    metas = [r.benchmarks[bench_name].meta for r in runs if bench_name in r.benchmarks]
    if not metas:
        return None
    m = metas[0]
    versions = m.get("versions", {})
    return (f"Measured with `{m.get('command', '')}` on {m.get('device_name', m.get('device'))} "
            f"({m.get('dtype')}, torch {versions.get('torch')}, {m.get('threads')} threads).")
