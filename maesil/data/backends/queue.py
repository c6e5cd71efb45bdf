"""The TorchIO queue back-end: whole volumes decoded and preprocessed in worker processes, superpatches
cut from them in a DDP-aware ``tio.Queue``.

Patch locations come from the task's :class:`~maesil.data.sampling.SamplingPolicy` through
:class:`PolicyPatchSampler`, so the queue and the prepared cache place superpatches by the same rule.

Private internals
-----------------
:class:`PolicyPatchSampler` implements ``tio.data.PatchSampler._generate_patches(subject, num_patches)``,
the generator that TorchIO's own samplers (``UniformSampler``, ``WeightedSampler``) implement and that
``PatchSampler.__call__`` returns after checking the subject; TorchIO documents no public hook for a
custom location rule. Tested with torchio 1.2.1 (torch 2.13, lightning 2.6.6);
``tests/data/backends/test_queue.py::test_policy_patch_sampler_drives_torchio`` fails loudly if TorchIO
stops calling it.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence

import numpy as np
import torch
import torchio as tio
from torch.utils.data import DataLoader

from maesil.data.backends.base import Backend, LoaderSettings, first_item
from maesil.data.io import subject_from_record
from maesil.data.sampling import LabelMapVoxels, ResumableSampler, SamplingPolicy, is_distributed
from maesil.data.records import SubjectRecord

__all__ = ["PolicyPatchSampler", "QueueBackend", "QueueSampler", "train_queue"]


class PolicyPatchSampler(tio.data.PatchSampler):
    """A TorchIO patch sampler placing patches by a :class:`~maesil.data.sampling.SamplingPolicy`.

    Each visit of a subject draws from a ``numpy`` generator seeded by torch's global RNG, so
    ``seed_everything`` (and TorchIO's own seeding) decides the locations, as for TorchIO's samplers.

    Args:
        superpatch_size: superpatch size (X, Y, Z), one int for a cube (TorchIO's ``patch_size``).
        policy: where patches lie.
        label_name: the subject's label map, read when the policy needs labels.
    """

    def __init__(self, superpatch_size: int | Sequence[int], policy: SamplingPolicy, label_name: str = "label") -> None:
        super().__init__(superpatch_size)
        self.policy = policy
        self.label_name = label_name

    def _generate_patches(self, subject: tio.Subject, num_patches: int | None = None) -> Generator[tio.Subject]:
        rng = np.random.default_rng(int(torch.randint(2**62, (1,)).item()))
        labels = None
        if self.policy.requires_labels:
            label = subject[self.label_name]
            labels = LabelMapVoxels(label.data[0].numpy(),
                                    where=f"{label.path}: subject {subject.get('subject_id', '?')!r}")
        shape = np.array(subject.spatial_shape, dtype=np.int64)
        size = self.patch_size.astype(np.int64)
        left = num_patches
        while left is None or left > 0:
            start = self.policy.start(shape, size, rng, labels)
            yield self.extract_patch(subject, (int(start[0]), int(start[1]), int(start[2])))
            if left is not None:
                left -= 1


def train_queue(
    subjects_dataset: tio.SubjectsDataset,
    samples_per_volume: int,
    max_length: int,
    num_workers: int,
    sampler: tio.data.PatchSampler,
    shuffle_seed: int = 0,
) -> tio.Queue:
    """A ``tio.Queue`` whose subject order is driven by a :class:`~maesil.data.sampling.ResumableSampler`.

    Inside a process group the subject sampler shards the subjects over the ranks (each rank loads and
    patches its own subjects; the number of subjects per rank is equalised by repetition, as
    ``DistributedSampler`` does). Outside one, the same sampler with one replica gives a seeded,
    epoch-dependent shuffle, so the subject order is reproducible. :class:`QueueSampler` forwards the
    epoch to it (Lightning calls its ``set_epoch`` at every epoch start).

    The queue's background loader is started lazily (``start_background=False``) so that an
    epoch set before the first batch, e.g. when resuming, is honoured.

    Args:
        subjects_dataset: dataset of (lazy) subjects with the preprocessing transform.
        samples_per_volume: patches drawn from each loaded volume.
        max_length: queue capacity in patches.
        num_workers: processes loading and preprocessing volumes for the queue. The
            DataLoader that pops patches from the queue must use ``num_workers=0``.
        sampler: the patch sampler (:class:`PolicyPatchSampler`, or any ``tio.data.PatchSampler``).
        shuffle_seed: seed of the subject shuffle (same on every rank).
    """
    if is_distributed():
        subject_sampler = ResumableSampler(subjects_dataset, shuffle=True, seed=shuffle_seed)
    else:
        subject_sampler = ResumableSampler(subjects_dataset, num_replicas=1, rank=0, shuffle=True, seed=shuffle_seed)
    return tio.Queue(
        subjects_dataset,
        max_length=max_length,
        samples_per_volume=samples_per_volume,
        sampler=sampler,
        subject_sampler=subject_sampler,
        num_workers=num_workers,
        shuffle_subjects=False,
        shuffle_patches=True,
        start_background=False,
    )


class QueueSampler(ResumableSampler):
    """Sequential sampler over a ``tio.Queue`` for the outer (``num_workers=0``) DataLoader.

    It subclasses ``DistributedSampler`` (with one replica: the queue is already sharded per
    rank by its subject sampler) for two reasons: Lightning never wraps a DataLoader whose
    sampler already is a ``DistributedSampler`` (so ``Trainer(use_distributed_sampler=True)``
    cannot shard the patches a second time), and Lightning calls ``set_epoch`` on it at every
    epoch start, which is forwarded to the queue's subject sampler.
    """

    def __init__(self, queue: tio.Queue) -> None:
        subject_sampler = queue.subject_sampler
        listeners = [subject_sampler.set_epoch] if hasattr(subject_sampler, "set_epoch") else []
        super().__init__(queue, num_replicas=1, rank=0, shuffle=False, drop_last=False, epoch_listeners=listeners)
        self.queue = queue

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, 0
        return iter(range(min(skip, len(self.queue)), len(self.queue)))

    def __len__(self) -> int:
        return len(self.queue)

    def skip_once(self, count: int) -> None:
        """Resume part-way through an epoch: the next pass yields ``count`` patches fewer, and the
        queue's subject sampler skips the subjects whose patches those were (whole subjects only:
        patches of a partly used subject are drawn again, as the queue mixes subjects)."""
        super().skip_once(count)
        subject_sampler = self.queue.subject_sampler
        if isinstance(subject_sampler, ResumableSampler):
            subject_sampler.skip_once(count // max(1, int(self.queue.samples_per_volume)))


class QueueBackend(Backend):
    """Reads and preprocesses the source files of ``data_dir`` as training goes (see the module docstring).

    Args:
        settings: the DataModule's settings.
        queue_length: capacity (in patches) of the training queue.
    """

    def __init__(self, settings: LoaderSettings, queue_length: int) -> None:
        super().__init__(settings)
        self.queue_length = int(queue_length)
        self.queue: tio.Queue | None = None

    def subjects(self) -> list[SubjectRecord]:
        records = self.discover(self.settings.data_dir)
        self.check_sources(records)
        return records

    def _subject(self, record: SubjectRecord) -> tio.Subject:
        task = self.settings.task
        return subject_from_record(record, with_label=task.requires_labels or task.sampling_policy().requires_labels)

    def train_loader(self, records: Sequence[SubjectRecord], epoch: int, skip: int = 0) -> DataLoader:
        """Batches popped from the queue by a DataLoader with 0 workers (the queue has its own)."""
        settings = self.settings
        subjects = tio.SubjectsDataset([self._subject(r) for r in records], transform=self.preprocessing(),
                                       load_getitem=False)
        self.queue = train_queue(
            subjects,
            samples_per_volume=settings.samples_per_volume,
            max_length=self.queue_length,
            num_workers=settings.num_workers,
            sampler=PolicyPatchSampler(settings.superpatch_size, settings.task.sampling_policy()),
            shuffle_seed=settings.seed,
        )
        sampler = QueueSampler(self.queue)
        sampler.set_epoch(epoch)
        sampler.skip_once(skip)
        return DataLoader(
            self.queue,
            batch_size=settings.batch_size,
            sampler=sampler,
            num_workers=0,  # required by tio.Queue: it spawns its own loader processes
            collate_fn=settings.task.collate,
            pin_memory=torch.cuda.is_available(),
        )

    def whole_volumes(self, records: Sequence[SubjectRecord]) -> list[tio.Subject]:
        dataset = tio.SubjectsDataset([subject_from_record(r, with_label=self.settings.task.requires_labels)
                                       for r in records], transform=self.preprocessing(), load_getitem=False)
        return list(DataLoader(dataset, batch_size=1, num_workers=self.settings.num_workers, collate_fn=first_item))

    def predict_records(self) -> list[SubjectRecord]:
        return self.discover_for_prediction(self.settings.data_dir)

    def source_record(self, record: SubjectRecord) -> SubjectRecord:
        return record

    def set_epoch(self, epoch: int) -> None:
        if self.queue is not None and hasattr(self.queue.subject_sampler, "set_epoch"):
            self.queue.subject_sampler.set_epoch(int(epoch))
