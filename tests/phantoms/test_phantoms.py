"""Synthetic torso CT phantoms: determinism, HU ranges, anatomy, NIfTI round trip, idempotence."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torchio as tio

from maesil.phantoms import ORGAN_LABELS, Phantom, make_phantom, write_phantoms, writer

# Small grid, same field of view as the default (≈ 307 × 307 × 240 mm): the anatomy is in mm.
SMALL = (96, 96, 32)
SMALL_SPACING = (3.2, 3.2, 7.5)


@pytest.fixture(scope="module")
def small() -> dict[int, Phantom]:
    """A few small phantoms shared by the read-only tests."""
    return {seed: make_phantom(seed, SMALL, SMALL_SPACING) for seed in (0, 1, 2)}


def _centroid_mm(ph: Phantom, label: int) -> np.ndarray:
    idx = np.argwhere(ph.label == label)
    return (ph.affine @ np.append(idx.mean(0), 1.0))[:3]


def test_phantom_arrays_and_affine(small):
    ph = small[0]
    assert ph.image.shape == SMALL and ph.label.shape == SMALL
    assert ph.image.dtype == np.int16 and ph.label.dtype == np.uint8
    assert ph.spacing == SMALL_SPACING
    assert ph.affine.dtype == np.float64 and ph.affine.shape == (4, 4)
    np.testing.assert_allclose(np.diag(ph.affine)[:3], SMALL_SPACING)
    # centred: the centre of the volume is the world origin
    centre = ph.affine @ np.array([(n - 1) / 2 for n in SMALL] + [1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)
    assert set(np.unique(ph.label)) <= set(ORGAN_LABELS)


def test_deterministic(small):
    again = make_phantom(0, SMALL, SMALL_SPACING)
    np.testing.assert_array_equal(again.image, small[0].image)
    np.testing.assert_array_equal(again.label, small[0].label)
    np.testing.assert_array_equal(again.affine, small[0].affine)
    assert not np.array_equal(small[0].image, small[1].image)
    assert not np.array_equal(small[0].label, small[1].label)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_organ_present(small, seed):
    present = set(np.unique(small[seed].label).tolist())
    assert present == set(ORGAN_LABELS), f"missing {set(ORGAN_LABELS) - present}"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hu_ranges(small, seed):
    ph = small[seed]
    img = ph.image.astype(np.float64)
    # air in the corners of the field of view (outside the body, above the table)
    corners = np.concatenate([img[:6, -6:, :].ravel(), img[-6:, -6:, :].ravel()])
    assert abs(corners.mean() + 1000) < 15, corners.mean()
    assert 5 < corners.std() < 30  # noisy, not constant
    bands = {
        "liver": (40, 80),
        "spleen": (35, 65),
        "kidney_left": (10, 50),
        "kidney_right": (10, 50),
        "aorta": (150, 250),
        "lung": (-1000, -600),
        "bone": (300, 1300),
    }
    by_name = {name: k for k, name in ORGAN_LABELS.items()}
    for name, (lo, hi) in bands.items():
        mean = img[ph.label == by_name[name]].mean()
        assert lo <= mean <= hi, f"{name}: mean {mean:.0f} HU outside [{lo}, {hi}]"
    # subcutaneous / visceral fat and soft tissue are both present in quantity
    assert ((img > -140) & (img < -60)).mean() > 0.03
    assert ((img > 0) & (img < 80)).mean() > 0.15
    # noise: organs are textured, not piecewise constant
    assert img[ph.label == by_name["liver"]].std() > 8


def test_anatomy_in_ras_orientation(small):
    """x > 0 is the patient's right (liver), y > 0 anterior, z > 0 superior (lungs above)."""
    ph = small[0]
    liver, spleen = _centroid_mm(ph, 1), _centroid_mm(ph, 2)
    kid_l, kid_r = _centroid_mm(ph, 3), _centroid_mm(ph, 4)
    lung, aorta = _centroid_mm(ph, 6), _centroid_mm(ph, 5)
    assert liver[0] > 0 > spleen[0]
    assert kid_r[0] > 0 > kid_l[0]
    assert lung[2] > liver[2] > kid_r[2]
    bone = np.argwhere(ph.label == 7)
    spine_y = (ph.affine[1, 1] * bone[:, 1] + ph.affine[1, 3])[np.abs(ph.affine[0, 0] * bone[:, 0] + ph.affine[0, 3]) < 10]
    assert np.median(spine_y) < aorta[1]  # the spine is posterior to the aorta


