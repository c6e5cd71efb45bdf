from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchio as tio

from maesil.data.preprocess import HUWindow, PadToMinShape, build_preprocessing
from maesil.data.records import DataError

from .conftest import SHAPE, make_ct, write_volume


def _subject(image: Path, label: Path | None = None) -> tio.Subject:
    images = {"image": tio.ScalarImage(image)}
    if label is not None:
        images["label"] = tio.LabelMap(label)
    return tio.Subject(subject_id=image.name, **images)


def test_canonical_orientation_from_lps(tmp_path: Path) -> None:
    # SimpleITK identity direction = voxel axes along L, P, S (nibabel code "LPS")
    array = np.zeros(SHAPE, np.int16)
    array[0, 0, 0] = 1000
    array[0, 0, 5] = 100
    path = write_volume(tmp_path / "lps.nii.gz", array)
    assert tio.ScalarImage(path).orientation == ("L", "P", "S")
    out = build_preprocessing(target_spacing=None)(_subject(path))
    image = out["image"]
    assert image.orientation == ("R", "A", "S")
    assert image.shape == (1, *SHAPE)
    data = image.data[0]
    x, y = SHAPE[0] - 1, SHAPE[1] - 1
    assert data[x, y, 0] == 1.0 and data[x, y, 5] == pytest.approx((100 + 175) / 425)


def test_canonical_orientation_permuted_axes(tmp_path: Path) -> None:
    array = np.zeros(SHAPE, np.int16)
    array[3, 0, 0] = 1000
    # voxel axis 0 -> superior, axis 1 -> left, axis 2 -> posterior (LPS world of SimpleITK)
    direction = (0, 1, 0, 0, 0, 1, 1, 0, 0)
    path = write_volume(tmp_path / "permuted.nii.gz", array, spacing=(3.0, 2.0, 2.0), direction=direction)
    out = build_preprocessing(target_spacing=None)(_subject(path))["image"]
    assert out.orientation == ("R", "A", "S")
    assert out.shape == (1, SHAPE[1], SHAPE[2], SHAPE[0])  # X <- axis 1, Y <- axis 2, Z <- axis 0
    assert out.spacing == pytest.approx((2.0, 2.0, 3.0))
    assert tuple(torch.nonzero(out.data[0] == 1.0)[0].tolist()) == (SHAPE[1] - 1, SHAPE[2] - 1, 3)


def test_resample_spacing_and_label_nearest(tmp_path: Path) -> None:
    ct, label = make_ct(0)
    image_path = write_volume(tmp_path / "img.nii.gz", ct)
    label_path = write_volume(tmp_path / "lab.nii.gz", label)
    out = build_preprocessing(target_spacing=(3.0, 3.0, 2.0))(_subject(image_path, label_path))
    assert out["image"].spacing == pytest.approx((3.0, 3.0, 2.0))
    assert out["label"].spacing == pytest.approx((3.0, 3.0, 2.0))
    assert out["image"].shape == out["label"].shape
    assert set(torch.unique(out["label"].data).tolist()) <= {0, 1, 2}
    iso = build_preprocessing(target_spacing=4.0)(_subject(image_path))["image"]
    assert iso.spacing == pytest.approx((4.0, 4.0, 4.0))
    assert iso.data.dtype == torch.float32


def test_ct_window_maps_exactly(tmp_path: Path) -> None:
    values = np.array([-3000, -1000, -175, 37.5, 250, 251, 3000], np.float32)
    array = np.zeros(SHAPE, np.float32)
    array[: len(values), 0, 0] = values
    path = write_volume(tmp_path / "ct.nii.gz", array)
    out = build_preprocessing(target_spacing=None)(_subject(path))["image"].data[0]
    # canonical flips X and Y of the LPS file
    got = out[SHAPE[0] - 1 - np.arange(len(values)), SHAPE[1] - 1, 0]
    assert got.tolist() == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0]
    assert out.dtype == torch.float32


def test_ct_values_in_unit_range_after_resampling(tmp_path: Path) -> None:
    path = write_volume(tmp_path / "ct.nii.gz", make_ct(0)[0])
    out = build_preprocessing(target_spacing=1.7)(_subject(path))["image"].data
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0  # air and bone saturate


def test_hu_window_custom() -> None:
    subject = tio.Subject(image=tio.ScalarImage(tensor=torch.tensor([-1000.0, 0.0, 500.0, 1000.0]).view(1, 4, 1, 1)))
    out = HUWindow((-1000, 1000))(subject)["image"].data.flatten().tolist()
    assert out == [0.0, 0.5, 0.75, 1.0]


