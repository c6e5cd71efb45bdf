"""Tiny synthetic DICOM series written with SimpleITK/GDCM, for the DICOM reading tests.

Arrays are indexed (X, Y, Z) and hold real-world values (HU for CT). GDCM stores
``(value - intercept) / slope`` in the pixel data and writes the rescale tags, so reading the files
back with the rescale applied gives the array again.
"""

from __future__ import annotations

import locale
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _write(path: Path, image: sitk.Image) -> None:
    """Write ``image`` with GDCM, keeping the UIDs set in its metadata.

    GDCM's writer switches the process locale to "C" and leaves it so (Python would then read text
    files as ASCII); the locale is put back.
    """
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetImageIO("GDCMImageIO")
    writer.SetFileName(str(path))
    saved = locale.setlocale(locale.LC_ALL)
    try:
        writer.Execute(image)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _ds(values: Sequence[float]) -> str:
    """A DICOM decimal-string multi-value (``a\\b\\c``)."""
    return "\\".join(f"{float(v):.6g}" for v in values)


def slice_position(origin: Sequence[float], spacing: Sequence[float], direction: Sequence[float], k: int) -> np.ndarray:
    """LPS position of slice ``k``: the origin moved ``k`` slice spacings along the z axis."""
    normal = np.asarray(direction, float).reshape(3, 3)[:, 2]
    return np.asarray(origin, float) + k * float(spacing[2]) * normal


def write_dicom_series(
    folder: str | Path,
    array: np.ndarray,
    spacing: Sequence[float] = (0.7, 0.8, 2.5),
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    series_uid: str = "1.2.826.0.1.3680043.8.498.1",
    modality: str = "CT",
    intercept: float = -1024.0,
    slope: float = 1.0,
    direction: Sequence[float] = IDENTITY,
    shuffle_names: bool = False,
    drop_slice: int | None = None,
    file_names: Sequence[str] | None = None,
    extension: str = ".dcm",
    description: str = "",
    study_uid: str = "1.2.826.0.1.3680043.8.498.100",
) -> list[Path]:
    """Write ``array`` (X, Y, Z) as one classic DICOM file per slice along Z; return the paths.

    ``direction`` is row-major 3x3 (columns: x, y, slice normal), so slice ``k`` lies at
    ``origin + k * spacing[2] * normal``. ``shuffle_names`` gives the slices names whose order is
    not their position order (a reversed, shuffled numbering); ``drop_slice`` leaves that slice
    out; ``file_names`` names the slices explicitly; ``extension=""`` writes extension-less files.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    array = np.asarray(array)
    n = array.shape[2]
    if file_names is None:
        numbers = list(range(n))
        if shuffle_names:
            numbers = list(np.random.default_rng(0).permutation(n)[::-1])
        file_names = [f"IM{int(i):04d}{extension}" for i in numbers]
    rot = np.asarray(direction, float).reshape(3, 3)
    orientation = _ds(list(rot[:, 0]) + list(rot[:, 1]))
    paths = []
    for k in range(n):
        if k == drop_slice:
            continue
        position = slice_position(origin, spacing, direction, k)
        plane = np.ascontiguousarray(array[:, :, k].T[np.newaxis]).astype(np.int16)  # (1, Y, X)
        image = sitk.GetImageFromArray(plane)
        image.SetSpacing(tuple(float(s) for s in spacing))
        image.SetOrigin(tuple(float(p) for p in position))
        image.SetDirection(tuple(float(d) for d in direction))
        tags = {
            "0008|0016": CT_IMAGE_STORAGE if modality == "CT" else MR_IMAGE_STORAGE,
            "0008|0018": f"{series_uid}.{k + 1}",
            "0008|0060": modality,
            "0008|103e": description,
            "0020|000d": study_uid,
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": _ds(position),
            "0020|0037": orientation,
            "0028|0030": _ds((spacing[1], spacing[0])),  # row spacing (y), column spacing (x)
            "0018|0050": _ds((spacing[2],)),
            "0028|1052": _ds((intercept,)),
            "0028|1053": _ds((slope,)),
        }
        for key, value in tags.items():
            image.SetMetaData(key, value)
        path = folder / file_names[k]
        _write(path, image)
        paths.append(path)
    return paths


def write_enhanced_ct(
    path: str | Path,
    array: np.ndarray,
    spacing: Sequence[float] = (0.7, 0.8, 2.5),
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    series_uid: str = "1.2.826.0.1.3680043.8.498.2",
    intercept: float = -1024.0,
) -> Path:
    """Write ``array`` (X, Y, Z) as one multi-frame (Enhanced CT) DICOM file.

    GDCM writes a 3D image to a single file as Enhanced CT Image Storage with NumberOfFrames = Z
    and per-frame positions in its functional groups.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).T).astype(np.int16))  # (Z, Y, X)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in origin))
    for key, value in {
        "0008|0060": "CT",
        "0020|000e": series_uid,
        "0028|1052": _ds((intercept,)),
        "0028|1053": "1",
    }.items():
        image.SetMetaData(key, value)
    _write(path, image)
    return path


def stored_pixels(path: str | Path, shape_xy: tuple[int, int]) -> np.ndarray:
    """The raw (un-rescaled) int16 pixels of an uncompressed single-frame file, indexed (X, Y).

    Pixel data is the last element of the files written here, so it is the file's last bytes.
    """
    x, y = shape_xy
    raw = Path(path).read_bytes()[-x * y * 2 :]
    return np.frombuffer(raw, dtype="<i2").reshape(y, x).T