#: sha256 of the image and label bytes of reference phantoms. The painters must reproduce them bit
#: for bit: the README's figures and every cached phantom folder were made with these arrays.
FINGERPRINTS = {
    (0, (48, 48, 24), (4.0, 4.0, 8.0)): (
        "f76a4a96443df53801af4f2466a2a5f7d88c2349a6b9f3a990fd7e76b558b754",
        "ec1f76dbd3bccc2efbd3df1061195682beac730562e11412bb630a63f03a9996",
    ),
    (7, (48, 48, 24), (4.0, 4.0, 8.0)): (
        "45275f2ee72a694b61ffae4afc3ba4d90467f73341428f03d83f7a377536b81d",
        "07ffc9928550d9e0014323ca98e6325105ac7226804626fcb2bfbf31d1b7be6f",
    ),
    (0, SMALL, SMALL_SPACING): (
        "1179a2d47d3e900ae39ba158ac80102eb464bc29f8caff7b8f36c839fbc2ff62",
        "d6a03b4cfd12d6da394f10133c843a6c2490bbde642745fdc81c0bab23c3e0bd",
    ),
}


@pytest.mark.parametrize("seed, shape, spacing", list(FINGERPRINTS))
def test_arrays_are_bit_identical_to_the_reference(small, seed, shape, spacing):
    ph = small[seed] if (shape, spacing) == (SMALL, SMALL_SPACING) else make_phantom(seed, shape, spacing)
    digests = tuple(hashlib.sha256(a.tobytes()).hexdigest() for a in (ph.image, ph.label))
    assert digests == FINGERPRINTS[seed, shape, spacing]


def test_same_anatomy_on_another_grid(small):
    """Organ volumes in ml barely depend on the voxel grid (anatomy is defined in mm)."""
    other = make_phantom(0, (80, 80, 48), (3.84, 3.84, 5.0))
    ref = small[0]
    for k in (1, 2, 6, 7):
        v_ref = (ref.label == k).sum() * np.prod(SMALL_SPACING)
        v_other = (other.label == k).sum() * np.prod((3.84, 3.84, 5.0))
        assert abs(v_other / v_ref - 1) < 0.15, (ORGAN_LABELS[k], v_ref, v_other)


def test_odd_grids_do_not_fail():
    tiny = make_phantom(5, (16, 16, 16), (1.0, 1.0, 1.0))  # a 16 mm cube inside the body
    assert tiny.image.shape == (16, 16, 16)
    wide = make_phantom(5, (40, 30, 20), (12.0, 14.0, 20.0))  # larger than the anatomy
    assert (wide.image == wide.image).all() and (wide.image.min() >= -1024)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(count=0), "count"),
        (dict(count=1, shape=(96, 8, 32)), "shape"),
        (dict(count=1, shape=(96, 96)), "shape"),
        (dict(count=1, spacing=(1.0, 0.0, 1.0)), "spacing"),
        (dict(count=1, spacing=(1.0, -2.0, 1.0)), "spacing"),
        (dict(count=1, seed=-1), "seed"),
        (dict(count=1, workers=0), "workers"),
    ],
)
def test_write_phantoms_validates(tmp_path, kwargs, match):
    kwargs.setdefault("shape", SMALL)
    kwargs.setdefault("spacing", SMALL_SPACING)
    with pytest.raises(ValueError, match=match):
        write_phantoms(tmp_path, **kwargs)
    assert not (tmp_path / "images").exists() or not any((tmp_path / "images").iterdir())


def test_make_phantom_validates():
    with pytest.raises(ValueError, match="shape"):
        make_phantom(0, (15, 96, 32), SMALL_SPACING)
    with pytest.raises(ValueError, match="spacing"):
        make_phantom(0, SMALL, (1.0, float("nan"), 1.0))
    with pytest.raises(ValueError, match="seed"):
        make_phantom(-3, SMALL, SMALL_SPACING)


def test_written_files_read_back_with_torchio(tmp_path, small):
    paths = write_phantoms(tmp_path, count=1, seed=0, shape=SMALL, spacing=SMALL_SPACING)
    assert paths == [tmp_path / "images" / "phantom_000.nii.gz"]
    label_path = tmp_path / "labels" / "phantom_000.nii.gz"
    image = tio.ScalarImage(paths[0])
    label = tio.LabelMap(label_path)
    assert image.orientation == ("R", "A", "S")
    assert label.orientation == ("R", "A", "S")
    np.testing.assert_allclose(image.spacing, SMALL_SPACING, rtol=1e-6)
    np.testing.assert_array_equal(image.affine, label.affine)
    np.testing.assert_allclose(image.affine, small[0].affine, atol=1e-4)
    assert image.shape == (1, *SMALL) and label.shape == (1, *SMALL)
    np.testing.assert_array_equal(image.data[0].numpy(), small[0].image)
    np.testing.assert_array_equal(label.data[0].numpy(), small[0].label)
    # on-disk dtypes and geometry codes
    img_nii, lab_nii = nib.load(paths[0]), nib.load(label_path)
    assert img_nii.get_data_dtype() == np.int16 and lab_nii.get_data_dtype() == np.uint8
    assert int(img_nii.header["sform_code"]) == 1 and int(img_nii.header["qform_code"]) == 1
    assert nib.aff2axcodes(img_nii.affine) == ("R", "A", "S")
    manifest = json.loads((tmp_path / "phantoms.json").read_text())
    assert manifest["shape"] == list(SMALL) and manifest["spacing"] == list(SMALL_SPACING)
    assert manifest["seeds"] == [0]
    # nothing but the two phantom files (no temporary leftovers)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["phantom_000.nii.gz"]
    assert sorted(p.name for p in (tmp_path / "labels").iterdir()) == ["phantom_000.nii.gz"]


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("phantom_*.nii.gz")}


