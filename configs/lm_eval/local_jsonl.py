"""lm-eval ``custom_dataset`` for the task YAMLs beside this file: a JSONL file of
``{"query", "choices", "gold"}`` records (the format of ``../shared/data/eval``) as a test split.
A relative ``data_file`` is resolved against this folder, so the tasks work from any directory."""

from __future__ import annotations

import json
from pathlib import Path


def load_jsonl(data_file: str, **_metadata):
    import datasets

    path = Path(data_file)
    if not path.is_absolute():
        path = Path(__file__).resolve().parent / path
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
