"""attnlab: research toolkit for KV-cache-efficient attention (standard/GQA, bottleneck,
Decoupled Bottleneck Attention)."""

__version__ = "0.1.0"

from attnlab.api import build_model, load  # noqa: E402

__all__ = ["__version__", "build_model", "load"]
