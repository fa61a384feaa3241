"""Fixtures for attnlab.data tests: the optional shared reference data (../shared/data)."""

from __future__ import annotations

from pathlib import Path

import pytest

from attnlab.config.data import TokenizerConfig

SHARED_DATA = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data").resolve()
GPT2_FILE = SHARED_DATA / "tokenizers" / "gpt2.tiktoken"


@pytest.fixture
def gpt2_cfg() -> TokenizerConfig:
    if not GPT2_FILE.is_file():
        pytest.skip(f"shared GPT-2 BPE file not found at {GPT2_FILE} (../shared/data is absent)")
    return TokenizerConfig(type="gpt2", path=str(GPT2_FILE))
