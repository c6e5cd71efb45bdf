"""Whole-volume grids: every voxel of a preprocessed volume exactly once, as non-overlapping superpatches
(validation and test of patch-level tasks, and reconstruction benchmarks)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torchio as tio
from torch.utils.data import ConcatDataset, Dataset

from maesil.data.preprocess import PadToMinShape
from maesil.shapes import as_triple

__all__ = ["grid_patches", "pad_to_multiple"]


def pad_to_multiple(subject: tio.Subject, superpatch_size: Sequence[int],
                    padding_mode: float | str = 0.0) -> tio.Subject:
    """Pad (centred) every axis up to the next multiple of the patch size.

    Same effect as ``tio.EnsureShapeMultiple(superpatch_size, method="pad")`` but with a choosable
    padding value (0 = air for windowed CT; ``"minimum"`` for MRI).
    """
    shape = np.array(subject.spatial_shape)
    patch = np.array(superpatch_size)
    target = (np.ceil(shape / patch) * patch).astype(int)
    return PadToMinShape(tuple(int(t) for t in target), padding_mode)(subject)


def grid_patches(
    subjects: Sequence[tio.Subject], superpatch_size: int | Sequence[int], padding_mode: float | str = 0.0
) -> Dataset:
    """Every voxel of every subject exactly once, as non-overlapping patches.

    Each (already preprocessed, loaded) subject is padded to a multiple of the patch size
    (:func:`pad_to_multiple`) and partitioned by ``tio.GridSampler`` with zero overlap; the
    per-subject grids are concatenated. Items are ``tio.Subject`` patches with a
    ``location`` entry, as from the training queue.
    """
    size = as_triple(superpatch_size, "superpatch_size")
    grids = []
    for subject in subjects:
        padded = pad_to_multiple(subject, size, padding_mode)
        grids.append(tio.GridSampler(padded, patch_size=size, patch_overlap=0))
    return ConcatDataset(grids)
