"""CSV/JSON manifests: paths, ids, splits, and row problems named with the manifest and row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from maesil.data.manifest import declared_classes, read_manifest
from maesil.data.records import DataError
from maesil.data.sources import discover_subjects


def test_csv_manifest(labeled_ct_dir: Path, tmp_path: Path) -> None:
    manifest = labeled_ct_dir / "subjects.csv"
    manifest.write_text(
        "subject_id,image,label,split\n"
        "first,images/case_000.nii.gz,labels/case_000.nii.gz,train\n"
        f",{labeled_ct_dir / 'images' / 'case_001.nii.gz'},labels/case_001.nii.gz,VAL\n"
        "third,images/case_002.nii.gz,,test\n"
    )
    records = discover_subjects(manifest)
    by_id = {r.subject_id: r for r in records}
    assert sorted(by_id) == ["case_001", "first", "third"]  # id defaults to the file name
    assert by_id["first"].image == labeled_ct_dir / "images" / "case_000.nii.gz"  # relative to the manifest
    assert by_id["first"].label == labeled_ct_dir / "labels" / "case_000.nii.gz"
    assert [by_id[k].split for k in ("first", "case_001", "third")] == ["train", "val", "test"]
    assert by_id["third"].label is None


def test_json_manifest_forms(labeled_ct_dir: Path) -> None:
    rows = [{"image": "images/case_000.nii.gz", "label": "labels/case_000.nii.gz", "series_uid": None}]
    for name, content in (("list.json", rows), ("obj.json", {"subjects": rows})):
        (labeled_ct_dir / name).write_text(json.dumps(content))
        [record] = discover_subjects(labeled_ct_dir / name)
        assert record.subject_id == "case_000" and record.label is not None
    decathlon = {
        "labels": {"0": "background", "1": "organ", "2": "bone"},
        "training": [{"image": f"./images/case_00{i}.nii.gz", "label": f"./labels/case_00{i}.nii.gz"} for i in range(3)],
        "test": ["./images/case_005.nii.gz"],
    }
    (labeled_ct_dir / "dataset.json").write_text(json.dumps(decathlon))
    records = discover_subjects(labeled_ct_dir / "dataset.json")
    assert [(r.subject_id, r.split) for r in records] == [
        ("case_000", None), ("case_001", None), ("case_002", None), ("case_005", "test")]
    assert declared_classes(labeled_ct_dir / "dataset.json") == [0, 1, 2]


def test_row_problems_name_manifest_and_row(labeled_ct_dir: Path) -> None:
    manifest = labeled_ct_dir / "bad.csv"
    manifest.write_text(
        "subject_id,image,label,split\n"
        "a,images/missing.nii.gz,,\n"
        "b,images/case_000.nii.gz,labels/nope.nii.gz,\n"
        "c,images/case_001.nii.gz,,holdout\n"
        "d,images/case_002.nii.gz,,\n"
        "d,images/case_003.nii.gz,,\n"
        "e,,,\n"
    )
    records, problems = read_manifest(manifest)
    assert [r.subject_id for r in records] == ["d"]
    text = "\n".join(str(p) for p in problems)
    assert f"{labeled_ct_dir / 'images' / 'missing.nii.gz'}: image listed in {manifest} row 1 does not exist" in text
    assert f"{labeled_ct_dir / 'labels' / 'nope.nii.gz'}: label listed in {manifest} row 2 does not exist" in text
    assert f"{manifest} row 3: unknown split 'holdout'" in text
    assert f"{manifest} row 5: duplicate subject id 'd' (first in {manifest} row 4)" in text
    assert f"{manifest} row 6: no image path" in text
    with pytest.raises(DataError):
        discover_subjects(manifest)


@pytest.mark.parametrize(
    ("content", "message"),
    [("", "empty manifest"), ("path,label\nx.nii.gz,\n", "no 'image' column"), ("image\n", "lists no subject")],
)
def test_malformed_csv(tmp_path: Path, content: str, message: str) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        discover_subjects(manifest)
    assert str(manifest) in str(info.value)


def test_malformed_json(tmp_path: Path) -> None:
    manifest = tmp_path / "m.json"
    manifest.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        discover_subjects(manifest)
    manifest.write_text('{"cases": []}')
    with pytest.raises(DataError, match="must be a list of subjects"):
        discover_subjects(manifest)


def test_manifest_series_uid_picks_the_series(tmp_path: Path) -> None:
    import numpy as np

    from maesil.data.io import subject_from_record

    from .dicom_factory import write_dicom_series

    study = tmp_path / "study"
    write_dicom_series(study, np.zeros((8, 6, 7), np.float32), series_uid="1.2.3.1",  # largest CT: the default
                       file_names=[f"a{k}.dcm" for k in range(7)])
    write_dicom_series(study, np.full((8, 6, 4), 40.0, np.float32), series_uid="1.2.3.2",
                       file_names=[f"b{k}.dcm" for k in range(4)])
    manifest = tmp_path / "m.csv"
    manifest.write_text("subject_id,image,series_uid\ndefault,study,\npinned,study,1.2.3.2\n")
    records = {r.subject_id: r for r in discover_subjects(manifest)}
    assert records["pinned"].series_uid == "1.2.3.2" and records["default"].series_uid is None
    pinned = subject_from_record(records["pinned"], with_label=False)
    default = subject_from_record(records["default"], with_label=False)
    assert pinned["image"].spatial_shape == (8, 6, 4) and float(pinned["image"].data.mean()) == 40.0
    assert default["image"].spatial_shape == (8, 6, 7)
