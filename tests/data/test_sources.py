from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np
import pytest

from maesil.data.checks import check_headers
from maesil.data.records import DataError, SubjectRecord
from maesil.data.sources import discover_subjects, scan_subjects

from .conftest import make_ct, write_volume



def _check(root: Path, **kwargs) -> list[SubjectRecord]:
    records = discover_subjects(root, **kwargs)
    check_headers(records)
    return records


# ---------------------------------------------------------------- discovery


def test_flat_folder(flat_ct_dir: Path) -> None:
    records = _check(flat_ct_dir)
    assert [r.subject_id for r in records] == [f"case_{i:03d}" for i in range(4)]
    assert all(r.label is None and r.image.is_file() for r in records)


def test_images_labels_layout(labeled_ct_dir: Path) -> None:
    (labeled_ct_dir / "dataset.json").write_text("{}")  # ignored: outside images/
    records = _check(labeled_ct_dir)
    assert len(records) == 6
    for r in records:
        assert r.image.parent.name == "images" and r.label is not None
        assert r.label.parent.name == "labels" and r.label.name == r.image.name


def test_decathlon_names_and_mixed_formats(tmp_path: Path) -> None:
    ct, label = make_ct(0)
    write_volume(tmp_path / "imagesTr" / "a.nii.gz", ct)
    write_volume(tmp_path / "labelsTr" / "a.nrrd", label)  # paired by id, not extension
    write_volume(tmp_path / "imagesTr" / "b.mha", ct)
    write_volume(tmp_path / "labelsTr" / "b.nii", label)
    write_volume(tmp_path / "imagesTr" / "c.mhd", ct)  # writes c.raw next to it
    write_volume(tmp_path / "labelsTr" / "c.nii.gz", label)
    assert (tmp_path / "imagesTr" / "c.raw").exists()
    records = _check(tmp_path)
    assert [(r.subject_id, r.label.name) for r in records] == [("a", "a.nrrd"), ("b", "b.nii"), ("c", "c.nii.gz")]


def test_nested_folders(tmp_path: Path) -> None:
    ct, _ = make_ct(0)
    write_volume(tmp_path / "site1" / "p1" / "scan_a.nii.gz", ct)
    write_volume(tmp_path / "site2" / "scan_b.nrrd", ct)
    records = _check(tmp_path)
    assert [r.subject_id for r in records] == ["scan_a", "scan_b"]


def test_id_collision_names_both(tmp_path: Path) -> None:
    ct, _ = make_ct(0)
    write_volume(tmp_path / "a" / "x.nii.gz", ct)
    write_volume(tmp_path / "b" / "x.nii.gz", ct)
    write_volume(tmp_path / "y.nii", ct)
    write_volume(tmp_path / "y.nii.gz", ct)
    with pytest.raises(DataError) as info:
        discover_subjects(tmp_path)
    message = str(info.value)
    for path in ("a/x.nii.gz", "b/x.nii.gz", "y.nii:", "y.nii.gz"):
        assert path in message.replace(str(tmp_path) + "/", "")
    assert "'x'" in message and "'y'" in message and len(info.value.problems) == 2


def test_exclude_patterns(flat_ct_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    (flat_ct_dir / ".DS_Store").write_bytes(b"\0\1")
    (flat_ct_dir / "README.md").write_text("docs")
    (flat_ct_dir / ".cache").mkdir()
    (flat_ct_dir / ".cache" / "junk.nii.gz").write_bytes(b"junk")
    (flat_ct_dir / "notes.docx").write_bytes(b"PK\3\4")
    (flat_ct_dir / "old").mkdir()
    write_volume(flat_ct_dir / "old" / "case_000.nii.gz", make_ct(0)[0])  # would collide
    with caplog.at_level(logging.INFO, logger="maesil.data.sources"):
        records = discover_subjects(flat_ct_dir, exclude=[".*", "*.md", "*.docx", "old"])
    assert len(records) == 4
    logged = caplog.text
    for name in (".DS_Store", "README.md", "junk.nii.gz", "notes.docx", "old/case_000.nii.gz"):
        assert name in logged
    # without the patterns, nothing is silently skipped
    with pytest.raises(DataError) as info:
        discover_subjects(flat_ct_dir, exclude=[])
    message = str(info.value)
    assert ".DS_Store" in message and "notes.docx" in message and "'case_000'" in message


# ---------------------------------------------------------------- bad input


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"does_not_exist.*does not exist"):
        discover_subjects(tmp_path / "does_not_exist")