def test_write_phantoms_is_idempotent_and_regenerates(tmp_path):
    first = write_phantoms(tmp_path, count=2, seed=3, shape=SMALL, spacing=SMALL_SPACING)
    assert [p.name for p in first] == ["phantom_003.nii.gz", "phantom_004.nii.gz"]
    before = _mtimes(tmp_path)
    assert len(before) == 4

    again = write_phantoms(tmp_path, count=2, seed=3, shape=SMALL, spacing=SMALL_SPACING)
    assert again == first
    assert _mtimes(tmp_path) == before  # nothing rewritten

    # one more seed: only the new one is written
    more = write_phantoms(tmp_path, count=3, seed=3, shape=SMALL, spacing=SMALL_SPACING)
    after = _mtimes(tmp_path)
    assert len(more) == 3 and all(after[k] == v for k, v in before.items())
    assert "images/phantom_005.nii.gz" in after

    # a missing file is regenerated
    (tmp_path / "labels" / "phantom_004.nii.gz").unlink()
    write_phantoms(tmp_path, count=3, seed=3, shape=SMALL, spacing=SMALL_SPACING)
    assert (tmp_path / "labels" / "phantom_004.nii.gz").exists()

    # changed spacing: the requested phantoms are regenerated, stale ones are removed
    new_spacing = (3.0, 3.0, 7.0)
    write_phantoms(tmp_path, count=1, seed=3, shape=SMALL, spacing=new_spacing)
    assert tio.ScalarImage(tmp_path / "images" / "phantom_003.nii.gz").spacing == pytest.approx(new_spacing)
    assert not (tmp_path / "images" / "phantom_004.nii.gz").exists()
    assert not (tmp_path / "labels" / "phantom_005.nii.gz").exists()
    manifest = json.loads((tmp_path / "phantoms.json").read_text())
    assert manifest["spacing"] == list(new_spacing) and manifest["seeds"] == [3]


def test_interrupted_run_leaves_no_partial_files(tmp_path, monkeypatch):
    real = writer.make_phantom
    calls = []

    def flaky(seed, shape, spacing):
        calls.append(seed)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(seed, shape, spacing)

    monkeypatch.setattr(writer, "make_phantom", flaky)
    with pytest.raises(KeyboardInterrupt):
        write_phantoms(tmp_path, count=2, seed=0, shape=SMALL, spacing=SMALL_SPACING)
    monkeypatch.setattr(writer, "make_phantom", real)
    names = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert names == ["images/phantom_000.nii.gz", "labels/phantom_000.nii.gz", "phantoms.json"]
    assert json.loads((tmp_path / "phantoms.json").read_text())["seeds"] == [0]
    before = _mtimes(tmp_path)
    write_phantoms(tmp_path, count=2, seed=0, shape=SMALL, spacing=SMALL_SPACING)
    after = _mtimes(tmp_path)
    assert after["images/phantom_000.nii.gz"] == before["images/phantom_000.nii.gz"]
    assert "labels/phantom_001.nii.gz" in after


def test_stale_temp_files_are_cleaned(tmp_path):
    (tmp_path / "images").mkdir(parents=True)
    stale = tmp_path / "images" / ".phantom_000.nii.gz.1234abcd.tmp"
    stale.write_bytes(b"partial")
    write_phantoms(tmp_path, count=1, seed=0, shape=SMALL, spacing=SMALL_SPACING)
    assert not stale.exists()


def test_phantoms_written_by_several_processes_are_the_same_files(tmp_path):
    one = write_phantoms(tmp_path / "one", count=3, seed=5, shape=SMALL, spacing=SMALL_SPACING)
    three = write_phantoms(tmp_path / "three", count=3, seed=5, shape=SMALL, spacing=SMALL_SPACING, workers=3)
    assert [p.name for p in one] == [p.name for p in three] == [f"phantom_00{s}.nii.gz" for s in (5, 6, 7)]
    for folder in ("images", "labels"):
        for a, b in zip(sorted((tmp_path / "one" / folder).iterdir()), sorted((tmp_path / "three" / folder).iterdir())):
            assert a.read_bytes() == b.read_bytes()
    assert json.loads((tmp_path / "three" / "phantoms.json").read_text())["seeds"] == [5, 6, 7]
