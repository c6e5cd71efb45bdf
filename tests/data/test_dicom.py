import logging
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torchio as tio

from maesil.data.dicom import (
    is_dicom_file,
    list_series,
    read_dicom,
    select_series,
    series_geometry,
    series_problems,
)
from maesil.data.io import read_volume
from maesil.data.records import DataError

from .dicom_factory import stored_pixels, write_dicom_series, write_enhanced_ct

SHAPE = (8, 6, 5)  # X, Y, Z
SPACING = (0.7, 0.8, 2.5)
ORIGIN = (-12.5, 30.0, 100.0)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def hu_volume(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """Distinct integer HU values per voxel (so any slice mix-up shows), air to bone."""
    rng = np.random.default_rng(seed)
    return rng.integers(-1000, 2000, size=shape).astype(np.int16)


def as_xyz(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image).transpose()


def test_factory_stores_values_minus_intercept(tmp_path: Path) -> None:
    hu = hu_volume()
    paths = write_dicom_series(tmp_path / "s", hu, SPACING, ORIGIN, intercept=-1024)
    assert np.array_equal(stored_pixels(paths[2], SHAPE[:2]), hu[:, :, 2] + 1024)


def test_detects_dicom_by_magic_or_extension(tmp_path: Path) -> None:
    paths = write_dicom_series(tmp_path / "s", hu_volume(), extension="")
    assert paths[0].suffix == "" and is_dicom_file(paths[0])
    (tmp_path / "notes").write_text("not dicom")
    assert not is_dicom_file(tmp_path / "notes") and not is_dicom_file(tmp_path / "s")


@pytest.mark.parametrize("extension", [".dcm", ""])
def test_shuffled_names_read_in_position_order_with_hu_and_geometry(tmp_path: Path, extension: str) -> None:
    hu = hu_volume(1)
    paths = write_dicom_series(tmp_path / "s", hu, SPACING, ORIGIN, shuffle_names=True, extension=extension)
    assert [p.name for p in paths] != sorted(p.name for p in paths)  # name order is not position order

    image = read_dicom(tmp_path / "s")
    assert image.GetPixelID() == sitk.sitkFloat32
    assert np.array_equal(as_xyz(image), hu.astype(np.float32))  # HU: stored + intercept
    assert np.allclose(image.GetSpacing(), SPACING) and np.allclose(image.GetOrigin(), ORIGIN)
    size, spacing, origin, direction = series_geometry(select_series(tmp_path / "s"))
    assert size == image.GetSize() and np.allclose(spacing, image.GetSpacing())
    assert np.allclose(origin, image.GetOrigin()) and np.allclose(direction, image.GetDirection())


def test_oblique_flipped_orientation(tmp_path: Path) -> None:
    # rows along L, columns along -P, slices towards -S (feet first), so the z axis is (0, 0, -1)
    direction = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, -1.0)
    hu = hu_volume(2)
    write_dicom_series(tmp_path / "s", hu, SPACING, ORIGIN, direction=direction, shuffle_names=True)
    image = read_dicom(tmp_path / "s")
    assert np.array_equal(as_xyz(image), hu)
    assert np.allclose(image.GetDirection(), direction) and np.allclose(image.GetOrigin(), ORIGIN)


def test_read_volume_on_folder_gives_tensor_and_ras_affine(tmp_path: Path) -> None:
    hu = hu_volume(3)
    write_dicom_series(tmp_path / "study", hu, SPACING, ORIGIN)
    tensor, affine = read_volume(tmp_path / "study")
    assert tensor.shape == (1, *SHAPE) and tensor.dtype == torch.float32
    assert torch.equal(tensor[0], torch.from_numpy(hu.astype(np.float32)))
    assert np.allclose(affine[:3, :3], LPS_TO_RAS @ np.diag(SPACING))  # RAS flips L/P of SimpleITK's LPS
    assert np.allclose(affine[:3, 3], LPS_TO_RAS @ np.asarray(ORIGIN))

    image = tio.ScalarImage(tmp_path / "study", reader=read_volume)
    assert image.shape == (1, *SHAPE) and np.allclose(image.spacing, SPACING)


def test_largest_ct_series_chosen_by_default_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "study"
    small, large = hu_volume(4, (8, 6, 3)), hu_volume(5, (8, 6, 5))
    mr = hu_volume(6, (8, 6, 7))
    write_dicom_series(folder, small, series_uid="1.2.3.1", file_names=[f"a{i}" for i in range(3)], extension="")
    write_dicom_series(folder, large, series_uid="1.2.3.2", file_names=[f"b{i}.dcm" for i in range(5)], description="Abdomen")
    write_dicom_series(folder, mr, series_uid="1.2.3.3", modality="MR", intercept=0, file_names=[f"c{i}" for i in range(7)])
    assert [s.series_uid for s in list_series(folder)] == ["1.2.3.3", "1.2.3.2", "1.2.3.1"]

    with caplog.at_level(logging.INFO, logger="maesil.data.dicom"):
        chosen = select_series(folder)
    assert chosen.series_uid == "1.2.3.2"  # the larger MR series is not the default
    assert chosen.modality == "CT" and chosen.num_slices == 5 and chosen.num_frames == 1
    message = caplog.text
    assert str(folder) in message and "1.2.3.2" in message and "5 slices" in message and "Abdomen" in message
    assert "1.2.3.1" in message and "1.2.3.3" in message  # the others are named too

    assert np.array_equal(as_xyz(read_dicom(folder)), large)
    assert np.array_equal(as_xyz(read_dicom(folder, "1.2.3.1")), small)
    assert np.array_equal(as_xyz(read_dicom(folder, "1.2.3.3")), mr)
    assert read_volume(folder, series_uid="1.2.3.1")[0].shape == (1, 8, 6, 3)