def test_mri_znormalization(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    array = np.zeros(SHAPE, np.float32)
    array[8:32, 6:30, 4:16] = rng.normal(600, 80, size=(24, 24, 12))
    array += np.abs(rng.normal(0, 5, size=SHAPE)).astype(np.float32)
    path = write_volume(tmp_path / "mri.nii.gz", array)
    whole = build_preprocessing("mri", target_spacing=None, mri_mask_background=False,
                                crop_foreground=False)(_subject(path))["image"].data
    assert float(whole.mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(whole.std()) == pytest.approx(1.0, abs=1e-3)
    masked = build_preprocessing("mri", target_spacing=None)(_subject(path))["image"].data
    foreground = masked[0][masked[0] > masked[0].min() + 1]  # the bright block
    assert float(foreground.mean()) == pytest.approx(0.0, abs=0.05)
    assert float(foreground.std()) == pytest.approx(1.0, abs=0.05)
    # padding uses the background (volume minimum)
    padded = build_preprocessing("mri", target_spacing=None, min_shape=(48, 36, 24), crop_foreground=False)(
        _subject(path)
    )["image"].data
    assert padded.shape == (1, 48, 36, 24)
    assert float(padded[0, 0, 0, 0]) == pytest.approx(float(padded.min()))


def test_pad_to_min_shape(tmp_path: Path) -> None:
    ct, label = make_ct(0)
    image_path = write_volume(tmp_path / "img.nii.gz", ct)
    label_path = write_volume(tmp_path / "lab.nii.gz", label)
    out = build_preprocessing(target_spacing=None, min_shape=(48, 30, 25))(_subject(image_path, label_path))
    assert out["image"].shape == (1, 48, 36, 25)  # pads X and Z, never crops Y
    assert out["label"].shape == (1, 48, 36, 25)
    assert float(out["image"].data[0, :4].abs().max()) == 0.0  # CT pad value: 0 (air)
    assert int(out["label"].data[0, :4].abs().max()) == 0
    # centred padding keeps physical positions: X gets 4 + 4 voxels, Z gets 2 + 3
    before = build_preprocessing(target_spacing=None)(_subject(image_path))["image"]
    assert np.allclose(out["image"].affine @ [4, 0, 2, 1], before.affine @ [0, 0, 0, 1])
    assert torch.equal(out["image"].data[:, 4:44, :, 2:22], before.data)
    # no-op when already large enough
    same = PadToMinShape((8, 8, 8))(tio.Subject(image=tio.ScalarImage(tensor=torch.zeros(1, 9, 9, 9))))
    assert same.spatial_shape == (9, 9, 9)


def test_nan_voxels_raise_naming_file(tmp_path: Path) -> None:
    # .nrrd: ITK's NIfTI reader (used by TorchIO) turns NaN/Inf of .nii files into 0 itself
    array = make_ct(0)[0].astype(np.float32)
    array[3, 4, 5] = np.nan
    array[1, 1, 1] = np.inf
    path = write_volume(tmp_path / "nan.nrrd", array)
    with pytest.raises(DataError, match=r"nan\.nrrd: contains 1 NaN and 1 Inf voxel"):
        build_preprocessing()(_subject(path))


def test_unreadable_data_raises_naming_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"broken\.nii\.gz: cannot be loaded"), pytest.warns(UserWarning):
        build_preprocessing()(_subject(path))


def test_crop_foreground_keeps_body_box_with_margin_for_image_and_label() -> None:
    from maesil.data.preprocess import CropForeground

    hu = torch.full((1, 40, 30, 20), -1000.0)
    hu[:, 10:20, 5:25, 3:9] = 40.0  # the body
    label = torch.zeros(1, 40, 30, 20, dtype=torch.uint8)
    label[:, 12:14, 6:8, 4:6] = 1
    subject = tio.Subject(image=tio.ScalarImage(tensor=hu), label=tio.LabelMap(tensor=label))
    out = CropForeground(margin=2)(HUWindow()(subject))
    assert out.spatial_shape == (10 + 4, 20 + 4, 6 + 4)
    assert out["label"].spatial_shape == out.spatial_shape
    assert int(out["label"].data.sum()) == int(label.sum())
    # the crop moves the origin with it, so world coordinates of the body are unchanged
    assert np.allclose(out["image"].affine[:3, 3], np.array([8.0, 3.0, 1.0]))


def test_crop_foreground_leaves_empty_volume_alone() -> None:
    from maesil.data.preprocess import CropForeground

    air = tio.Subject(image=tio.ScalarImage(tensor=torch.zeros(1, 8, 8, 8)))
    assert CropForeground()(air).spatial_shape == (8, 8, 8)
    with pytest.raises(ValueError, match="margin"):
        CropForeground(margin=-1)
