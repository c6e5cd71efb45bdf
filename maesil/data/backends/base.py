"""What the DataModule asks of a back-end: the interface both ways of reading volumes implement.

A back-end turns subject records into batches. :class:`~maesil.data.backends.queue.QueueBackend`
decodes and preprocesses whole volumes in a TorchIO queue;
:class:`~maesil.data.backends.cache.CacheBackend` reads superpatches out of a prepared cache. The
:class:`~maesil.data.datamodule.VolumeDataModule` validates its settings, picks one back-end and
splits the subjects it lists; everything that differs between the two lives behind :class:`Backend`:

* :meth:`~Backend.prepare`: rank-0 preparation (writing the cache);
* :meth:`~Backend.subjects`: the subjects, every input problem reported in one ``DataError``;
* :meth:`~Backend.train_loader`: the training batches (patch locations from the task's
  :class:`~maesil.data.sampling.SamplingPolicy`, the same for both back-ends);
* :meth:`~Backend.whole_volumes`: whole preprocessed volumes (validation/test, and their grids);
* :meth:`~Backend.predict_records` and :meth:`~Backend.predict_loader`: the images to predict;
* :meth:`~Backend.source_record`: the original image of a subject, to map predictions back onto it;
* :meth:`~Backend.set_epoch`: the epoch, on which the subject order and patch locations depend.
"""

from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torchio as tio
from torch.utils.data import DataLoader

from maesil.data.checks import check_records, raise_on_errors
from maesil.data.collate import collate_volumes
from maesil.data.io import subject_from_record
from maesil.data.preprocess import PreprocessSettings
from maesil.data.sampling import UnrepeatedSampler, is_distributed
from maesil.data.records import DataError, SubjectRecord
from maesil.data.sources import discover_subjects
from maesil.data.tasks import PatchTask

__all__ = ["Backend", "LoaderSettings", "first_item"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoaderSettings:
    """The DataModule settings every back-end reads.

    Attributes:
        data_dir: the folder, manifest or cache read (``data_dir``, or the phantom folder).
        task: what a batch holds and where training superpatches lie.
        preprocess: the per-volume preprocessing.
        superpatch_size: training superpatch (X, Y, Z); smaller volumes are padded up to it.
        batch_size: training superpatches per batch.
        samples_per_volume: superpatches drawn per training subject and epoch.
        num_workers: loading processes.
        seed: seed of the subject order and of the cache's superpatch locations.
        exclude: glob patterns of files that are not images.
        classes: the declared label values (``None``: any non-negative integer).
        check_voxels: read every voxel of every source file in the checks.
        cache_format: how a prepared cache stores volumes (``"npy"`` or ``"blosc2"``,
            :mod:`~maesil.data.cache.volumes`).
    """

    data_dir: Path
    task: PatchTask
    preprocess: PreprocessSettings
    superpatch_size: tuple[int, int, int]
    batch_size: int
    samples_per_volume: int
    num_workers: int
    seed: int
    exclude: tuple[str, ...]
    classes: list[int] | None
    check_voxels: bool
    cache_format: str = "npy"


def first_item(batch: list):
    """``collate_fn`` of loaders that yield single items (e.g. whole ``tio.Subject`` volumes)."""
    return batch[0]


class Backend(ABC):
    """Where the DataModule's batches come from (see the module docstring)."""

    def __init__(self, settings: LoaderSettings) -> None:
        self.settings = settings

    # ------------------------------------------------------------------------ per back-end
    def prepare(self) -> None:
        """Rank-0 preparation before :meth:`subjects` (``LightningDataModule.prepare_data``); none by default."""

    @abstractmethod
    def subjects(self) -> list[SubjectRecord]:
        """Every subject of the data, with their files checked (all problems in one ``DataError``)."""

    @abstractmethod
    def train_loader(self, records: Sequence[SubjectRecord], epoch: int, skip: int = 0) -> DataLoader:
        """Training batches of ``records`` for ``epoch``; the first pass skips ``skip`` superpatches (resume).

        The loader's sampler is a ``DistributedSampler`` (Lightning then leaves it alone) whose
        ``set_epoch`` reaches everything that depends on the epoch.
        """

    @abstractmethod
    def whole_volumes(self, records: Sequence[SubjectRecord]) -> list[tio.Subject]:
        """The whole preprocessed volumes of ``records`` (labels when the task needs them), padded up to
        one superpatch, in memory."""

    @abstractmethod
    def predict_records(self) -> list[SubjectRecord]:
        """The original images to predict (no labels)."""

    @abstractmethod
    def source_record(self, record: SubjectRecord) -> SubjectRecord:
        """The record of the original image of ``record`` (one of :meth:`subjects`)."""

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle the subject order / redraw the superpatch locations of the training loader."""

    # ------------------------------------------------------------------------ shared
    def preprocessing(self) -> tio.Compose:
        """The per-volume preprocessing, padded up to one superpatch."""
        return self.settings.preprocess.transform(min_shape=self.settings.superpatch_size)

    def discover(self, data_dir: Path) -> list[SubjectRecord]:
        """The subjects of a folder or manifest (:func:`~maesil.data.sources.discover_subjects`)."""
        return discover_subjects(data_dir, exclude=self.settings.exclude)

    def check_sources(self, records: Sequence[SubjectRecord], read_voxels: bool | None = None,
                      warn_small: bool = True) -> None:
        """Labels present where the task needs them; the file checks of :mod:`maesil.data.checks`
        (voxels too when ``read_voxels``, default ``check_voxels``; ``warn_small``: warn about volumes
        smaller than a superpatch, which a cache answers itself after preprocessing)."""
        settings, task = self.settings, self.settings.task
        read_voxels = settings.check_voxels if read_voxels is None else read_voxels
        if task.requires_labels:
            unlabeled = [r for r in records if r.label is None and r.split != "test"]
            if unlabeled:
                raise DataError(
                    [f"{r.image}: no label (task {task.name!r} needs a label for every image)" for r in unlabeled],
                    header=f"Task {task.name!r} needs labels (in {settings.data_dir}/labels, or labelsTr,"
                    f" named like the images, or a manifest's label column); {len(unlabeled)} image(s) have none",
                )
        problems = check_records(records, superpatch_size=settings.superpatch_size if warn_small else None,
                                 target_spacing=settings.preprocess.target_spacing, classes=settings.classes,
                                 read_voxels=read_voxels, workers=max(2, settings.num_workers))
        raise_on_errors(problems, what=f"data of {settings.data_dir}")

    def discover_for_prediction(self, data_dir: Path) -> list[SubjectRecord]:
        """Every image of ``data_dir``, whatever its split, labels dropped (prediction reads none)."""
        return [dataclasses.replace(r, label=None) for r in self.discover(data_dir)]

    def predict_loader(self, records: Sequence[SubjectRecord]) -> DataLoader:
        """The original images of ``records``, preprocessed as for training, one whole volume per batch
        (:func:`~maesil.data.collate.collate_volumes` plus ``source``), read lazily in ``num_workers``
        processes; sharded without repetition over ranks when distributed."""
        subjects = [tio.Subject(subject_id=r.subject_id, source=str(r.image),
                                image=subject_from_record(r, with_label=False)["image"]) for r in records]
        dataset = tio.SubjectsDataset(subjects, transform=self.preprocessing(), load_getitem=False)
        return DataLoader(
            dataset,
            batch_size=1,
            shuffle=False,
            sampler=UnrepeatedSampler(dataset) if is_distributed() else None,
            num_workers=self.settings.num_workers,
            collate_fn=collate_volumes,
            pin_memory=False,  # pinning would rebuild the tio.Subject dicts of the batch
        )
