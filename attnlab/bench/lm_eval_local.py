"""Local multiple-choice JSONL files as lm-eval tasks, without writing task YAMLs by hand.

A file of ``{"query": str, "choices": [str], "gold": int}`` records (the format of the shared eval
sets: ARC, PIQA, COPA, OpenBookQA) becomes an lm-eval ``multiple_choice`` task named by the user:
``write_local_tasks`` writes, into a folder lm-eval is then pointed at (``include_path``), one task
YAML per file plus a two-line loader module that its ``custom_dataset: !function`` names. Each
choice continues the query after lm-eval's default ``" "`` delimiter; metrics ``acc`` and
``acc_norm``.
"""

from __future__ import annotations

import json
from pathlib import Path

LOADER_MODULE = "attnlab_local_loader"
_LOADER = "from attnlab.bench.lm_eval_local import load_jsonl  # noqa: F401\n"


def load_jsonl(data_file: str, **_metadata):
    """lm-eval ``custom_dataset``: the records of ``data_file`` as a ``test`` split (lm-eval passes
    the task's metadata as further keyword arguments)."""
    import datasets

    with open(data_file, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def task_yaml(name: str, path: str | Path) -> str:
    """The lm-eval task definition of one local JSONL file."""
    return "\n".join([
        f"task: {json.dumps(name)}",
        f"custom_dataset: !function {LOADER_MODULE}.load_jsonl",
        "dataset_kwargs:",
        f"  data_file: {json.dumps(str(Path(path).resolve()))}",
        "output_type: multiple_choice",
        "test_split: test",
        "doc_to_text: query",
        "doc_to_choice: choices",
        "doc_to_target: gold",
        "metric_list:",
        "  - {metric: acc, aggregation: mean, higher_is_better: true}",
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}",
        "metadata:",
        "  version: 1.0",
        ""])


def write_local_tasks(tasks: dict[str, str], folder: str | Path) -> Path:
    """Write the YAMLs of ``tasks`` (name -> JSONL path) and the loader into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{LOADER_MODULE}.py").write_text(_LOADER, encoding="utf-8")
    for name, path in tasks.items():
        (folder / f"{name}.yaml").write_text(task_yaml(name, path), encoding="utf-8")
    return folder
