"""Where training superpatches are cut, and the samplers that order, shard and resume them.

Patch-location policies
-----------------------
A :class:`SamplingPolicy` decides the corner ``(i0, j0, k0)`` of a superpatch inside a volume that is
already padded to at least one superpatch. Both back-ends draw through the same policy objects: the
TorchIO queue wraps one in a ``tio.data.PatchSampler`` (:mod:`maesil.data.backends.queue`) and the
prepared cache calls it per item (:class:`~maesil.data.cache.reader.CachedPatchDataset`). A task
declares its policy (:meth:`maesil.data.tasks.PatchTask.sampling_policy`).

* :class:`UniformPolicy`: every corner that keeps the patch inside the volume is equally likely.
* :class:`LabelCentredPolicy`: a label value is drawn (with ``label_probabilities`` among the values
  present, or, without them, any value > 0 weighted by its voxel count), then one voxel of that value
  uniformly, and the patch is centred on it.

Border rule (both back-ends): the patch is centred on the drawn voxel (centre index ``size // 2``)
and then shifted, along each axis, as little as needed to lie inside the padded volume:
``start = clip(voxel - size // 2, 0, shape - size)``. The drawn voxel is therefore always inside its
patch, also at the very border of the volume, where the patch is flush with the border (TorchIO's
``LabelSampler`` never centres on voxels closer than half a patch to the border instead). The
candidate voxels are those of the label map as the back-end holds it: the queue sees the whole padded
map (padding is background), the cache the voxel coordinates stored at prepare time (at most 4096 per
value, drawn uniformly, of the unpadded volume).

Randomness comes from a ``numpy.random.Generator`` the caller passes: the cache seeds one per item
from ``(seed, epoch, index)``; the queue seeds one per visit of a subject from torch's global RNG (so
``seed_everything`` decides it, as for TorchIO's own samplers).

Samplers
--------
:class:`ResumableSampler` is a ``DistributedSampler`` whose next pass can start part-way through the
epoch (resuming a checkpoint), that forwards ``set_epoch`` to whatever else depends on the epoch and
that can shard whole groups of indices (the superpatches of one subject) over the ranks of all nodes;
:class:`UnrepeatedSampler` shards indices over ranks without repeating any (prediction).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence, Sized
from typing import ClassVar, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data.distributed import DistributedSampler

from maesil.data.records import DataError

__all__ = [
    "LabelCentredPolicy", "LabelMapVoxels", "LabelVoxels", "ResumableSampler", "SamplingPolicy", "UniformPolicy",
    "UnrepeatedSampler", "is_distributed", "place_around",
]


def is_distributed() -> bool:
    """True inside an initialised ``torch.distributed`` process group."""
    return dist.is_available() and dist.is_initialized()


# --------------------------------------------------------------------------------------------
# Patch-location policies
# --------------------------------------------------------------------------------------------


class LabelVoxels(Protocol):
    """The labelled voxels of one volume that a label-centred policy draws from."""

    #: names the label map in error messages, e.g. ``"labels/a.nii.gz: subject 'a'"``.
    where: str
    #: the label values present (int64, ascending) and the number of voxels of each.
    values: np.ndarray
    counts: np.ndarray

    def points(self, value: int) -> np.ndarray:
        """Coordinates ``(N, 3)`` (int64, in the padded volume) of the candidate voxels of ``value``."""
        ...


class LabelMapVoxels:
    """:class:`LabelVoxels` of a label map held in memory (every voxel is a candidate).

    Args:
        label: integer label map ``(X, Y, Z)``.
        where: names the map in error messages.
    """

    def __init__(self, label: np.ndarray, where: str) -> None:
        if label.ndim != 3:
            raise ValueError(f"label map must be (X, Y, Z), got shape {label.shape}")
        self.where = where
        self.shape = label.shape
        self._flat = np.asarray(label).reshape(-1).astype(np.int64, copy=False)
        low = int(self._flat.min()) if self._flat.size else 0
        counts = np.bincount(self._flat - low)
        present = np.flatnonzero(counts)
        self.values = present.astype(np.int64) + low
        self.counts = counts[present].astype(np.int64)
        self._points: dict[int, np.ndarray] = {}

    def points(self, value: int) -> np.ndarray:
        if value not in self._points:
            where = np.flatnonzero(self._flat == value)
            self._points[value] = np.stack(np.unravel_index(where, self.shape), axis=1).astype(np.int64)
        return self._points[value]


def place_around(voxel: np.ndarray, shape: np.ndarray, size: np.ndarray) -> np.ndarray:
    """The border rule: the corner of a patch of ``size`` centred on ``voxel`` (centre index ``size // 2``),
    shifted as little as needed to lie inside a volume of ``shape``; ``voxel`` stays inside the patch."""
    return np.clip(np.asarray(voxel, dtype=np.int64) - size // 2, 0, shape - size)


class SamplingPolicy(ABC):
    """Where a training superpatch lies in its (padded) volume; see the module docstring.

    Instances are small and picklable (they travel to DataLoader workers).
    """

    #: the policy reads the subject's labels (:class:`LabelVoxels`).
    requires_labels: ClassVar[bool] = False

    def start(self, shape: Sequence[int], size: Sequence[int], rng: np.random.Generator,
              labels: LabelVoxels | None = None) -> np.ndarray:
        """The corner ``(i0, j0, k0)`` (int64) of a patch of ``size`` in a volume of ``shape``.

        Raises:
            ValueError: the volume is smaller than the patch (pad it first), or labels are missing.
            DataError: the labels offer no voxel to centre a patch on.
        """
        shape_array, size_array = np.asarray(shape, dtype=np.int64), np.asarray(size, dtype=np.int64)
        if (shape_array < size_array).any():
            raise ValueError(f"volume {tuple(shape_array)} is smaller than the patch {tuple(size_array)}; pad it")
        if self.requires_labels and labels is None:
            raise ValueError(f"{type(self).__name__} needs the subject's labels")
        return self._start(shape_array, size_array, rng, labels)

    @abstractmethod
    def _start(self, shape: np.ndarray, size: np.ndarray, rng: np.random.Generator,
               labels: LabelVoxels | None) -> np.ndarray:
        """:meth:`start` for checked arguments."""


class UniformPolicy(SamplingPolicy):
    """Every corner that keeps the patch inside the volume is equally likely (as ``tio.UniformSampler``)."""

    def _start(self, shape: np.ndarray, size: np.ndarray, rng: np.random.Generator,
               labels: LabelVoxels | None) -> np.ndarray:
        return np.array([rng.integers(0, int(n) + 1) for n in shape - size], dtype=np.int64)

    def __repr__(self) -> str:
        return "UniformPolicy()"


class LabelCentredPolicy(SamplingPolicy):
    """Patches centred on a labelled voxel, shifted inside the volume by :func:`place_around`.

    Args:
        label_probabilities: label value -> relative probability that a patch is centred on it (values
            absent from a subject are skipped, the others renormalised), e.g. ``{0: 1, 1: 2}``; ``None``:
            any voxel with a label > 0, each equally likely (values weighted by their voxel counts).
    """

    requires_labels = True

    def __init__(self, label_probabilities: dict[int, float] | None = None) -> None:
        if label_probabilities is not None and any(float(p) < 0 for p in label_probabilities.values()):
            raise ValueError(f"label_probabilities must be >= 0, got {label_probabilities}")
        self.label_probabilities = ({int(k): float(v) for k, v in label_probabilities.items()}
                                    if label_probabilities is not None else None)

    def draw_value(self, labels: LabelVoxels, rng: np.random.Generator) -> int:
        """The label value the next patch is centred on."""
        values = np.asarray(labels.values, dtype=np.int64)
        if self.label_probabilities is None:
            weights = np.where(values > 0, np.asarray(labels.counts, dtype=np.float64), 0.0)
            wanted = "label > 0"
        else:
            weights = np.array([self.label_probabilities.get(int(v), 0.0) for v in values], dtype=np.float64)
            wanted = f"label in {sorted(k for k, p in self.label_probabilities.items() if p > 0)}"
        if values.size == 0 or weights.sum() <= 0:
            raise DataError(f"{labels.where} has no voxel with {wanted} to centre a patch on")
        return int(values[rng.choice(values.size, p=weights / weights.sum())])

    def _start(self, shape: np.ndarray, size: np.ndarray, rng: np.random.Generator,
               labels: LabelVoxels | None) -> np.ndarray:
        assert labels is not None
        points = labels.points(self.draw_value(labels, rng))
        return place_around(points[rng.integers(len(points))], shape, size)

    def __repr__(self) -> str:
        return f"LabelCentredPolicy(label_probabilities={self.label_probabilities})"


# --------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` whose next pass can start part-way through the epoch.

    :meth:`skip_once` makes the next ``__iter__`` drop its first ``n`` indices (the ones a resumed run
    already trained on); later passes are whole again. ``len`` stays the full epoch, so Lightning's
    epoch length and progress counters are unchanged. ``set_epoch`` (which Lightning calls on the
    training loader's sampler at every epoch start) is also passed to each of ``epoch_listeners``,
    e.g. a dataset whose superpatch locations depend on the epoch.

    ``group_size`` > 1 shards groups instead of single indices: indices ``g * group_size ..
    (g + 1) * group_size - 1`` form group ``g`` (a subject's superpatches in
    :class:`~maesil.data.cache.reader.CachedPatchDataset`), the groups are shuffled (with ``seed`` and
    the epoch, the same on every rank) and dealt to the ranks, and each rank shuffles the indices of its
    groups. Each subject is then read by exactly one rank per epoch; when the ranks do not divide the
    groups, the first few of the shuffled groups are dealt twice, so that every rank gets as many
    (``DistributedSampler``'s rule; with ``drop_last`` the last few are left out instead).
    """

    _skip: int = 0

    def __init__(self, dataset: Sized, num_replicas: int | None = None, rank: int | None = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 epoch_listeners: Sequence[Callable[[int], None]] = (), group_size: int = 1) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank,  # type: ignore[arg-type]
                         shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.epoch_listeners = list(epoch_listeners)
        self.group_size = int(group_size)
        if self.group_size < 1 or len(dataset) % self.group_size:
            raise ValueError(f"group_size {group_size} must be >= 1 and divide the {len(dataset)} indices")
        if self.group_size > 1:
            groups = len(dataset) // self.group_size
            per_rank = groups // self.num_replicas if drop_last else -(-groups // self.num_replicas)
            self.num_samples = per_rank * self.group_size
            self.total_size = self.num_samples * self.num_replicas

    def _grouped(self) -> list[int]:
        """This rank's indices of the epoch when sharding groups (see the class docstring)."""
        size = self.group_size
        count, per_rank = len(self.dataset) // size, self.num_samples // size  # type: ignore[arg-type]
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = torch.randperm(count, generator=generator).tolist() if self.shuffle else list(range(count))
        dealt = per_rank * self.num_replicas
        while len(order) < dealt:
            order += order[: dealt - len(order)]
        mine = order[:dealt][self.rank::self.num_replicas]
        indices = [g * size + k for g in mine for k in range(size)]
        if self.shuffle:
            indices = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
        return indices

    def skip_once(self, count: int) -> None:
        """Drop the first ``count`` indices of the next pass (0: no skip)."""
        if count < 0:
            raise ValueError(f"cannot skip a negative number of samples ({count})")
        self._skip = int(count)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        for listener in self.epoch_listeners:
            listener(int(epoch))

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__()) if self.group_size == 1 else self._grouped()
        skip, self._skip = self._skip, 0
        return iter(indices[skip:])


class UnrepeatedSampler(DistributedSampler):
    """Rank ``r`` of ``w`` takes indices ``r, r + w, r + 2w, ...`` in order: every index exactly once
    over all ranks (ranks may get one index fewer). For prediction, where a repeated subject would be
    written twice.

    A ``DistributedSampler`` subclass so that Lightning keeps it instead of adding its own.
    """

    def __init__(self, dataset: Sized, num_replicas: int | None = None, rank: int | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank,  # type: ignore[arg-type]
                         shuffle=False, drop_last=False)
        self.total_size = len(dataset)
        self.num_samples = len(range(self.rank, self.total_size, self.num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples
