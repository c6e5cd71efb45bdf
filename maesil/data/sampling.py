"""Patch sampling for training (a DDP-aware ``tio.Queue``) and validation (an exact grid), the
batch collation, and the per-task strategies that decide what a batch holds.

Batch format (every task): a plain ``dict``

* ``"image"``: float32 ``(B, 1, X, Y, Z)``;
* ``"subject_id"``: ``list[str]`` of length B;
* ``"location"``: int64 ``(B, 6)``, TorchIO's ``(i0, j0, k0, i1, j1, k1)`` voxel bounds of the
  patch in the preprocessed (canonical, resampled, padded) volume;
* task ``"segment"`` also ``"label"``: int64 ``(B, 1, X, Y, Z)``;
* whole-volume batches (:func:`collate_volumes`: validation/test of tasks with
  ``whole_volume_evaluation``, and prediction) hold one whole preprocessed volume
  (``location`` then spans it) plus ``"spacing"``, ``"subject"`` and, for prediction, ``"source"``;
* task ``"two_view"`` (:mod:`maesil.data.views`, BYOL-style methods) also ``"view1"``/``"view2"``:
  float32 ``(B, 1, *view_size)``, two augmented crops of ``image``; ``"box1"``/``"box2"``: float32
  ``(B, 6)``, the crops ``(x0, y0, z0, x1, y1, z1)`` in voxel-edge coordinates of the superpatch;
  ``"flip1"``/``"flip2"``: bool ``(B, 3)``, the axes each view is flipped along; ``"overlap"``:
  float32 ``(B,)``, intersection volume / smaller box volume.

A new task is a :class:`PatchTask` subclass registered with :func:`register_task`: it picks the
training patch sampler and the collation.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist
import torchio as tio
from torch.utils.data import ConcatDataset, Dataset
from torch.utils.data.distributed import DistributedSampler

from maesil.data.preprocess import PadToMinShape


def is_distributed() -> bool:
    """True inside an initialised ``torch.distributed`` process group."""
    return dist.is_available() and dist.is_initialized()


def as_patch_size(value: int | Sequence[int]) -> tuple[int, int, int]:
    """``128`` -> ``(128, 128, 128)``; validates three positive integers."""
    if isinstance(value, (int, np.integer)):
        value = (int(value),) * 3
    size = tuple(int(v) for v in value)
    if len(size) != 3 or any(v < 1 for v in size):
        raise ValueError(f"patch size must be a positive int or 3 positive ints, got {value!r}")
    return size  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Training: queue
# --------------------------------------------------------------------------------------------


def train_queue(
    subjects_dataset: tio.SubjectsDataset,
    patch_size: int | Sequence[int],
    samples_per_volume: int,
    max_length: int,
    num_workers: int,
    sampler: tio.data.PatchSampler,
    shuffle_seed: int = 0,
) -> tio.Queue:
    """A ``tio.Queue`` whose subject order is driven by a ``DistributedSampler``.

    Inside a process group the sampler shards the subjects over the ranks (each rank loads and
    patches its own subjects; the number of subjects per rank is equalised by repetition, as
    ``DistributedSampler`` does). Outside one, the same sampler with one replica gives a
    seeded, epoch-dependent shuffle, so the subject order is reproducible. Call
    :func:`set_queue_epoch` (or the DataModule's ``set_epoch``) at every epoch start so the
    order changes; :class:`QueueSampler` does it automatically under Lightning.

    The queue's background loader is started lazily (``start_background=False``) so that an
    epoch set before the first batch, e.g. when resuming, is honoured.

    Args:
        subjects_dataset: dataset of (lazy) subjects with the preprocessing transform.
        patch_size: must equal ``sampler.patch_size``; kept for explicitness.
        samples_per_volume: patches drawn from each loaded volume.
        max_length: queue capacity in patches.
        num_workers: processes loading and preprocessing volumes for the queue. The
            DataLoader that pops patches from the queue must use ``num_workers=0``.
        sampler: the patch sampler (``tio.UniformSampler``, ``tio.LabelSampler`` ...).
        shuffle_seed: seed of the subject shuffle (same on every rank).
    """
    patch_size = as_patch_size(patch_size)
    if tuple(int(v) for v in sampler.patch_size) != patch_size:
        raise ValueError(f"patch_size {patch_size} differs from the sampler's {tuple(sampler.patch_size)}")
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


def set_queue_epoch(queue: tio.Queue, epoch: int) -> None:
    """Forward ``epoch`` to the queue's subject sampler (reshuffles the subject order)."""
    subject_sampler = getattr(queue, "subject_sampler", None)
    if subject_sampler is not None and hasattr(subject_sampler, "set_epoch"):
        subject_sampler.set_epoch(int(epoch))


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` whose next pass can start part-way through the epoch.

    :meth:`skip_once` makes the next ``__iter__`` drop its first ``n`` indices (the ones a resumed run
    already trained on); later passes are whole again. ``len`` stays the full epoch, so Lightning's
    epoch length and progress counters are unchanged.
    """

    _skip: int = 0

    def skip_once(self, count: int) -> None:
        """Drop the first ``count`` indices of the next pass (0: no skip)."""
        if count < 0:
            raise ValueError(f"cannot skip a negative number of samples ({count})")
        self._skip = int(count)

    def __iter__(self):
        indices = list(super().__iter__())
        skip, self._skip = self._skip, 0
        return iter(indices[skip:])


class QueueSampler(ResumableSampler):
    """Sequential sampler over a ``tio.Queue`` for the outer (``num_workers=0``) DataLoader.

    It subclasses ``DistributedSampler`` (with one replica: the queue is already sharded per
    rank by its subject sampler) for two reasons: Lightning never wraps a DataLoader whose
    sampler already is a ``DistributedSampler`` (so ``Trainer(use_distributed_sampler=True)``
    cannot shard the patches a second time), and Lightning calls ``set_epoch`` on it at every
    epoch start, which is forwarded to the queue's subject sampler.
    """

    def __init__(self, queue: tio.Queue) -> None:
        super().__init__(queue, num_replicas=1, rank=0, shuffle=False, drop_last=False)
        self.queue = queue

    def __iter__(self):
        skip, self._skip = self._skip, 0
        return iter(range(min(skip, len(self.queue)), len(self.queue)))

    def __len__(self) -> int:
        return len(self.queue)

    def skip_once(self, count: int) -> None:
        """Resume part-way through an epoch: the next pass yields ``count`` patches fewer, and the
        queue's subject sampler skips the subjects whose patches those were (whole subjects only:
        patches of a partly used subject are drawn again, as the queue mixes subjects)."""
        super().skip_once(count)
        subject_sampler = getattr(self.queue, "subject_sampler", None)
        if isinstance(subject_sampler, ResumableSampler):
            subject_sampler.skip_once(count // max(1, int(self.queue.samples_per_volume)))

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        set_queue_epoch(self.queue, epoch)


# --------------------------------------------------------------------------------------------
# Validation: grid
# --------------------------------------------------------------------------------------------


def pad_to_multiple(subject: tio.Subject, patch_size: Sequence[int], padding_mode: float | str = 0.0) -> tio.Subject:
    """Pad (centred) every axis up to the next multiple of the patch size.

    Same effect as ``tio.EnsureShapeMultiple(patch_size, method="pad")`` but with a choosable
    padding value (0 = air for windowed CT; ``"minimum"`` for MRI).
    """
    shape = np.array(subject.spatial_shape)
    patch = np.array(patch_size)
    target = (np.ceil(shape / patch) * patch).astype(int)
    return PadToMinShape(tuple(int(t) for t in target), padding_mode)(subject)


def grid_patches(
    subjects: Sequence[tio.Subject], patch_size: int | Sequence[int], padding_mode: float | str = 0.0
) -> Dataset:
    """Every voxel of every subject exactly once, as non-overlapping patches.

    Each (already preprocessed, loaded) subject is padded to a multiple of the patch size
    (:func:`pad_to_multiple`) and partitioned by ``tio.GridSampler`` with zero overlap; the
    per-subject grids are concatenated. Items are ``tio.Subject`` patches with a
    ``location`` entry, as from the training queue.
    """
    patch_size = as_patch_size(patch_size)
    grids = []
    for subject in subjects:
        padded = pad_to_multiple(subject, patch_size, padding_mode)
        grids.append(tio.GridSampler(padded, patch_size=patch_size, patch_overlap=0))
    return ConcatDataset(grids)


# --------------------------------------------------------------------------------------------
# Collation and tasks
# --------------------------------------------------------------------------------------------


def collate_patches(patches: Sequence[tio.Subject | dict[str, Any]], label_key: str | None = None,
                    image_key: str = "image") -> dict[str, Any]:
    """Turn a list of patches into the batch dict described in the module docstring.

    A patch is a TorchIO patch (``tio.Subject`` with a ``location``) or a plain dict of tensors
    ``{"image": (1, X, Y, Z), "subject_id": str, "location": (6,)[, "label": (1, X, Y, Z)]}`` as
    yielded by :class:`~maesil.data.cache.CachedPatchDataset`. Tensors that already lie side by
    side in one buffer (a batch read by ``CachedPatchDataset.__getitems__``) are returned as a view
    of it, without copying; otherwise they are stacked, inside a DataLoader worker into shared memory,
    which saves a copy when the batch is sent to the main process (as ``default_collate`` does).
    """
    if not patches:
        raise ValueError("cannot collate an empty list of patches")

    def stack(values: list, dtype: torch.dtype) -> torch.Tensor:
        tensors = [v.data if isinstance(v, tio.Image) else torch.as_tensor(v) for v in values]
        first = tensors[0]
        numel, base = first.numel(), first.untyped_storage().data_ptr()
        if all(t.dtype == dtype and t.shape == first.shape and t.is_contiguous()
               and t.untyped_storage().data_ptr() == base and t.storage_offset() == first.storage_offset() + k * numel
               for k, t in enumerate(tensors)):
            return first.as_strided((len(tensors), *first.shape), (numel, *first.stride()), first.storage_offset())
        tensors = [t.to(dtype) for t in tensors]
        out = None
        if torch.utils.data.get_worker_info() is not None:
            storage = torch.UntypedStorage._new_shared(len(tensors) * numel * tensors[0].element_size())
            out = torch.empty(0, dtype=dtype).set_(storage, 0, (len(tensors), *first.shape))
        return torch.stack(tensors, out=out)

    batch: dict[str, Any] = {
        "image": stack([p[image_key] for p in patches], torch.float32),
        "subject_id": [str(p["subject_id"]) for p in patches],
        "location": stack([p[tio.LOCATION] for p in patches], torch.long),
    }
    if label_key is not None:
        batch["label"] = stack([p[label_key] for p in patches], torch.long)
    return batch


class HostList(list):
    """A ``list`` that Lightning's batch transfer leaves where it is (on the host).

    Lightning moves a batch to the device by rebuilding every ``Mapping`` it finds; a
    ``tio.Subject`` (a ``dict`` of ``tio.Image`` dicts) cannot be rebuilt that way and the transfer
    fails. Any object with a callable ``to`` is treated as a leaf instead, so this list's ``to``
    returns the list itself: its items (whole subjects, kept on the CPU for aggregation and
    resampling) are passed through untouched.
    """

    def to(self, *args: Any, **kwargs: Any) -> HostList:
        """No-op: the items stay on the host."""
        return self


def collate_volumes(subjects: Sequence[tio.Subject], label_key: str | None = None) -> dict[str, Any]:
    """Batch whole preprocessed volumes (in practice one: volumes differ in shape).

    Returns a dict with ``"image"`` float32 (B, C, X, Y, Z), ``"subject_id"`` list[str],
    ``"spacing"`` float32 (B, 3) (voxel size in mm of the preprocessed volume), ``"location"``
    int64 (B, 6) (``0, 0, 0, X, Y, Z``: the patch is the whole volume, as in every other batch),
    ``"subject"`` the preprocessed ``tio.Subject`` objects (a :class:`HostList`, left on the CPU by
    Lightning, with their affines, to map predictions back to the input geometry), with
    ``label_key`` also ``"label"`` int64 (B, 1, X, Y, Z), and ``"source"`` list[str] when the
    subjects carry a ``source`` entry (the path of the original image, for prediction).
    Tensors are copies: the cached subjects are never modified through a batch.
    """
    if not subjects:
        raise ValueError("cannot collate an empty list of volumes")
    shapes = {tuple(s.spatial_shape) for s in subjects}
    if len(shapes) > 1:
        ids = ", ".join(f"{s.get('subject_id', '?')} {tuple(s.spatial_shape)}" for s in subjects)
        raise ValueError(f"whole volumes of different shapes cannot share a batch ({ids}); use batch size 1")
    batch: dict[str, Any] = {
        "image": torch.stack([s["image"].data.to(torch.float32) for s in subjects]),
        "subject_id": [str(s.get("subject_id", "?")) for s in subjects],
        "spacing": torch.tensor([[float(v) for v in s["image"].spacing] for s in subjects], dtype=torch.float32),
        "location": torch.tensor([[0, 0, 0, *s.spatial_shape] for s in subjects], dtype=torch.long),
        "subject": HostList(subjects),
    }
    if label_key is not None:
        missing = [str(s.get("subject_id", "?")) for s in subjects if label_key not in s]
        if missing:
            raise ValueError(f"subject(s) {', '.join(missing)} have no {label_key!r} image")
        batch["label"] = torch.stack([s[label_key].data.to(torch.long) for s in subjects])
    if all("source" in s for s in subjects):
        batch["source"] = [str(s["source"]) for s in subjects]
    return batch


class PatchTask:
    """What a training/validation batch holds for one kind of method.

    Subclasses set ``name``, ``requires_labels`` and ``whole_volume_evaluation`` and may override
    :meth:`train_sampler`, :meth:`collate` and :meth:`val_collate`. Instances must be picklable.
    ``whole_volume_evaluation = True`` makes the DataModule validate and test on whole
    preprocessed volumes, one per batch (:func:`collate_volumes`), instead of a patch grid.

    Args:
        label_probabilities: label -> relative probability of being the patch centre (tasks
            sampling around labels only).
    """

    name: ClassVar[str] = ""
    requires_labels: ClassVar[bool] = False
    whole_volume_evaluation: ClassVar[bool] = False

    def __init__(self, label_probabilities: dict[int, float] | None = None) -> None:
        self.label_probabilities = label_probabilities

    def train_sampler(self, patch_size: tuple[int, int, int]) -> tio.data.PatchSampler:
        return tio.UniformSampler(patch_size)

    def collate(self, patches: Sequence[tio.Subject]) -> dict[str, Any]:
        return collate_patches(patches, label_key="label" if self.requires_labels else None)

    def val_collate(self, patches: Sequence[tio.Subject]) -> dict[str, Any]:
        return self.collate(patches)

    def volume_collate(self, subjects: Sequence[tio.Subject]) -> dict[str, Any]:
        """Whole-volume batches of validation/test (:func:`collate_volumes`, labels if required)."""
        return collate_volumes(subjects, label_key="label" if self.requires_labels else None)


TASKS: dict[str, type[PatchTask]] = {}


def register_task(cls: type[PatchTask]) -> type[PatchTask]:
    """Class decorator adding a task to :data:`TASKS` under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty `name`")
    TASKS[cls.name] = cls
    return cls


def task_options(name: str) -> frozenset[str]:
    """The keyword options the constructor of task ``name`` takes (e.g. ``label_probabilities``)."""
    try:
        cls = TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}") from None
    parameters = inspect.signature(cls.__init__).parameters.values()
    return frozenset(p.name for p in parameters if p.name != "self"
                     and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def get_task(name: str, **options: Any) -> PatchTask:
    """The registered task ``name``, built with those of ``options`` its constructor takes.

    The DataModule hands every task option it has (``label_probabilities``, ``views`` ...) and warns
    itself about the ones the chosen task ignores (see :func:`task_options`); the others are dropped,
    unless the constructor takes ``**options`` itself.
    """
    accepted = task_options(name)
    cls = TASKS[name]
    if any(p.kind is p.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values()):
        return cls(**options)
    return cls(**{key: value for key, value in options.items() if key in accepted})


@register_task
class ReconstructTask(PatchTask):
    """Masked-reconstruction pretraining: uniformly placed patches, image only."""

    name = "reconstruct"


@register_task
class SegmentTask(PatchTask):
    """Segmentation fine-tuning: patches centred by ``tio.LabelSampler`` (``label_probabilities``
    or, if ``None``, any voxel with label > 0), batches carry the label map. Validation and test
    are whole volumes (``whole_volume_evaluation``): Dice and HD95 are defined per volume and
    organ, and sliding-window inference needs the whole volume with its geometry."""

    name = "segment"
    requires_labels = True
    whole_volume_evaluation = True

    def train_sampler(self, patch_size: tuple[int, int, int]) -> tio.data.PatchSampler:
        return tio.LabelSampler(patch_size, label_name="label", label_probabilities=self.label_probabilities)
