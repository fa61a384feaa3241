"""KV caches of named fields with per-field storage formats."""

from attnlab.cache.kv import CacheReport, CacheStep, LayerCache, ModelCache, layer_cache
from attnlab.cache.policy import CachePolicy

__all__ = ["CachePolicy", "CacheReport", "CacheStep", "LayerCache", "ModelCache", "layer_cache"]
