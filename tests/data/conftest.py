"""Tiny synthetic CT volumes (HU-like values) and label maps written to tmp_path."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

SHAPE = (40, 36, 20)  # X, Y, Z voxels
SPACING = (2.0, 2.0, 3.0)  # mm


def write_volume(
    path: Path,
    array: np.ndarray,
    spacing: Sequence[float] = SPACING,
    origin: Sequence[float] | None = None,
    direction: Sequence[float] | None = None,
    is_vector: bool = False,
) -> Path:
    """Write ``array`` indexed (X, Y, Z[, ...]) with SimpleITK (which wants (Z, Y, X))."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(array)
    if is_vector:
        spatial = arr.ndim - 1
        data = np.transpose(arr, tuple(reversed(range(spatial))) + (spatial,))
    else:
        data = np.transpose(arr, tuple(reversed(range(arr.ndim))))
    image = sitk.GetImageFromArray(np.ascontiguousarray(data), isVector=is_vector)
    dim = image.GetDimension()
    image.SetSpacing(tuple(float(s) for s in spacing)[:dim] + (1.0,) * max(0, dim - len(spacing)))
    if origin is not None:
        image.SetOrigin(tuple(float(o) for o in origin))
    if direction is not None:
        image.SetDirection(tuple(float(d) for d in direction))
    sitk.WriteImage(image, str(path))
    return path


def make_ct(seed: int = 0, shape: Sequence[int] = SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """A body-like ellipsoid in air with an 'organ' (label 1) and a 'bone' (label 2)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    ct = np.full(shape, -1000.0, np.float32)
    body = (x / 0.9) ** 2 + (y / 0.8) ** 2 + (z / 1.2) ** 2 < 1
    ct[body] = 20.0
    cx, cy = rng.uniform(-0.3, 0.3, size=2)
    organ = ((x - cx) / 0.35) ** 2 + ((y - cy) / 0.3) ** 2 + (z / 0.6) ** 2 < 1
    ct[organ] = 80.0
    bone = (x / 0.12) ** 2 + ((y + 0.55) / 0.12) ** 2 < 1
    bone &= body
    ct[bone] = 700.0
    ct += rng.normal(0, 10, size=shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[organ] = 1
    label[bone] = 2
    return ct.astype(np.int16), label


@pytest.fixture
def ct_volume() -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    return make_ct


@pytest.fixture
def volume_writer() -> Callable[..., Path]:
    return write_volume


@pytest.fixture
def flat_ct_dir(tmp_path: Path) -> Path:
    """4 CT images directly in a folder, no labels."""
    root = tmp_path / "flat"
    for i in range(4):
        ct, _ = make_ct(i)
        write_volume(root / f"case_{i:03d}.nii.gz", ct)
    return root


@pytest.fixture
def labeled_ct_dir(tmp_path: Path) -> Path:
    """6 CT images in images/ with label maps of the same name in labels/."""
    root = tmp_path / "labeled"
    for i in range(6):
        ct, label = make_ct(i)
        write_volume(root / "images" / f"case_{i:03d}.nii.gz", ct)
        write_volume(root / "labels" / f"case_{i:03d}.nii.gz", label)
    return root
