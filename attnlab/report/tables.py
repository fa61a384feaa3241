"""Tables from run data: one source of rows, rendered to CSV (raw values, raw column names),
Markdown and LaTeX (booktabs: human headers with units, per-column number formats, captions
that say what was measured and how). Every number in a rendered table is a value of a record,
formatted (a few display columns are values combined, e.g. ``p10-p90``, or converted, e.g.
bytes to MiB). See docs/metrics.md for what each metric means."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field

from attnlab.report.collect import RunData

#: columns shown in Markdown/LaTeX per benchmark type (CSV keeps every column)
DISPLAY_COLUMNS = {
    "perplexity": ["run", "policy", "bytes_per_token", "allocated_per_token", "nll", "ppl", "ppl_interval",
                   "delta_nll"],
    "latency": ["run", "policy", "prompt_len", "gen_len", "batch_size", "prefill_median_s", "prefill_tokens_per_s",
                "decode_ms_per_token", "decode_p10_p90_ms_per_token", "decode_tokens_per_s"],
    "memory": ["run", "context", "config", "policy", "bytes_per_token", "estimate_bytes", "measured_bytes",
               "measured_tail_bytes", "peak_device_bytes", "ratio_end_to_end"],
    "context_sweep": ["run", "length", "ok", "prefill_s", "last_chunk_loss", "decode_ms", "error"],
    "downstream": ["run", "task", "n", "acc", "acc_norm", "perplexity", "ppl_per_token"],
    "quality": ["run", "reference", "policy", "top1_agreement", "topk_overlap", "kl_nats_per_token",
                "greedy_agreement"],
    "retrieval": ["run", "kind", "num_keys", "policy", "length", "depth", "trials", "accuracy", "accuracy_interval",
                  "answer_loglik"],
    "wikitext": ["run", "articles", "words", "tokens", "word_perplexity", "word_perplexity_interval",
                 "byte_perplexity", "bits_per_byte", "token_perplexity"],
    "arms": ["arm", "attention", "seeds", "params", "val_loss", "val_loss_interval", "ppl", "ppl_interval",
             "word_perplexity", "word_perplexity_interval", "kv_bytes_per_token_2k", "kv_bytes_per_token_32k",
             "kv_bytes_per_token_128k"],
}

#: column -> (human header with unit, number format). Formats: "text", "int" (rounded, thousands
#: separators), "sigN" (N significant digits, never an exponent), "fN" (N decimals), "milli"
#: (x 1000, signed, 2 decimals), "mib" (bytes shown in MiB, 3 significant digits).
COLUMNS: dict[str, tuple[str, str]] = {
    "run": ("run", "text"),
    "policy": ("KV-cache policy", "text"),
    "config": ("config", "text"),
    "attention": ("attention", "text"),
    "params": ("parameters", "int"),
    "steps": ("steps", "int"),
    "val_loss": ("held-out loss, training eval (nats/token)", "sig4"),
    "val_ppl": ("held-out ppl, training eval", "sig4"),
    "kv_bytes_per_token_fp16": ("KV bytes/token (fp16)", "int"),
    "train_tokens_per_s": ("training throughput (tokens/s)", "int"),
    "bytes_per_token": ("KV bytes/token, analytic", "int"),
    "allocated_per_token": ("KV bytes/token, allocated", "int"),
    "slack_bytes": ("slack (bytes)", "int"),
    "tail_bytes": ("tail ring (bytes)", "int"),
    "nll": ("NLL, cached decode (nats/token)", "sig4"),
    "forward_nll": ("NLL, full forward (nats/token)", "sig4"),
    "ppl": ("perplexity", "sig4"),
    "perplexity": ("perplexity (per item, as lm-eval)", "sig4"),
    "ppl_per_token": ("perplexity per token", "sig4"),
    "ppl_interval": ("perplexity 95% interval", "text"),
    "delta_nll": ("ΔNLL vs full forward (mnats/token)", "milli"),
    "windows": ("windows", "int"),
    "seq_len": ("window (tokens)", "int"),
    "prompt_len": ("prompt (tokens)", "int"),
    "gen_len": ("generated (tokens)", "int"),
    "batch_size": ("batch (sequences)", "int"),
    "prefill_median_s": ("prefill, median (s)", "sig3"),
    "prefill_tokens_per_s": ("prefill (tokens/s)", "int"),
    "decode_ms_per_token": ("decode, median (ms/token)", "sig3"),
    "decode_p10_p90_ms_per_token": ("decode p10-p90 (ms/token)", "text"),
    "decode_tokens_per_s": ("decode (tokens/s)", "int"),
    "context": ("context (tokens)", "int"),
    "estimate_bytes": ("KV estimate (bytes)", "int"),
    "measured_bytes": ("KV allocated (bytes)", "int"),
    "measured_tail_bytes": ("tail ring allocated (bytes)", "int"),
    "allocated_bytes": ("KV allocated incl. tail (bytes)", "int"),
    "peak_device_bytes": ("peak device memory (bytes)", "int"),
    "ratio_architecture": ("saving: architecture (x)", "f2"),
    "ratio_quantization": ("saving: quantization (x)", "f2"),
    "ratio_end_to_end": ("saving vs standard fp16 (x)", "f2"),
    "length": ("context (tokens)", "int"),
    "ok": ("ok", "text"),
    "prefill_s": ("prefill (s)", "sig3"),
    "last_chunk_loss": ("last-chunk NLL (nats/token)", "sig4"),
    "last_chunk_ppl": ("last-chunk perplexity", "sig4"),
    "decode_ms": ("decode, median (ms/token)", "sig3"),
    "error": ("error", "text"),
    "task": ("task", "text"),
    "n": ("examples", "int"),
    "acc": ("accuracy (fraction)", "f3"),
    "acc_norm": ("accuracy, length-normalized (fraction)", "f3"),
    "reference": ("reference run", "text"),
    "top1_agreement": ("top-1 agreement (fraction)", "f3"),
    "topk_overlap": ("top-k overlap (fraction)", "f3"),
    "kl_nats_per_token": ("KL (nats/token)", "sig3"),
    "greedy_agreement": ("greedy agreement (fraction)", "f3"),
    "step": ("step", "int"),
    "split": ("split", "text"),
    "loss": ("loss (nats/token)", "sig4"),
    "kind": ("task", "text"),
    "num_keys": ("keys in the haystack", "int"),
    "depth": ("needle depth (fraction)", "f2"),
    "trials": ("trials", "int"),
    "accuracy": ("accuracy (fraction)", "f3"),
    "accuracy_interval": ("accuracy 95% interval (bootstrap over trials)", "text"),
    "answer_loglik": ("answer log-likelihood (nats/token)", "sig3"),
    "articles": ("articles", "int"),
    "words": ("words", "int"),
    "tokens": ("tokens", "int"),
    "word_perplexity": ("word perplexity", "sig4"),
    "word_perplexity_interval": ("word perplexity 95% interval", "text"),
    "byte_perplexity": ("byte perplexity", "sig4"),
    "bits_per_byte": ("bits/byte", "sig4"),
    "token_perplexity": ("token perplexity", "sig4"),
    "arm": ("arm", "text"),
    "seeds": ("seeds", "int"),
    "val_loss_interval": ("held-out loss 95% interval (t, over seeds)", "text"),
    "kv_bytes_per_token_2k": ("KV bytes/token at 2k (fp16)", "int"),
    "kv_bytes_per_token_32k": ("KV bytes/token at 32k (fp16)", "int"),
    "kv_bytes_per_token_128k": ("KV bytes/token at 128k (fp16)", "int"),
}

#: short headings per benchmark type (Markdown section titles)
HEADINGS = {
    "perplexity": "Perplexity by KV-cache policy", "latency": "Latency", "memory": "KV-cache memory",
    "context_sweep": "Context sweep", "downstream": "Downstream tasks", "quality": "Agreement with a reference",
    "retrieval": "Long-context retrieval (passkey / multi-key needle)",
    "wikitext": "WikiText word perplexity (lm-eval's wikitext task)",
}


@dataclass
class Table:
    name: str
    title: str
    columns: list[str]
    rows: list[dict]
    caption: str = ""                                     # what and under which settings ("" -> title)
    headers: dict[str, str] = field(default_factory=dict)  # column -> header, over COLUMNS
    formats: dict[str, str] = field(default_factory=dict)  # column -> format, over COLUMNS

    def display_columns(self, kind: str | None = None) -> list[str]:
        wanted = DISPLAY_COLUMNS.get(kind or self.name)
        cols = [c for c in wanted if c in self.columns] if wanted else self.columns
        return cols or self.columns

    def header(self, column: str) -> str:
        return self.headers.get(column) or COLUMNS.get(column, (column, ""))[0]

    def cell(self, row: dict, column: str) -> str:
        return fmt(row.get(column), self.formats.get(column) or column)

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=self.columns, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({c: row.get(c) for c in self.columns})
        return out.getvalue()

    def to_markdown(self, columns: list[str]) -> str:
        numeric = [self._numeric(c) for c in columns]
        lines = ["| " + " | ".join(self.header(c).replace("|", "\\|") for c in columns) + " |",
                 "|" + "".join("---:|" if n else "---|" for n in numeric)]
        lines += ["| " + " | ".join(self.cell(row, c).replace("|", "\\|") for c in columns) + " |" for row in self.rows]
        return "\n".join(lines)

    def to_latex(self, columns: list[str]) -> str:
        align = "".join("r" if self._numeric(c) else "l" for c in columns)
        body = [" & ".join(latex_escape(self.cell(row, c)) for c in columns) + r" \\" for row in self.rows]
        return "\n".join([
            r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_escape(self.caption or self.title)}}}",
            rf"\label{{tab:{self.name}}}", rf"\begin{{tabular}}{{{align}}}", r"\toprule",
            " & ".join(latex_escape(self.header(c)) for c in columns) + r" \\", r"\midrule", *body,
            r"\bottomrule", r"\end{tabular}", r"\end{table}", ""])

    def _numeric(self, column: str) -> bool:
        return any(_is_number(r.get(column)) for r in self.rows) and \
            all(r.get(column) is None or _is_number(r.get(column)) for r in self.rows)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _sig(value: float, digits: int) -> str:
    """``digits`` significant digits in fixed notation (no exponent), thousands separators."""
    if value == 0:
        return "0"
    decimals = digits - 1 - math.floor(math.log10(abs(value)))
    if decimals <= 0:
        return f"{round(value):,}"
    return f"{value:,.{decimals}f}"


def fmt(value, column: str | None = None) -> str:
    """A cell: ``column`` (a column name of ``COLUMNS`` or a format name) picks the format; without
    one, ints get thousands separators and floats four significant digits."""
    spec = COLUMNS[column][1] if column in COLUMNS else (column or "")
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if not _is_number(value) or spec == "text":
        return str(value)
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    if spec == "int":
        return f"{round(value):,}"
    if spec.startswith("sig"):
        return _sig(float(value), int(spec[3:]))
    if spec.startswith("f") and spec[1:].isdigit():
        return f"{value:,.{int(spec[1:])}f}"
    if spec == "milli":
        return f"{1000.0 * value:+.2f}"
    if spec == "mib":
        return _sig(value / 2**20, 3)
    # no format: the general rule
    if isinstance(value, int):
        return f"{value:,}"
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.3e}"
    return f"{round(value):,}" if abs(value) >= 1000 else f"{value:.4g}"


_LATEX_SPECIAL = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                  "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}",
                  "Δ": r"$\Delta$", "×": r"$\times$", "–": "--"}


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
    evals = sorted({_eval_setting(run) for run in runs})
    caption = ("Runs: size, held-out loss and perplexity from the training loop's last evaluation "
               f"({'; '.join(evals)}), analytic KV-cache bytes per token with an fp16 cache (all layers, "
               "one sequence) and mean training throughput. The training eval's perplexity is not the "
               "perplexity benchmark's (other windows, full forward): see docs/metrics.md.")
    return Table("summary", "Summary of runs", cols, rows, caption=caption)


#: Student t quantiles t_{0.975, n-1} for 95% intervals over n seeds (n = 2..30)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
         29: 2.045}


def seed_interval(values: list[float]) -> tuple[float, float, float] | None:
    """(mean, low, high): the Student t 95% interval of the mean over seeds; None when no value,
    (mean, None, None) for one value or more than 30."""
    data = [v for v in values if v is not None]
    if not data:
        return None
    mean = sum(data) / len(data)
    if len(data) < 2 or len(data) - 1 not in T_975:
        return mean, None, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in data) / (len(data) - 1))
    half = T_975[len(data) - 1] * sd / math.sqrt(len(data))
    return mean, mean - half, mean + half


KV_CONTEXTS = {"2k": 2048, "32k": 32768, "128k": 131072}


def _first_row(run: RunData, kind: str) -> dict | None:
    records = [r for name, r in sorted(run.benchmarks.items()) if r.type == kind]
    return records[0].rows[0] if records and records[0].rows else None


def arms_table(runs: list[RunData]) -> Table | None:
    """One row per arm (the seeds of one seeded run, ``seeds:`` in a manifest): means over seeds
    with Student t 95% intervals of the training eval's held-out loss, the perplexity benchmark's
    first row (policy) and the wikitext benchmark's word perplexity; parameters and analytic fp16
    KV bytes per token (one sequence, all layers, window/state included) at 2k/32k/128k. None when
    no run is one seed of an arm."""
    from attnlab.config.base import validate_section
    from attnlab.config.model import ModelConfig
    from attnlab.model.stats import count_parameters, kv_bytes_per_token_layer, kv_fixed_bytes_layer
    from attnlab.summary import describe_stack

    arms: dict[str, list[RunData]] = {}
    for run in runs:
        arm = (run.config.get("run") or {}).get("arm")
        if arm is not None:
            arms.setdefault(f"{run.key.split('/')[0]}/{arm}", []).append(run)
    if not arms:
        return None
    rows = []
    for arm, members in arms.items():
        model_cfg = validate_section(ModelConfig, members[0].config["model"], f"{members[0].key}.model")
        dims = model_cfg.layer_dims()
        row = {"arm": arm, "attention": describe_stack(model_cfg), "seeds": len(members),
               "params": count_parameters(model_cfg)[0]}
        for label, context in KV_CONTEXTS.items():
            total = sum(kv_bytes_per_token_layer(d, "fp16") * context + kv_fixed_bytes_layer(d, "fp16") for d in dims)
            row[f"kv_bytes_per_token_{label}"] = total / context
        metrics = {"val_loss": [(m.done or {}).get("val_loss") for m in members],
                   "ppl": [(_first_row(m, "perplexity") or {}).get("ppl") for m in members],
                   "word_perplexity": [(_first_row(m, "wikitext") or {}).get("word_perplexity") for m in members]}
        for name, values in metrics.items():
            est = seed_interval(values)
            if est is not None:
                row[name], row[f"{name}_low"], row[f"{name}_high"] = est
        rows.append(row)
    cols = ["arm", "attention", "seeds", "params", "val_loss", "val_loss_low", "val_loss_high", "ppl", "ppl_low",
            "ppl_high", "word_perplexity", "word_perplexity_low", "word_perplexity_high", "kv_bytes_per_token_2k",
            "kv_bytes_per_token_32k", "kv_bytes_per_token_128k"]
    caption = ("Arms (runs expanded over seeds): mean over seeds with Student t 95% intervals of the mean, of the "
               "training eval's held-out loss, the perplexity benchmark's perplexity (its first policy) and the "
               "wikitext benchmark's word perplexity; parameters; analytic KV-cache bytes per token with an fp16 "
               "cache for one sequence of 2k/32k/128k tokens (all layers; a window, boundary rows and recurrent "
               "states included), which a context beyond the model's block size would only reach by extrapolation.")
    return Table("arms", "Arms over seeds", cols, rows, caption=caption)


def _eval_setting(run: RunData) -> str:
    train, model = run.config.get("train") or {}, run.config.get("model") or {}
    batches, batch = train.get("eval_batches"), train.get("batch_size")
    seq = train.get("seq_len") or model.get("block_size")
    if batches is None or batch is None:
        return "eval settings not recorded"
    return f"up to {batches} batches x {batch} windows of {seq} tokens"


# -------------------------------------------------------------------------------- intervals

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
BOOTSTRAP_LEVEL = 0.95


def bootstrap_interval(values: list[float], *, level: float = BOOTSTRAP_LEVEL, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of ``values`` (per-window mean NLLs), with a
    fixed seed (the same record gives the same interval). None for fewer than two values."""
    import numpy as np

    data = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if data.size < 2:
        return None
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    alpha = (1.0 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def ppl_interval(row: dict) -> tuple[float, float] | None:
    """A perplexity interval for a perplexity-benchmark row: from recorded bounds
    (``ppl_low``/``ppl_high``) or a bootstrap over recorded per-window NLLs (``window_nll``)."""
    if row.get("ppl_low") is not None and row.get("ppl_high") is not None:
        return row["ppl_low"], row["ppl_high"]
    windows = row.get("window_nll")
    if isinstance(windows, list):
        nll = bootstrap_interval(windows)
        if nll is not None:
            return math.exp(min(nll[0], 700.0)), math.exp(min(nll[1], 700.0))
    return None



# ---------------------------------------------------------------------------- benchmark tables

def _values(records: dict, rows_key: str | None = None, meta_key: str | None = None, config_key: str | None = None) -> str:
    """One setting over every run's record: its value, or each run's when they differ."""
    per_run = {}
    for run, record in records.items():
        if rows_key is not None:
            vals = sorted({str(r.get(rows_key)) for r in record.rows if r.get(rows_key) is not None})
            value = ", ".join(vals) if vals else None
        elif meta_key is not None:
            value = record.meta.get(meta_key)
        else:
            value = (record.meta.get("config") or {}).get(config_key)
        per_run[run] = "-" if value is None else str(value)
    distinct = sorted(set(per_run.values()))
    if len(distinct) <= 1:
        return distinct[0] if distinct else "-"
    return "differs by run: " + ", ".join(f"{v} ({r})" for r, v in per_run.items())


def _environment(records: dict) -> str:
    return (f"Measured on {_values(records, meta_key='device_name')} in {_values(records, meta_key='dtype')} "
            f"with {_values(records, meta_key='threads')} CPU threads.")


def _interval_note(records: dict) -> str:
    rows = [r for record in records.values() for r in record.rows]
    with_windows = sum(ppl_interval(r) is not None for r in rows)
    if rows and with_windows == len(rows):
        return (f"Interval: {BOOTSTRAP_LEVEL:.0%} percentile bootstrap over windows "
                f"({BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}).")
    if with_windows:
        return f"Interval: bootstrap over windows where per-window NLLs are recorded ({with_windows}/{len(rows)} rows)."
    return "No interval: per-window NLLs are not recorded."


def benchmark_caption(name: str, kind: str, records: dict) -> str:
    """What a benchmark table shows and under which settings (``records``: run -> BenchRecord)."""
    env = _environment(records)
    if kind == "perplexity":
        return (f"Held-out perplexity per KV-cache policy ({name}): mean next-token NLL by cached decode "
                f"(one token prefilled, then one decode step per token) over "
                f"{_values(records, rows_key='windows')} windows of {_values(records, rows_key='seq_len')} "
                "tokens of each run's held-out split; ΔNLL = cached-decode NLL minus full-forward NLL on the "
                "same windows; bytes per token over all layers, one sequence. "
                f"{_interval_note(records)} {env}")
    if kind == "latency":
        return (f"Latency ({name}): median over {_values(records, rows_key='repeats')} timed repeats after "
                f"{_values(records, rows_key='warmup')} warm-up runs; p10-p90 over the repeats; prefill "
                "tokens/s = batch x prompt / median prefill time; decode per generated token. "
                f"{env}")
    if kind == "memory":
        return (f"KV-cache memory for one sequence ({name}): analytic estimate (bytes/token x context) for "
                "a standard multi-head fp16 cache of the same shape (standard_fp16), this model with an "
                "fp16 cache (arch_fp16) and under its cache policy (arch_policy); saving = standard_fp16 / "
                f"arch_policy. Contexts: {_values(records, config_key='contexts')}. {env}")
    if kind == "context_sweep":
        return (f"Context sweep ({name}): chunked prefill of each context length, NLL over the last chunk's "
                "predictions, then the median of greedy single-token decode steps. One measurement per "
                f"length (no interval). {env}")
    return f"{HEADINGS.get(kind, name)} ({name}, {kind} benchmark). {env}"


def benchmark_tables(runs: list[RunData]) -> dict[str, tuple[str, Table]]:
    """benchmark name -> (type, table of every run's rows with a leading ``run`` column)."""
    out: dict[str, tuple[str, Table]] = {}
    records: dict[str, dict] = {}
    for run in runs:
        for name, record in run.benchmarks.items():
            kind, table = out.setdefault(name, (record.type, Table(name, HEADINGS.get(record.type, name), ["run"], [])))
            records.setdefault(name, {})[run.key] = record
            for row in record.rows:
                for col in row:
                    if col not in table.columns:
                        table.columns.append(col)
                table.rows.append({"run": run.key, **row})
    for name, (kind, table) in out.items():
        table.caption = benchmark_caption(name, kind, records[name])
        labels = sorted({label for run in runs if (label := getattr(run, "settings_labels", {}).get(name))})
        if labels:
            table.caption += f" Settings that differ from the report's main {kind} table: {'; '.join(labels)}."
        if name != kind:  # a benchmark id or a record of other settings: name it
            table.title = f"{name} ({kind})"
    return out


def display_tables(kind: str | None, table: Table) -> list[Table]:
    """The rendered (Markdown/LaTeX) tables of one table: display columns only, columns empty in
    every row left out, a few derived columns, and wide tables split (memory: one table of
    estimates pivoted by context, one of the measured points)."""
    if kind == "memory":
        return _memory_tables(table)
    rows = [dict(r) for r in table.rows]
    if kind == "perplexity":
        for r in rows:
            interval = ppl_interval(r)
            if interval is not None:
                r["ppl_interval"] = f"{fmt(interval[0], 'sig4')}-{fmt(interval[1], 'sig4')}"
    if kind == "retrieval":
        for r in rows:
            if r.get("accuracy_lo") is not None and r.get("accuracy_hi") is not None:
                r["accuracy_interval"] = f"{fmt(r['accuracy_lo'], 'f3')}-{fmt(r['accuracy_hi'], 'f3')}"
    if kind in ("wikitext", "arms"):
        for r in rows:
            for name in ("word_perplexity", "ppl", "val_loss"):
                lo, hi = r.get(f"{name}_low"), r.get(f"{name}_high")
                if lo is not None and hi is not None:
                    r[f"{name}_interval"] = f"{fmt(lo, 'sig4')}-{fmt(hi, 'sig4')}"
    if kind == "latency":
        for r in rows:
            lo, hi = r.get("decode_p10_ms_per_token"), r.get("decode_p90_ms_per_token")
            if lo is not None and hi is not None:
                r["decode_p10_p90_ms_per_token"] = f"{fmt(lo, 'sig3')}-{fmt(hi, 'sig3')}"
    columns = table.columns + [c for c in DISPLAY_COLUMNS.get(kind or "", []) if c not in table.columns
                               and any(c in r for r in rows)]
    view = Table(table.name, table.title, columns, rows, table.caption, dict(table.headers), dict(table.formats))
    cols = [c for c in view.display_columns(kind) if any(r.get(c) is not None for r in rows)]
    return [Table(view.name, view.title, cols or view.display_columns(kind), rows, view.caption,
                  view.headers, view.formats)]


def _memory_tables(table: Table) -> list[Table]:
    contexts = sorted({r["context"] for r in table.rows if r.get("context") is not None})
    pivot: dict[tuple, dict] = {}
    for r in table.rows:
        key = (r.get("run"), r.get("config"), r.get("policy"))
        row = pivot.setdefault(key, {"run": key[0], "config": key[1], "policy": key[2],
                                     "bytes_per_token": r.get("bytes_per_token"),
                                     "ratio_end_to_end": r.get("ratio_end_to_end")})
        if r.get("context") is not None:
            row[f"ctx_{r['context']}"] = r.get("estimate_bytes")
    ctx_cols = [f"ctx_{c}" for c in contexts]
    cols = ["run", "config", "policy", "bytes_per_token", *ctx_cols, "ratio_end_to_end"]
    rows = list(pivot.values())
    cols = [c for c in cols if any(r.get(c) is not None for r in rows)]
    estimates = Table(table.name, "KV-cache memory: analytic estimate by context", cols, rows,
                      caption=table.caption + " Cells: analytic estimate in MiB (1 MiB = 1,048,576 bytes).",
                      headers={f"ctx_{c}": f"{c:,} tokens (MiB)" for c in contexts},
                      formats={f"ctx_{c}": "mib" for c in contexts})
    measured_rows = []
    for r in table.rows:
        if r.get("measured_bytes") is None:
            continue
        measured_rows.append({**r, "allocated_bytes": r["measured_bytes"] + (r.get("measured_tail_bytes") or 0)})
    out = [estimates]
    if measured_rows:
        mcols = ["run", "context", "config", "estimate_bytes", "allocated_bytes", "peak_device_bytes"]
        mcols = [c for c in mcols if any(r.get(c) is not None for r in measured_rows)]
        out.append(Table(f"{table.name}_measured", "KV-cache memory: allocated vs estimate", mcols, measured_rows,
                         caption=f"KV-cache bytes allocated by the cache (storage plus tail ring) beside the "
                                 f"analytic estimate, at the contexts measured ({table.name}); peak device "
                                 "memory only on CUDA."))
    return out