def test_path_is_a_file(tmp_path: Path) -> None:
    path = write_volume(tmp_path / "one.nii.gz", make_ct(0)[0])
    with pytest.raises(DataError, match=r"one\.nii\.gz.*is a file"):
        discover_subjects(path)


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "README.md").write_text("only docs")
    with pytest.raises(DataError, match=r"data: no image found"):
        discover_subjects(tmp_path / "data")


def test_non_image_file(flat_ct_dir: Path) -> None:
    (flat_ct_dir / "notes.docx").write_bytes(b"PK\3\4")
    with pytest.raises(DataError) as info:
        discover_subjects(flat_ct_dir)
    message = str(info.value)
    assert str(flat_ct_dir / "notes.docx") in message
    assert "not a supported image file" in message and ".nii.gz" in message
    assert "exclude" in message and "'*.docx'" in message


def test_orphan_raw_is_not_an_image(tmp_path: Path) -> None:
    write_volume(tmp_path / "a.mhd", make_ct(0)[0])
    (tmp_path / "stray.raw").write_bytes(b"\0" * 16)
    with pytest.raises(DataError, match=r"stray\.raw: not a supported image file"):
        discover_subjects(tmp_path)


def test_garbage_and_truncated_files(flat_ct_dir: Path) -> None:
    rng = np.random.default_rng(0)
    (flat_ct_dir / "garbage.nii.gz").write_bytes(rng.bytes(5000))
    (flat_ct_dir / "gzipped_garbage.nii.gz").write_bytes(gzip.compress(rng.bytes(5000)))
    good = (flat_ct_dir / "case_000.nii.gz").read_bytes()
    (flat_ct_dir / "truncated.nii.gz").write_bytes(good[: len(good) * 2 // 3])
    raw = write_volume(flat_ct_dir / "truncated_raw.nii", make_ct(1)[0])
    raw.write_bytes(raw.read_bytes()[:20000])
    records = discover_subjects(flat_ct_dir)
    with pytest.raises(DataError) as info:
        check_headers(records)
    problems = info.value.problems
    assert len(problems) == 4, problems
    text = str(info.value)
    assert f"{flat_ct_dir / 'garbage.nii.gz'}: cannot be read" in text
    assert f"{flat_ct_dir / 'gzipped_garbage.nii.gz'}: cannot be read" in text
    assert f"{flat_ct_dir / 'truncated.nii.gz'}: is truncated" in text
    assert f"{flat_ct_dir / 'truncated_raw.nii'}: is truncated" in text


def test_2d_and_4d_images(tmp_path: Path) -> None:
    ct, _ = make_ct(0)
    write_volume(tmp_path / "ok.nii.gz", ct)
    write_volume(tmp_path / "flat2d.nii.gz", ct[:, :, 0], spacing=(2, 2))
    write_volume(tmp_path / "singleton.nii.gz", ct[:, :, :1])
    write_volume(tmp_path / "series4d.nii.gz", np.stack([ct] * 3, axis=-1), spacing=(2, 2, 3, 1))
    write_volume(tmp_path / "rgb.nrrd", np.stack([ct] * 3, axis=-1), is_vector=True)
    with pytest.raises(DataError) as info:
        _check(tmp_path)
    text = str(info.value)
    assert len(info.value.problems) == 4
    assert f"{tmp_path / 'flat2d.nii.gz'}: is 2D (size 40x36)" in text
    assert f"{tmp_path / 'singleton.nii.gz'}: is 2D (size 40x36x1)" in text
    assert f"{tmp_path / 'series4d.nii.gz'}: is 4D (size 40x36x20x3)" in text
    assert f"{tmp_path / 'rgb.nrrd'}: has 3 components" in text


def test_label_geometry_mismatch(labeled_ct_dir: Path) -> None:
    ct, label = make_ct(1)
    labels = labeled_ct_dir / "labels"
    write_volume(labels / "case_001.nii.gz", label, spacing=(2.0, 2.0, 2.5))
    write_volume(labels / "case_002.nii.gz", label[:, :, :-2])
    write_volume(labels / "case_003.nii.gz", label, origin=(5.0, 0.0, 0.0))
    write_volume(labels / "case_004.nii.gz", label, direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))
    # within tolerance (float32 header noise): accepted
    write_volume(labels / "case_005.nii.gz", label, spacing=(2.0000001, 2.0, 3.0), origin=(1e-4, 0, 0))
    with pytest.raises(DataError) as info:
        _check(labeled_ct_dir)
    problems = info.value.problems
    assert len(problems) == 4, problems
    images = labeled_ct_dir / "images"
    for i, what in ((1, "spacing"), (2, "size"), (3, "origin"), (4, "direction")):
        line = next(p for p in problems if f"case_00{i}" in p)
        assert str(labels / f"case_00{i}.nii.gz") in line and str(images / f"case_00{i}.nii.gz") in line
        assert f"label {what}" in line


def test_unpaired_labels_and_images(labeled_ct_dir: Path) -> None:
    (labeled_ct_dir / "labels" / "case_000.nii.gz").unlink()
    write_volume(labeled_ct_dir / "labels" / "extra.nii.gz", make_ct(0)[1])
    with pytest.raises(DataError) as info:
        discover_subjects(labeled_ct_dir)
    text = str(info.value)
    assert f"{labeled_ct_dir / 'labels' / 'extra.nii.gz'}: label without an image" in text
    assert f"{labeled_ct_dir / 'images' / 'case_000.nii.gz'}: image without a label" in text


def test_all_problems_reported_at_once(flat_ct_dir: Path) -> None:
    (flat_ct_dir / "a.docx").write_bytes(b"x")
    (flat_ct_dir / "b.pdf").write_bytes(b"x")
    with pytest.raises(DataError) as info:
        discover_subjects(flat_ct_dir)
    assert len(info.value.problems) == 2
    assert "a.docx" in str(info.value) and "b.pdf" in str(info.value)


# ---------------------------------------------------------------- symbolic links


def _warnings(root: Path) -> list[str]:
    records, problems = scan_subjects(root)
    assert not [p for p in problems if p.severity == "error"], problems
    return [str(p) for p in problems]


def test_link_loop_is_reported_once_and_files_read_once(flat_ct_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    (flat_ct_dir / "sub").mkdir()
    write_volume(flat_ct_dir / "sub" / "case_010.nii.gz", make_ct(0)[0])
    (flat_ct_dir / "sub" / "up").symlink_to("..")  # back to the data folder
    with caplog.at_level(logging.WARNING, logger="maesil.data.sources"):
        records = discover_subjects(flat_ct_dir)
    assert [r.subject_id for r in records] == ["case_000", "case_001", "case_002", "case_003", "case_010"]
    assert _warnings(flat_ct_dir) == [
        f"{flat_ct_dir / 'sub' / 'up'}: symbolic link back to {flat_ct_dir}, a folder that contains it (a loop);"
        " not followed"
    ]
    assert caplog.text.count("a loop") == 1


def test_link_to_a_folder_above_the_data_folder_is_a_loop(tmp_path: Path) -> None:
    root = tmp_path / "data" / "images"
    write_volume(root / "a.nii.gz", make_ct(0)[0])
    (root / "top").symlink_to(tmp_path)
    records, problems = scan_subjects(tmp_path / "data")
    assert [r.subject_id for r in records] == ["a"]
    assert [str(p) for p in problems] == [
        f"{root / 'top'}: symbolic link back to {tmp_path.resolve()}, a folder that contains it (a loop); not followed"
    ]


def test_links_to_files_and_outside_folders_are_followed_once(tmp_path: Path) -> None:
    outside = tmp_path / "archive"
    write_volume(outside / "b.nii.gz", make_ct(1)[0])
    write_volume(tmp_path / "c.nii.gz", make_ct(2)[0])
    root = tmp_path / "data"
    write_volume(root / "a.nii.gz", make_ct(0)[0])
    (root / "archive").symlink_to(outside)
    (root / "again").symlink_to(outside)  # a second way into the same folder
    (root / "c.nii.gz").symlink_to(tmp_path / "c.nii.gz")
    records = discover_subjects(root)
    assert [(r.subject_id, r.image) for r in records] == [
        ("a", root / "a.nii.gz"), ("b", root / "again" / "b.nii.gz"), ("c", root / "c.nii.gz"),
    ]
    assert _warnings(root) == [
        f"{root / 'archive'}: the same folder as {root / 'again'} (through a symbolic link); read once,"
        f" as {root / 'again'}"
    ]


def test_loop_in_images_with_labels(labeled_ct_dir: Path) -> None:
    (labeled_ct_dir / "images" / "nested").mkdir()
    (labeled_ct_dir / "images" / "nested" / "back").symlink_to("../..")
    records, problems = scan_subjects(labeled_ct_dir)
    assert len(records) == 6 and all(r.label is not None for r in records)
    assert [(p.severity, p.path) for p in problems] == [("warning", str(labeled_ct_dir / "images" / "nested" / "back"))]


def test_excluded_link_is_not_reported(flat_ct_dir: Path) -> None:
    (flat_ct_dir / ".snapshot").symlink_to(".")
    records, problems = scan_subjects(flat_ct_dir)
    assert len(records) == 4 and problems == []

