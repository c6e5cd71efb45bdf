"""Every check-data case: the problem is found, and its row names the offending file."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from maesil.data.checks import check_dataset, check_records, format_problem_table, raise_on_errors
from maesil.data.records import DataError, Problem
from maesil.data.sources import discover_subjects

from .conftest import make_ct, write_volume


def _errors(report_or_problems) -> list[Problem]:
    problems = getattr(report_or_problems, "problems", report_or_problems)
    return [p for p in problems if p.severity == "error"]


def _only(problems: list[Problem], path: Path, *fragments: str) -> Problem:
    matching = [p for p in problems if p.path == str(path)]
    assert len(matching) == 1, format_problem_table(problems)
    for fragment in fragments:
        assert fragment in matching[0].message, matching[0]
    return matching[0]


def test_clean_folder_has_no_problem(labeled_ct_dir: Path) -> None:
    report = check_dataset(labeled_ct_dir, superpatch_size=(16, 16, 16), target_spacing=2.0, classes=[0, 1, 2])
    assert report.problems == [] and len(report.records) == 6


def test_unreadable_and_truncated(flat_ct_dir: Path) -> None:
    rng = np.random.default_rng(0)
    garbage = flat_ct_dir / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(rng.bytes(5000)))
    good = (flat_ct_dir / "case_000.nii.gz").read_bytes()
    truncated = flat_ct_dir / "truncated.nii.gz"
    truncated.write_bytes(good[: len(good) * 2 // 3])
    errors = _errors(check_dataset(flat_ct_dir))
    _only(errors, garbage, "cannot be read")
    _only(errors, truncated, "truncated")
    assert len(errors) == 2


def test_2d_and_4d_images(flat_ct_dir: Path) -> None:
    flat = write_volume(flat_ct_dir / "slice.nii.gz", np.zeros((40, 36, 1), np.int16))
    four_d = flat_ct_dir / "series4d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.int16), np.eye(4)), str(four_d))
    errors = _errors(check_dataset(flat_ct_dir))
    _only(errors, flat, "is 2D")
    _only(errors, four_d, "4D")


def test_nan_and_inf_voxels(flat_ct_dir: Path) -> None:
    ct = make_ct(7)[0].astype(np.float32)
    ct[3, 4, 5] = np.nan
    ct[1, 1, 1] = np.inf
    path = flat_ct_dir / "nan.nii.gz"
    nib.save(nib.Nifti1Image(ct, np.diag([2.0, 2.0, 3.0, 1.0])), str(path))
    errors = _errors(check_dataset(flat_ct_dir))
    _only(errors, path, "1 NaN and 1 Inf")
    # header-only checks cannot see voxels
    assert _errors(check_dataset(flat_ct_dir, read_voxels=False)) == []


def test_constant_volume(flat_ct_dir: Path) -> None:
    path = write_volume(flat_ct_dir / "blank.nii.gz", np.full((40, 36, 20), -1000, np.int16))
    _only(_errors(check_dataset(flat_ct_dir)), path, "constant", "-1000")


@pytest.mark.parametrize("spacing", ["2 2 25", "0 2 3", "-1 2 3"])
def test_absurd_spacing(flat_ct_dir: Path, spacing: str) -> None:
    path = write_volume(flat_ct_dir / "odd_spacing.mha", make_ct(5)[0])
    header = path.read_bytes()
    start = header.index(b"ElementSpacing")
    end = header.index(b"\n", start)
    path.write_bytes(header[:start] + f"ElementSpacing = {spacing}".encode() + header[end:])
    _only(_errors(check_dataset(flat_ct_dir)), path, "implausible voxel spacing")


def test_small_volume_is_a_warning(flat_ct_dir: Path) -> None:
    report = check_dataset(flat_ct_dir, superpatch_size=(32, 32, 32), target_spacing=2.0)
    assert report.errors == []
    warning = _only(report.warnings, flat_ct_dir / "case_000.nii.gz", "smaller than one superpatch", "padded")
    assert "40x36x30" in warning.message  # 20 slices of 3 mm at 2 mm
    assert len(report.warnings) == 4


def test_label_shape_and_affine_mismatch(labeled_ct_dir: Path) -> None:
    ct, label = make_ct(0)
    shape_label = write_volume(labeled_ct_dir / "labels" / "case_001.nii.gz", label[:, :, :-2])
    shifted = write_volume(labeled_ct_dir / "labels" / "case_002.nii.gz", label, origin=(5.0, 0.0, 0.0))
    errors = _errors(check_dataset(labeled_ct_dir))
    _only(errors, shape_label, "does not match its image", "size")
    _only(errors, shifted, "does not match its image", "origin")


def test_label_values_outside_classes(labeled_ct_dir: Path) -> None:
    _, label = make_ct(3)
    label[0, 0, 0] = 9
    path = write_volume(labeled_ct_dir / "labels" / "case_003.nii.gz", label)
    errors = _errors(check_dataset(labeled_ct_dir, classes=[0, 1, 2]))
    _only(errors, path, "[9]", "outside the declared classes [0, 1, 2]")
    # without declared classes any non-negative integer is fine
    assert _errors(check_dataset(labeled_ct_dir)) == []


def test_classes_from_dataset_json(labeled_ct_dir: Path) -> None:
    from maesil.data.manifest import declared_classes

    (labeled_ct_dir / "dataset.json").write_text('{"labels": {"0": "background", "1": "organ", "2": "bone"}}')
    assert declared_classes(labeled_ct_dir) == [0, 1, 2]


def test_duplicate_subject_ids(flat_ct_dir: Path) -> None:
    duplicate = write_volume(flat_ct_dir / "other_site" / "case_001.nrrd", make_ct(1)[0])
    errors = _errors(check_dataset(flat_ct_dir))
    assert len(errors) == 1
    assert "duplicate subject id 'case_001'" in errors[0].message
    assert str(duplicate) in str(errors[0]) and str(flat_ct_dir / "case_001.nii.gz") in str(errors[0])


def test_empty_folders(tmp_path: Path, flat_ct_dir: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    errors = _errors(check_dataset(empty))
    _only(errors, empty, "no image found")
    (flat_ct_dir / "study_17").mkdir()
    report = check_dataset(flat_ct_dir)
    assert report.errors == []
    _only(report.warnings, flat_ct_dir / "study_17", "empty folder")


def test_raise_on_errors_lists_every_file(flat_ct_dir: Path) -> None:
    for name in ("a_blank.nii.gz", "b_blank.nii.gz"):
        write_volume(flat_ct_dir / name, np.zeros((40, 36, 20), np.int16))
    problems = check_records(discover_subjects(flat_ct_dir))
    with pytest.raises(DataError) as info:
        raise_on_errors(problems)
    assert len(info.value.problems) == 2
    assert "a_blank.nii.gz: is constant" in str(info.value) and "b_blank.nii.gz: is constant" in str(info.value)


def test_table_has_one_row_per_problem() -> None:
    table = format_problem_table([Problem("/x/b.nii", "bad", "warning"), Problem("/x/a.nii", "worse")])
    lines = table.splitlines()
    assert len(lines) == 4 and lines[2].startswith("error") and "/x/a.nii" in lines[2] and "worse" in lines[2]
