"""Batches: superpatches and whole volumes turned into the batch dicts every method reads.

Batch format (every task): a plain ``dict``

* ``"image"``: float32 ``(B, 1, X, Y, Z)``;
* ``"subject_id"``: ``list[str]`` of length B;
* ``"location"``: int64 ``(B, 6)``, TorchIO's ``(i0, j0, k0, i1, j1, k1)`` voxel bounds of the
  patch in the preprocessed (canonical, resampled, padded) volume;
* task ``"segment"`` also ``"label"``: int64 ``(B, 1, X, Y, Z)``;
* whole-volume batches (:func:`collate_volumes`: validation/test of tasks with
  ``whole_volume_evaluation``, and prediction) hold one whole preprocessed volume
  (``location`` then spans it) plus ``"spacing"``, ``"subject"`` and, for prediction, ``"source"``;
* task ``"two_view"`` (:mod:`maesil.data.views`) adds its views and their geometry.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torchio as tio

__all__ = ["HostList", "batch_buffer", "collate_patches", "collate_volumes"]


def batch_buffer(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor for a batch. Inside a DataLoader worker it lives in shared memory, so the
    batch travels to the main process without being copied once more (as ``default_collate`` does)."""
    out = torch.empty(tuple(int(s) for s in shape), dtype=dtype)
    if torch.utils.data.get_worker_info() is not None and math.prod(out.shape) > 0:
        out.share_memory_()
    return out


def collate_patches(patches: Sequence[tio.Subject | dict[str, Any]], label_key: str | None = None,
                    image_key: str = "image") -> dict[str, Any]:
    """Turn a list of patches into the batch dict described in the module docstring.

    A patch is a TorchIO patch (``tio.Subject`` with a ``location``) or a plain dict of tensors
    ``{"image": (1, X, Y, Z), "subject_id": str, "location": (6,)[, "label": (1, X, Y, Z)]}`` as
    yielded by :class:`~maesil.data.cache.reader.CachedPatchDataset`. Tensors that already lie side by
    side in one buffer (a batch read by ``CachedPatchDataset.__getitems__``) are returned as a view
    of it, without copying; otherwise they are stacked, inside a DataLoader worker into shared memory
    (:func:`batch_buffer`).
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
        return torch.stack(tensors, out=batch_buffer((len(tensors), *first.shape), dtype))

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
