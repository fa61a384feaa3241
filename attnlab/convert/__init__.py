"""Checkpoint interop: Hugging Face Llama folders (import/export; DBA exports as partial-rotary Phi3) and llama2.c ``.bin`` files."""

from attnlab.convert.common import half_to_interleaved, interleaved_to_half
from attnlab.convert.hf import (
    export_hf,
    export_hf_llama,
    is_llama_family,
    load_hf_llama,
    read_hf_config,
)
from attnlab.convert.llama2c import load_llama2c

__all__ = ["export_hf", "export_hf_llama", "half_to_interleaved", "interleaved_to_half", "is_llama_family",
           "load_hf_llama", "load_llama2c", "read_hf_config"]
