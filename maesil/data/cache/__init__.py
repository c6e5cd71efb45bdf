"""A prepared cache: volumes preprocessed once (:mod:`~maesil.data.cache.writer`), described by an
index (:mod:`~maesil.data.cache.index`) and read back a superpatch at a time
(:mod:`~maesil.data.cache.reader`)."""

from maesil.data.cache.index import (
    CACHE_FORMAT,
    CACHE_VERSION,
    INDEX_NAME,
    CacheEntry,
    CacheIndex,
    cache_problems,
    is_cache,
)
from maesil.data.cache.reader import CachedPatchDataset, load_cached_subject, read_window
from maesil.data.cache.writer import PrepareReport, prepare_cache

__all__ = [
    "CACHE_FORMAT", "CACHE_VERSION", "INDEX_NAME", "CacheEntry", "CacheIndex", "CachedPatchDataset", "PrepareReport",
    "cache_problems", "is_cache", "load_cached_subject", "prepare_cache", "read_window",
]
