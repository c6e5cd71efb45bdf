"""Reading a prepared cache: whole preprocessed subjects, and random superpatches copied out of
memory-mapped volumes (``.npy``, or ``.b2nd`` of which only the touched chunks are decompressed:
:mod:`~maesil.data.cache.volumes`) (:class:`CachedPatchDataset`), so training runs on a plain ``DataLoader`` with
worker processes and memory stays bounded by the loader's prefetch queue, not by the number of volumes.

A volume smaller than the superpatch is padded at read time exactly as
:class:`~maesil.data.preprocess.PadToMinShape` would (centred; 0 for CT, the volume minimum for MRI).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torchio as tio
from torch.utils.data import Dataset

from maesil.data.cache.index import CacheIndex
from maesil.data.cache.volumes import load_volume, preload_blosc2, read_box
from maesil.data.collate import batch_buffer
from maesil.data.sampling import LabelCentredPolicy, SamplingPolicy, UniformPolicy
from maesil.data.records import DataError
from maesil.shapes import as_triple

__all__ = ["CachedPatchDataset", "load_cached_subject", "read_window"]



def load_cached_subject(index: CacheIndex, subject_id: str, with_label: bool) -> tio.Subject:
    """A whole preprocessed subject in memory (``image``, optional ``label``, ``subject_id``) with
    its preprocessed affine, e.g. for validation grids (:func:`~maesil.data.grid.grid_patches`)."""
    entry = index[subject_id]
    image = _named(subject_id, load_volume, entry.image_path)
    affine = entry.affine_array
    images: dict[str, tio.Image] = {"image": tio.ScalarImage(tensor=torch.from_numpy(image[np.newaxis]),
                                                             affine=affine)}
    if with_label:
        if entry.label_path is None:
            raise DataError(f"{entry.source.image}: subject {subject_id!r} has no label in the cache {index.root}")
        label = _named(subject_id, load_volume, entry.label_path)
        images["label"] = tio.LabelMap(tensor=torch.from_numpy(label[np.newaxis]), affine=affine)
    return tio.Subject(subject_id=subject_id, **images)


@dataclass(frozen=True)
class _Item:
    """What a worker needs to read patches of one subject (small and picklable); ``label`` and
    ``points`` are set when the labels are read or the sampling policy needs them."""

    subject_id: str
    image: str
    label: str | None
    points: str | None
    shape: tuple[int, int, int]
    image_fill: float
    label_fill: int
    label_values: tuple[int, ...]
    label_counts: tuple[int, ...]


class _StoredLabelVoxels:
    """:class:`~maesil.data.sampling.LabelVoxels` of a cached subject: the voxel coordinates stored at
    prepare time (:func:`~maesil.data.cache.writer.label_points`), shifted by the read-time padding."""

    def __init__(self, item: _Item, before: np.ndarray) -> None:
        self.where = f"{item.label}: subject {item.subject_id!r}"
        self.values = np.array(item.label_values, dtype=np.int64)
        self.counts = np.array(item.label_counts, dtype=np.int64)
        self._item, self._before = item, before

    def points(self, value: int) -> np.ndarray:
        with np.load(self._item.points, allow_pickle=False) as stored:  # type: ignore[arg-type]
            return stored[f"points_{value}"].astype(np.int64) + self._before


def _named(subject_id: str, read, *args, **kwargs):
    """``read(*args, **kwargs)``, a ``DataError`` (which names the file) prefixed with the subject."""
    try:
        return read(*args, **kwargs)
    except DataError as error:
        raise DataError(f"subject {subject_id!r}: {error}") from None


def read_window(path: str, start: Sequence[int], size: Sequence[int], before: Sequence[int], fill: float,
                shape: Sequence[int], out: np.ndarray | None = None, dtype: np.dtype | type = np.float32
                ) -> np.ndarray:
    """Copy the box ``[start, start + size)`` of a padded volume out of the cached volume at ``path``.

    The stored volume has shape ``shape``; only the box is read (into ``out`` if given, converting to
    its dtype, else into a new array of ``dtype``): a memory-mapped ``.npy``, or the chunks of a ``.b2nd``
    that the box touches (:func:`~maesil.data.cache.volumes.read_box`). The padded volume has ``before``
    voxels of value ``fill`` in front of the stored array along each axis (and as many as needed behind).
    Nothing stays mapped afterwards, so memory does not grow with the number of volumes read.

    Raises:
        DataError: the file is missing, truncated or corrupt (naming it).
    """
    size = tuple(int(s) for s in size)
    if out is None:
        out = np.empty(size, dtype=dtype)
    elif out.shape != size:
        raise ValueError(f"out has shape {out.shape}, expected {size}")
    src, dst = [], []
    inside = True
    for axis in range(3):
        lo = int(start[axis]) - int(before[axis])
        hi = lo + size[axis]
        clip_lo, clip_hi = max(0, lo), min(int(shape[axis]), hi)
        inside &= clip_lo == lo and clip_hi == hi
        src.append(slice(clip_lo, clip_hi))
        dst.append(slice(clip_lo - lo, clip_hi - lo))
    if not inside:
        out.fill(fill)
    read_box(path, src, out[tuple(dst)])
    return out


class CachedPatchDataset(Dataset):
    """Random superpatches read from a prepared cache; a map-style dataset for a plain
    ``DataLoader`` with worker processes (and a ``DistributedSampler``).

    Item ``i`` is a patch of subject ``subject_ids[i // samples_per_volume]`` at a location drawn by
    ``policy`` (:mod:`maesil.data.sampling`: the same policies and border rule as the TorchIO queue)
    from ``np.random.default_rng([seed, epoch, i])``: reproducible, and new every epoch after
    :meth:`set_epoch` (call it before each epoch; workers started with ``persistent_workers=True``
    keep the epoch they were started with). The default policy is
    :class:`~maesil.data.sampling.LabelCentredPolicy` (``label_probabilities``) when ``with_label``,
    else :class:`~maesil.data.sampling.UniformPolicy`. A label-centred policy draws from the voxel
    coordinates stored per label value at prepare time (up to 4096 per value).

    Volumes smaller than the patch are padded centred at read time as ``PadToMinShape`` does (CT: 0,
    MRI: the volume minimum; labels: 0, or their minimum for MRI), and ``location``
    ``(i0, j0, k0, i1, j1, k1)`` is in the padded volume, as TorchIO reports it.

    Items are dicts ``{"image": float32 (1, X, Y, Z), "subject_id": str, "location": int64 (6,)}``
    plus ``"label"`` (int64 (1, X, Y, Z)) when ``with_label``; batch them with
    :func:`~maesil.data.collate.collate_patches`. A DataLoader fetches whole batches through
    :meth:`__getitems__`, which reads the patches of a batch into one buffer so that collation
    does not copy them again.

    Args:
        index: the cache.
        subject_ids: the subjects to draw from.
        superpatch_size: superpatch size (X, Y, Z), one int for a cube.
        samples_per_volume: patches per subject and epoch.
        with_label: items carry the label patch.
        label_probabilities: for the default label-centred policy (needs ``with_label``).
        seed: seed of the locations (with the epoch and the item index).
        policy: where patches lie; ``None``: the default above.
    """

    def __init__(
        self,
        index: CacheIndex,
        subject_ids: Sequence[str],
        superpatch_size: int | Sequence[int],
        samples_per_volume: int,
        with_label: bool = False,
        label_probabilities: dict[int, float] | None = None,
        seed: int = 0,
        policy: SamplingPolicy | None = None,
    ) -> None:
        if int(samples_per_volume) < 1:
            raise ValueError(f"samples_per_volume must be >= 1, got {samples_per_volume}")
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if label_probabilities is not None and not with_label:
            raise ValueError("label_probabilities needs with_label=True")
        if policy is None:
            policy = LabelCentredPolicy(label_probabilities) if with_label else UniformPolicy()
        elif label_probabilities is not None:
            raise ValueError("give label_probabilities or policy, not both (the policy holds the probabilities)")
        self.superpatch_size = as_triple(superpatch_size, "superpatch_size")
        self.samples_per_volume = int(samples_per_volume)
        self.with_label = bool(with_label)
        self.policy = policy
        self.seed = int(seed)
        self.epoch = 0
        self._needs_labels = self.with_label or policy.requires_labels
        self._mri = index.settings.modality == "mri"
        # What each worker receives: the table's path and 8 bytes per subject; a subject's entry is read
        # from the index when one of its patches is (the last few are kept).
        self._table = index.table
        self._rows = index.table.rows(subject_ids)
        self._items: dict[int, _Item] = {}
        if self._needs_labels:
            unlabeled = index.table.unlabeled(self._rows)
            if unlabeled:
                header = None if len(unlabeled) == 1 else f"{len(unlabeled)} subjects have no label in the cache"
                raise DataError([f"{e.source.image}: subject {e.subject_id!r} has no label in the cache {index.root}"
                                 for e in map(index.table.entry, unlabeled[:20])], header=header)
        if len(self._rows) and self._item(0).image.endswith(".b2nd"):
            preload_blosc2()  # before the DataLoader forks its workers, which then share the library's pages

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_items": {}}

    def _item(self, k: int) -> _Item:
        """What reading subject ``k`` (of ``subject_ids``) needs, from its index entry."""
        item = self._items.get(k)
        if item is None:
            entry = self._table.entry(int(self._rows[k]))
            item = _Item(
                subject_id=entry.subject_id,
                image=str(entry.image_path),
                label=str(entry.label_path) if self._needs_labels else None,
                points=str(entry.label_points_path) if self._needs_labels else None,
                shape=tuple(int(s) for s in entry.shape),  # type: ignore[arg-type]
                image_fill=float(entry.stats.min) if self._mri else 0.0,
                label_fill=int(min(entry.label_values)) if self._mri and entry.label_values else 0,
                label_values=entry.label_values,
                label_counts=entry.label_counts,
            )
            if len(self._items) >= 64:
                self._items.clear()
            self._items[k] = item
        return item

    def __len__(self) -> int:
        return len(self._rows) * self.samples_per_volume

    def set_epoch(self, epoch: int) -> None:
        """Draw new locations: item ``i`` of epoch ``e`` uses the seed ``[seed, e, i]``."""
        self.epoch = int(epoch)

    def _location(self, i: int) -> tuple[_Item, np.ndarray, np.ndarray]:
        """Subject, start (in the padded volume) and front padding of item ``i``."""
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} patches")
        item = self._item(i // self.samples_per_volume)
        rng = np.random.default_rng([self.seed, self.epoch, i])
        patch = np.array(self.superpatch_size)
        shape = np.array(item.shape)
        padded = np.maximum(shape, patch)
        before = (padded - shape) // 2
        labels = _StoredLabelVoxels(item, before) if self.policy.requires_labels else None
        return item, self.policy.start(padded, patch, rng, labels), before

    def _read(self, i: int, image: torch.Tensor, label: torch.Tensor | None) -> dict[str, Any]:
        """Item ``i`` read into the (1, X, Y, Z) tensors ``image`` and ``label``."""
        item, start, before = self._location(int(i))
        _named(item.subject_id, read_window, item.image, start, self.superpatch_size, before, item.image_fill,
               item.shape, out=image[0].numpy())
        sample: dict[str, Any] = {
            "image": image,
            "subject_id": item.subject_id,
            "location": torch.as_tensor(np.concatenate([start, start + np.array(self.superpatch_size)]),
                                        dtype=torch.int64),
        }
        if label is not None:
            _named(item.subject_id, read_window, item.label, start, self.superpatch_size, before,
                   item.label_fill, item.shape, out=label[0].numpy())
            sample["label"] = label
        return sample

    def __getitem__(self, i: int) -> dict[str, Any]:
        shape = (1, *self.superpatch_size)
        return self._read(i, torch.empty(shape, dtype=torch.float32),
                          torch.empty(shape, dtype=torch.int64) if self.with_label else None)

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """A whole batch (what a DataLoader asks for): the patches are read side by side into one
        tensor (in shared memory inside a worker), which :func:`~maesil.data.collate.collate_patches`
        then returns without copying."""
        shape = (len(indices), 1, *self.superpatch_size)
        images = batch_buffer(shape, torch.float32)
        labels = batch_buffer(shape, torch.int64) if self.with_label else None
        return [self._read(i, images[k], None if labels is None else labels[k]) for k, i in enumerate(indices)]
