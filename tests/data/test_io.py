from pathlib import Path

import numpy as np
import torch
import torchio as tio

from maesil.data.io import is_nifti, read_volume

from .conftest import make_ct, write_volume


def test_nifti_reads_like_torchio_but_keeps_nan(tmp_path: Path) -> None:
    array = make_ct(0)[0].astype(np.float32)
    # an oblique-free but non-RAS (LPS, SimpleITK's default) NIfTI with a shifted origin
    path = write_volume(tmp_path / "ct.nii.gz", array, origin=(10.0, -5.0, 3.0))
    ours, our_affine = read_volume(path)
    theirs, their_affine = tio.data.io.read_image(path)
    assert ours.shape == theirs.shape and ours.ndim == 4
    assert torch.allclose(ours.float(), theirs.float())
    assert np.allclose(our_affine, their_affine, atol=1e-5)

    array[1, 2, 3] = np.nan
    nan_path = write_volume(tmp_path / "nan.nii.gz", array)
    assert int(read_volume(nan_path)[0].isnan().sum()) == 1
    assert int(tio.data.io.read_image(nan_path)[0].isnan().sum()) == 0  # why read_volume exists


def test_other_formats_use_torchio_reader(tmp_path: Path) -> None:
    path = write_volume(tmp_path / "ct.nrrd", make_ct(1)[0])
    assert not is_nifti(path) and is_nifti("a.NII.GZ")
    ours, our_affine = read_volume(path)
    theirs, their_affine = tio.data.io.read_image(path)
    assert torch.equal(ours, theirs) and np.allclose(our_affine, their_affine)
