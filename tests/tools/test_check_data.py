"""``python -m maesil check-data``: a table naming each bad file, and the exit code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from maesil.cli import main
from tests.data.conftest import make_ct, write_volume


def _run(capsys, *argv: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(["check-data", *argv])
    return int(info.value.code), capsys.readouterr().out


def test_clean_dataset_exits_zero(labeled_ct_dir: Path, capsys) -> None:
    code, out = _run(capsys, str(labeled_ct_dir), "--superpatch-size", "16", "--num-classes", "3")
    assert code == 0
    assert "6 subject(s), 12 file(s) checked (headers and voxels)" in out and "0 error(s), 0 warning(s)" in out


def test_problems_are_rows_naming_files(labeled_ct_dir: Path, capsys) -> None:
    blank = write_volume(labeled_ct_dir / "images" / "case_001.nii.gz", np.zeros((40, 36, 20), np.int16))
    _, label = make_ct(2)
    label[0, 0, 0] = 7
    bad_label = write_volume(labeled_ct_dir / "labels" / "case_002.nii.gz", label)
    code, out = _run(capsys, str(labeled_ct_dir), "--num-classes", "3", "--superpatch-size", "64")
    assert code == 1
    rows = [line for line in out.splitlines() if line.startswith(("error", "warning"))]
    assert any(str(blank) in row and "constant" in row for row in rows)
    assert any(str(bad_label) in row and "[7]" in row for row in rows)
    assert sum(row.startswith("warning") and "smaller than one superpatch" in row for row in rows) == 6
    assert "2 error(s), 6 warning(s)" in out


def test_options_from_training_config(labeled_ct_dir: Path, tmp_path: Path, capsys) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(
        "data:\n  class_path: maesil.data.VolumeDataModule\n  init_args:\n"
        f"    data_dir: {labeled_ct_dir}\n    superpatch_size: 8\n    target_spacing: 2.0\n    num_classes: 2\n"
    )
    code, out = _run(capsys, "--config", str(config))
    assert code == 1  # label value 2 (bone) is outside 0..1
    assert "outside the declared classes [0, 1]" in out


def test_missing_folder(tmp_path: Path, capsys) -> None:
    code, out = _run(capsys, str(tmp_path / "nowhere"))
    assert code == 1 and "does not exist" in out


def test_dicom_problems_name_the_study_folder(tmp_path: Path, capsys) -> None:
    from tests.data.dicom_factory import write_dicom_series

    ct = make_ct(0)[0].astype(np.float32)
    write_dicom_series(tmp_path / "pacs" / "good", ct, spacing=(2.0, 2.0, 3.0), series_uid="1.2.3.1")
    write_dicom_series(tmp_path / "pacs" / "gap", ct, spacing=(2.0, 2.0, 3.0), series_uid="1.2.3.2", drop_slice=7)
    code, out = _run(capsys, str(tmp_path / "pacs"), "--superpatch-size", "8")
    assert code == 1
    rows = [line for line in out.splitlines() if line.startswith("error")]
    assert len(rows) == 1 and str(tmp_path / "pacs" / "gap") in rows[0] and "uneven slice spacing" in rows[0]
    assert "2 subject(s)" in out


def test_manifest_is_checked(labeled_ct_dir: Path, capsys) -> None:
    manifest = labeled_ct_dir / "subjects.csv"
    manifest.write_text("image,label\nimages/case_000.nii.gz,labels/case_000.nii.gz\nimages/gone.nii.gz,\n")
    code, out = _run(capsys, str(manifest))
    assert code == 1 and str(labeled_ct_dir / "images" / "gone.nii.gz") in out and "row 2 does not exist" in out


def test_link_loop_is_one_warning_and_files_are_checked_once(labeled_ct_dir: Path, capsys) -> None:
    link = labeled_ct_dir / "images" / "nested" / "back"
    link.parent.mkdir()
    link.symlink_to("../..")  # the data folder itself
    code, out = _run(capsys, str(labeled_ct_dir), "--superpatch-size", "16", "--num-classes", "3")
    assert code == 0
    rows = [line for line in out.splitlines() if line.startswith(("error", "warning"))]
    assert len(rows) == 1 and rows[0].startswith("warning") and str(link) in rows[0]
    assert f"symbolic link back to {labeled_ct_dir}" in rows[0] and "loop" in rows[0]
    assert "6 subject(s), 12 file(s) checked" in out and "0 error(s), 1 warning(s)" in out

