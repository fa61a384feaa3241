"""Tables from run data: one source of rows, rendered to CSV (raw values), Markdown and LaTeX
(booktabs). Every number in a rendered table is a value of a record, formatted."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass

from attnlab.report.collect import RunData

#: columns shown in Markdown/LaTeX per benchmark type (CSV keeps every column)
DISPLAY_COLUMNS = {
    "perplexity": ["run", "policy", "bytes_per_token", "allocated_per_token", "nll", "ppl", "delta_nll"],
    "latency": ["run", "policy", "prompt_len", "gen_len", "prefill_tokens_per_s", "decode_ms_per_token",
                "decode_p10_ms_per_token", "decode_p90_ms_per_token"],
    "memory": ["run", "context", "config", "policy", "bytes_per_token", "estimate_bytes", "measured_bytes", "measured_tail_bytes",
               "peak_device_bytes", "ratio_end_to_end"],
    "context_sweep": ["run", "length", "ok", "prefill_s", "last_chunk_loss", "decode_ms", "error"],
    "downstream": ["run", "task", "n", "acc", "acc_norm", "ppl"],
    "quality": ["run", "reference", "policy", "top1_agreement", "topk_overlap", "kl_nats_per_token",
                "greedy_agreement"],
}


@dataclass
class Table:
    name: str
    title: str
    columns: list[str]
    rows: list[dict]

    def display_columns(self, kind: str | None = None) -> list[str]:
        wanted = DISPLAY_COLUMNS.get(kind or self.name)
        cols = [c for c in wanted if c in self.columns] if wanted else self.columns
        return cols or self.columns

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=self.columns, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({c: row.get(c) for c in self.columns})
        return out.getvalue()

    def to_markdown(self, columns: list[str]) -> str:
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in self.rows]
        return "\n".join(lines)

    def to_latex(self, columns: list[str]) -> str:
        align = "".join("l" if all(not _is_number(r.get(c)) for r in self.rows) else "r" for c in columns)
        body = [" & ".join(latex_escape(fmt(row.get(c))) for c in columns) + r" \\" for row in self.rows]
        return "\n".join([
            r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_escape(self.title)}}}",
            rf"\label{{tab:{self.name}}}", rf"\begin{{tabular}}{{{align}}}", r"\toprule",
            " & ".join(latex_escape(c) for c in columns) + r" \\", r"\midrule", *body,
            r"\bottomrule", r"\end{tabular}", r"\end{table}", ""])


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:,.4g}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


_LATEX_SPECIAL = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                  "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def summary_table(runs: list[RunData]) -> Table:
    """One row per run: architecture, size, held-out quality, KV bytes, throughput."""
    from attnlab.config.base import validate_section
    from attnlab.config.model import ModelConfig
    from attnlab.model.stats import model_stats
    from attnlab.summary import describe_stack

    rows = []
    for run in runs:
        model_cfg = validate_section(ModelConfig, run.config["model"], f"{run.key}.model")
        stats = model_stats(model_cfg, formats=("fp16",))
        done = run.done or {}
        val = done.get("val_loss")
        rows.append({
            "run": run.key, "attention": describe_stack(model_cfg), "params": stats.params,
            "steps": done.get("step"), "val_loss": val, "val_ppl": math.exp(val) if val is not None else None,
            "kv_bytes_per_token_fp16": stats.kv_total("fp16"), "train_tokens_per_s": done.get("train_tokens_per_s"),
        })
    cols = ["run", "attention", "params", "steps", "val_loss", "val_ppl", "kv_bytes_per_token_fp16", "train_tokens_per_s"]
    return Table("summary", "Runs: held-out loss, KV-cache bytes per token (fp16) and training throughput", cols, rows)


def benchmark_tables(runs: list[RunData]) -> dict[str, tuple[str, Table]]:
    """benchmark name -> (type, table of every run's rows with a leading ``run`` column)."""
    out: dict[str, tuple[str, Table]] = {}
    for run in runs:
        for name, record in run.benchmarks.items():
            kind, table = out.setdefault(name, (record.type, Table(name, f"{name} ({record.type})", ["run"], [])))
            for row in record.rows:
                for col in row:
                    if col not in table.columns:
                        table.columns.append(col)
                table.rows.append({"run": run.key, **row})
    return out
