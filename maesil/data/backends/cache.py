"""The prepared-cache back-end: volumes preprocessed once (``python -m maesil prepare`` or
``prepare_data``), superpatches read out of memory-mapped ``.npy`` or chunked blosc2 files in DataLoader
workers.

Much faster than the TorchIO queue, and memory does not grow with the dataset. Patch locations come
from the task's :class:`~maesil.data.sampling.SamplingPolicy`, seeded per item by ``(seed, epoch,
index)``, so a resumed epoch continues at the exact superpatch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torchio as tio
from torch.utils.data import DataLoader

from maesil.data.backends.base import Backend, LoaderSettings
from maesil.data.cache import (
    INDEX_NAME,
    CachedPatchDataset,
    CacheIndex,
    cache_problems,
    load_cached_subject,
    prepare_cache,
)
from maesil.data.checks import raise_on_errors
from maesil.data.preprocess import PadToMinShape, padding_value
from maesil.data.sampling import ResumableSampler, is_distributed
from maesil.data.records import DataError, SubjectRecord

__all__ = ["CacheBackend"]

log = logging.getLogger(__name__)


class CacheBackend(Backend):
    """Trains from the prepared cache at ``root`` (see the module docstring).

    Args:
        settings: the DataModule's settings.
        root: the cache folder.
        source_dir: the data the cache is prepared from (``prepare`` writes it; only its subjects are
            read); ``None`` when ``data_dir`` is the cache itself (read as it is).
    """

    def __init__(self, settings: LoaderSettings, root: Path, source_dir: Path | None) -> None:
        super().__init__(settings)
        self.root = root
        self.source_dir = source_dir
        self.index: CacheIndex | None = None
        self.dataset: CachedPatchDataset | None = None

    def prepare(self) -> None:
        """Prepares ``source_dir`` into the cache (unchanged subjects are skipped) and refuses what the
        training run would refuse; nothing when ``data_dir`` is the cache."""
        if self.source_dir is None:
            return
        settings = self.settings
        records = self.discover(self.source_dir)
        # Headers only: preparing reads every voxel anyway (NaN/Inf fail there), and the voxel checks of
        # unchanged subjects are answered from the index instead of re-reading them at every run.
        self.check_sources(records, read_voxels=False, warn_small=False)
        report = prepare_cache(records, self.root, settings.preprocess, workers=max(1, settings.num_workers),
                               format=settings.cache_format)  # type: ignore[arg-type]
        if report.failed:
            raise DataError([f"{sid}: {message}" for sid, message in sorted(report.failed.items())],
                            header=f"{len(report.failed)} subject(s) could not be prepared into {self.root}")
        index = CacheIndex.load(self.root)
        errors = [p for p in cache_problems([index.entries[r.subject_id] for r in records], classes=settings.classes,
                                            needs_labels=settings.task.requires_labels) if p.severity == "error"]
        raise_on_errors(errors, what=f"cache {self.root}")
        log.info("Cache %s: %d subject(s) prepared, %d unchanged", self.root, len(report.prepared),
                 len(report.skipped))

    def subjects(self) -> list[SubjectRecord]:
        """The cached subjects (of ``source_dir`` when given), once the cache's settings are checked against
        this run's and its index answered the input checks."""
        if not (self.root / INDEX_NAME).exists():
            raise DataError(f"{self.root}: no prepared cache here (no {INDEX_NAME}); run `python -m maesil"
                            f" prepare DATA --out {self.root}` or let the DataModule prepare it (prepare_data)")
        settings = self.settings
        index = CacheIndex.load(self.root)
        index.require_settings(settings.preprocess)
        if self.source_dir is not None:
            wanted = {r.subject_id for r in self.discover(self.source_dir)}
            missing = sorted(wanted - set(index.entries))
            if missing:
                raise DataError([f"{self.root}: subject {sid!r} of {self.source_dir} is not prepared"
                                 for sid in missing[:20]], header="The cache is incomplete; call prepare_data()")
            entries = {sid: index.entries[sid] for sid in sorted(wanted)}
        else:
            entries = dict(sorted(index.entries.items()))
        problems = cache_problems(entries.values(), settings.superpatch_size, settings.classes,
                                  needs_labels=settings.task.requires_labels)
        raise_on_errors(problems, what=f"cache {self.root}")
        self.index = index
        return [SubjectRecord(sid, e.image_path, e.label_path, split=e.split) for sid, e in entries.items()]

    def _index(self) -> CacheIndex:
        if self.index is None:
            raise RuntimeError("list the cached subjects (subjects()) first")
        return self.index

    def train_loader(self, records: Sequence[SubjectRecord], epoch: int, skip: int = 0) -> DataLoader:
        """A plain DataLoader with ``num_workers`` workers over random superpatch reads."""
        settings = self.settings
        self.dataset = dataset = CachedPatchDataset(
            self._index(), [r.subject_id for r in records], settings.superpatch_size, settings.samples_per_volume,
            with_label=settings.task.requires_labels, seed=settings.seed, policy=settings.task.sampling_policy(),
        )
        # The epoch seeds the superpatch locations: it must reach the dataset before the workers start.
        shards = {} if is_distributed() else {"num_replicas": 1, "rank": 0}
        # Whole subjects per rank: each subject is read by one rank (of all nodes) per epoch.
        sampler = ResumableSampler(dataset, shuffle=True, seed=settings.seed, epoch_listeners=[dataset.set_epoch],
                                   group_size=settings.samples_per_volume, **shards)
        sampler.set_epoch(epoch)
        sampler.skip_once(skip)
        return DataLoader(
            dataset,
            batch_size=settings.batch_size,
            sampler=sampler,
            num_workers=settings.num_workers,
            collate_fn=settings.task.collate,
            pin_memory=torch.cuda.is_available(),
            drop_last=False,
        )

    def whole_volumes(self, records: Sequence[SubjectRecord]) -> list[tio.Subject]:
        pad = PadToMinShape(self.settings.superpatch_size, padding_value(self.settings.preprocess.modality))
        with_label = self.settings.task.requires_labels
        return [pad(load_cached_subject(self._index(), r.subject_id, with_label=with_label)) for r in records]

    def predict_records(self) -> list[SubjectRecord]:
        """The images of ``source_dir``, or, when ``data_dir`` is the cache, the original images its
        subjects were prepared from (they must still exist: predictions are mapped back onto them)."""
        if self.source_dir is not None:
            return self.discover_for_prediction(self.source_dir)
        index = CacheIndex.load(self.root)
        records = [SubjectRecord(sid, Path(e.source.image), None, series_uid=e.source.series_uid)
                   for sid, e in sorted(index.entries.items())]
        missing = [r for r in records if not r.image.exists()]
        if missing:
            raise DataError([f"{r.image}: original image of cached subject {r.subject_id!r} not found"
                             for r in missing], header=f"Cannot predict the cache {self.root}")
        return records

    def source_record(self, record: SubjectRecord) -> SubjectRecord:
        source = self._index()[record.subject_id].source
        return SubjectRecord(record.subject_id, Path(source.image), series_uid=source.series_uid)

    def set_epoch(self, epoch: int) -> None:
        if self.dataset is not None:
            self.dataset.set_epoch(int(epoch))
