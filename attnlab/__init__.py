"""attnlab: research toolkit for KV-cache-efficient attention (standard/GQA/MQA, bottleneck,
Decoupled Bottleneck Attention, MLA, and attention variants registered as plug-ins)."""

from attnlab._version import __version__
import attnlab.nn.attention  # noqa: E402,F401  registers the built-in attention variants before any config is read
from attnlab.api import build_model, load  # noqa: E402

__all__ = ["__version__", "build_model", "load"]
