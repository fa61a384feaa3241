"""The evidence of ``attnlab tune-cache`` in a run folder: ``tune/candidates.csv`` (every candidate
and how far it got), ``tune/front.csv`` (the thorough candidates with the Pareto fronts marked),
``tune/tune.json`` (settings, constraints, candidates, chosen policy), ``tune/tune_fronts.png``
(delta NLL against KV bytes/token and against decode ms/token, fronts drawn, the choice marked)
and, when a candidate met every constraint, ``tuned_policy.json`` (the choice and its evidence)."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict
from pathlib import Path

from attnlab.bench.tune_cache import Candidate, TuneResult
from attnlab.fsutil import atomic_write_text
from attnlab.report.plots import _figure, _save
from attnlab.runfolder import TUNE, RunFolder

COLUMNS = ["policy", "bytes_per_token", "stage", "screen_dnll", "dnll", "kl", "ms_per_token", "retrieval",
           "dropped"]


def _csv(rows: list[dict], columns: list[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def plot_fronts(result: TuneResult, path: Path) -> Path | None:
    thorough = result.thorough
    if not thorough:
        return None
    costs = [("bytes_per_token", "KV-cache bytes per token (all layers)")]
    if any(c.ms_per_token is not None for c in thorough):
        costs.append(("ms_per_token", "decode ms per token"))
    fig, axes = _figure(len(costs), width=5.2, height=3.8)
    for ax, (cost, label) in zip(axes, costs):
        pts = [c for c in thorough if getattr(c, cost) is not None]
        ax.scatter([getattr(c, cost) for c in pts], [c.dnll for c in pts], s=18, color="#999999",
                   label="measured candidates")
        front = result.front(cost)
        ax.plot([getattr(c, cost) for c in front], [c.dnll for c in front], "-o", color="#1f77b4", ms=4,
                label="Pareto front")
        if result.chosen is not None and getattr(result.chosen, cost) is not None:
            ax.scatter([getattr(result.chosen, cost)], [result.chosen.dnll], s=90, marker="*", color="#d62728",
                       zorder=5, label="chosen")
        if result.constraints.max_dnll is not None:
            ax.axhline(result.constraints.max_dnll, color="#d62728", lw=0.8, ls="--", label="max dNLL")
        ax.set_xlabel(label)
        ax.set_ylabel("delta NLL vs fp16 cache (nats/token)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle("tune-cache: quality vs cost of the thorough candidates", fontsize=9)
    return _save(fig, path)


def write_tune(result: TuneResult, run_dir: str | Path, command: str = "") -> dict[str, Path]:
    """Write the tune folder (and ``tuned_policy.json`` only when a policy was chosen); returns the paths."""
    folder = RunFolder(run_dir)
    out = folder.path / TUNE
    out.mkdir(parents=True, exist_ok=True)
    rows = [c.to_dict() for c in result.candidates]
    fronts = {cost: {c.policy for c in result.front(cost)} for cost in ("bytes_per_token", "ms_per_token")}
    thorough = [c.to_dict() | {"on_bytes_front": c.policy in fronts["bytes_per_token"],
                               "on_ms_front": c.policy in fronts["ms_per_token"],
                               "chosen": result.chosen is not None and c.policy == result.chosen.policy}
                for c in result.thorough]
    paths = {
        "candidates": atomic_write_text(out / "candidates.csv", _csv(rows, COLUMNS)),
        "front": atomic_write_text(out / "front.csv", _csv(thorough, COLUMNS + ["on_bytes_front", "on_ms_front",
                                                                                 "chosen"])),
    }
    record = {"command": command, "settings": result.settings, "constraints": asdict(result.constraints),
              "chosen": None if result.chosen is None else result.chosen.to_dict(),
              "closest": [{"candidate": c.to_dict(), "misses": misses} for c, misses in result.closest()]
              if result.chosen is None else [], "candidates": rows}
    paths["json"] = atomic_write_text(out / "tune.json", json.dumps(record, indent=2, default=str) + "\n")
    plot = plot_fronts(result, out / "tune_fronts.png")
    if plot is not None:
        paths["plot"] = plot
    if result.chosen is not None:
        paths["tuned_policy"] = folder.write_tuned_policy({
            "policy": result.chosen.policy, "command": command, "evidence": result.chosen.to_dict(),
            "constraints": asdict(result.constraints), "settings": result.settings,
            "tune_folder": TUNE})
    return paths  # no choice: an earlier tuned_policy.json, if any, is left as it was


def describe(c: Candidate) -> str:
    parts = [f"{c.bytes_per_token:,} B/token"]
    for name, value, fmt in (("dNLL", c.dnll, "+.4f"), ("KL", c.kl, ".4f"), ("ms/token", c.ms_per_token, ".2f"),
                             ("retrieval", c.retrieval, ".3f")):
        if value is not None:
            parts.append(f"{name} {value:{fmt}}")
    return f"{c.policy}: " + ", ".join(parts)