def test_largest_series_when_none_is_ct(tmp_path: Path) -> None:
    write_dicom_series(tmp_path, hu_volume(7, (8, 6, 3)), series_uid="9.1", modality="MR", intercept=0)
    write_dicom_series(
        tmp_path, hu_volume(8, (8, 6, 4)), series_uid="9.2", modality="MR", intercept=0, file_names=[f"x{i}" for i in range(4)]
    )
    assert select_series(tmp_path).series_uid == "9.2"


def test_unknown_uid_lists_available_series(tmp_path: Path) -> None:
    write_dicom_series(tmp_path / "s", hu_volume(), series_uid="1.2.3.4")
    with pytest.raises(DataError) as err:
        read_dicom(tmp_path / "s", series_uid="5.6.7")
    message = str(err.value)
    assert str(tmp_path / "s") in message and "5.6.7" in message and "1.2.3.4" in message
    with pytest.raises(DataError, match="no readable DICOM"):
        select_series(tmp_path)  # holds only a folder


def test_missing_slice_is_refused_naming_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "study1"
    write_dicom_series(folder, hu_volume(0, (8, 6, 7)), SPACING, ORIGIN, series_uid="1.2.3", drop_slice=3)
    problems = series_problems(select_series(folder))
    assert len(problems) == 1
    assert problems[0].startswith(f"{folder}: series 1.2.3 has uneven slice spacing: gap of 5.0 mm between slices 3 and 4")
    assert "where 2.5 mm is expected (missing slice?)" in problems[0]
    with pytest.raises(DataError, match="missing slice") as err:
        read_volume(folder)
    assert str(folder) in str(err.value)


def test_duplicate_positions_and_inconsistent_geometry_are_refused(tmp_path: Path) -> None:
    hu = hu_volume()
    # the same series written twice under other names: every position is duplicated
    write_dicom_series(tmp_path / "dup", hu, series_uid="4.4")
    write_dicom_series(tmp_path / "dup", hu, series_uid="4.4", file_names=[f"copy{i}" for i in range(5)])
    (problem,) = series_problems(select_series(tmp_path / "dup"))
    assert problem.startswith(f"{tmp_path / 'dup'}: series 4.4 has duplicate slice positions")

    # slice 2 replaced by one of another in-plane size, at the same position
    slice2 = (ORIGIN[0], ORIGIN[1], ORIGIN[2] + 2 * SPACING[2])
    write_dicom_series(tmp_path / "size", hu, SPACING, ORIGIN, series_uid="5.5")
    write_dicom_series(tmp_path / "size", hu_volume(1, (8, 7, 1)), SPACING, slice2, series_uid="5.5", file_names=["IM0002.dcm"])
    (problem,) = series_problems(select_series(tmp_path / "size"))
    assert problem.startswith(f"{tmp_path / 'size'}: series 5.5 has inconsistent slice size")

    # slice 2 replaced by a tilted one
    tilted = (1.0, 0.0, 0.0, 0.0, 0.9950042, 0.0998334, 0.0, -0.0998334, 0.9950042)
    write_dicom_series(tmp_path / "orient", hu, SPACING, ORIGIN, series_uid="6.6")
    write_dicom_series(
        tmp_path / "orient", hu[:, :, :1], SPACING, slice2, series_uid="6.6", direction=tilted, file_names=["IM0002.dcm"]
    )
    (problem,) = series_problems(select_series(tmp_path / "orient"))
    assert problem.startswith(f"{tmp_path / 'orient'}: series 6.6 has inconsistent orientation")
    with pytest.raises(DataError, match="inconsistent orientation"):
        read_dicom(tmp_path / "orient")


def test_enhanced_multiframe_ct_read_as_volume(tmp_path: Path) -> None:
    hu = hu_volume(9)
    path = write_enhanced_ct(tmp_path / "enh" / "CT000001", hu, SPACING, ORIGIN, series_uid="7.7")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    assert reader.GetMetaData("0028|0008").strip() == str(SHAPE[2])  # NumberOfFrames: a real multi-frame file

    (series,) = list_series(tmp_path / "enh")
    assert series.is_multiframe and series.num_frames == SHAPE[2] and series.num_slices == SHAPE[2]
    assert series_problems(series) == []
    image = read_dicom(tmp_path / "enh")
    assert np.array_equal(as_xyz(image), hu) and image.GetPixelID() == sitk.sitkFloat32
    assert np.allclose(image.GetSpacing(), SPACING) and np.allclose(image.GetOrigin(), ORIGIN)
    assert series_geometry(series)[0] == SHAPE
    assert read_volume(tmp_path / "enh")[0].shape == (1, *SHAPE)
