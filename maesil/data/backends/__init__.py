"""The two ways the DataModule reads volumes, behind one interface (:mod:`~maesil.data.backends.base`):
a TorchIO queue over the source files (:mod:`~maesil.data.backends.queue`) or a prepared cache
(:mod:`~maesil.data.backends.cache`)."""

from maesil.data.backends.base import Backend, LoaderSettings
from maesil.data.backends.cache import CacheBackend
from maesil.data.backends.queue import QueueBackend

__all__ = ["Backend", "CacheBackend", "LoaderSettings", "QueueBackend"]
