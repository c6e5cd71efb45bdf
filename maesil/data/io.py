"""Reading volumes for TorchIO without losing invalid voxels.

TorchIO reads NIfTI through SimpleITK, whose NIfTI reader turns NaN and Inf voxels into 0 without a
word. A volume with NaNs is broken input that must be reported, not silently repaired, so NIfTI files
are read with nibabel (which keeps them) and :class:`~maesil.data.preprocess.LoadVolume` rejects them
naming the file. Other formats go through TorchIO's own reader. The affine is nibabel's (sform when
set, else qform), the same RAS convention TorchIO uses.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torchio as tio

from maesil.data.dicom import read_dicom
from maesil.data.records import SubjectRecord

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: str | Path) -> bool:
    """Whether ``path`` names a NIfTI file (.nii or .nii.gz)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def read_volume(path: str | Path, series_uid: str | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """TorchIO reader: ``(C, X, Y, Z)`` tensor and RAS affine, NaN/Inf preserved for NIfTI.

    ``series_uid`` is only used for DICOM folders (which series of the folder to read, see
    :func:`~maesil.data.dicom.select_series`); a folder is read as DICOM, in HU.
    """
    if Path(path).is_dir():
        data, affine = tio.data.io.sitk_to_nib(read_dicom(path, series_uid))
        return torch.as_tensor(np.ascontiguousarray(data, dtype=np.float32)), np.asarray(affine, dtype=np.float64)
    if not is_nifti(path):
        return tio.data.io.read_image(path)
    image = nib.load(str(path), mmap=False)
    data = image.get_fdata(dtype=np.float32)  # applies scl_slope/scl_inter; NaN stays NaN
    if data.ndim == 3:
        data = data[np.newaxis]
    elif data.ndim == 4:  # (X, Y, Z, C) -> (C, X, Y, Z)
        data = np.moveaxis(data, -1, 0)
    return torch.as_tensor(np.ascontiguousarray(data)), np.asarray(image.affine, dtype=np.float64)


def subject_from_record(record: SubjectRecord, with_label: bool) -> tio.Subject:
    """A lazy ``tio.Subject`` (``image``, optional ``label``, ``subject_id``) read by :func:`read_volume`.

    The reader is a ``functools.partial`` of a module-level function, so subjects pickle into
    DataLoader worker processes.
    """
    reader = partial(read_volume, series_uid=record.series_uid)
    images: dict = {"image": tio.ScalarImage(record.image, reader=reader)}
    if with_label:
        if record.label is None:
            raise ValueError(f"{record.image}: subject {record.subject_id!r} has no label")
        images["label"] = tio.LabelMap(record.label, reader=read_volume)
    return tio.Subject(subject_id=record.subject_id, **images)
