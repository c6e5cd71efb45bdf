from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchio as tio
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from maesil.data.cache import (
    CACHE_FORMAT,
    CACHE_VERSION,
    CachedPatchDataset,
    CacheIndex,
    PrepareReport,
    cache_problems,
    is_cache,
    load_cached_subject,
    prepare_cache,
)
from maesil.data.io import subject_from_record
from maesil.data.preprocess import PadToMinShape, PreprocessSettings
from maesil.data.sampling import collate_patches, grid_patches
from maesil.data.sources import DataError, SubjectRecord

SETTINGS = PreprocessSettings(modality="ct", target_spacing=(6.0, 6.0, 6.0))


def _records(root: Path, splits: tuple[str | None, ...] = ("train", "val", None)) -> list[SubjectRecord]:
    images = sorted((root / "images").glob("*.nii.gz"))
    return [SubjectRecord(p.name[: -len(".nii.gz")], p, root / "labels" / p.name, split=split)
            for p, split in zip(images, splits)]


@pytest.fixture(scope="module")
def prepared(tiny_ct_dir: Path, tmp_path_factory) -> tuple[Path, list[SubjectRecord], PrepareReport]:
    """The tiny phantoms prepared once, in two worker processes."""
    out = tmp_path_factory.mktemp("cache")
    records = _records(tiny_ct_dir)
    report = prepare_cache(records, out, SETTINGS, workers=2, progress=False)
    return out, records, report


@pytest.fixture
def own_copy(tiny_ct_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny phantoms, for tests that touch or break files."""
    return Path(shutil.copytree(tiny_ct_dir, tmp_path / "data"))


def test_round_trip_equals_torchio_preprocessing(prepared) -> None:
    out, records, report = prepared
    assert sorted(report.prepared) == [r.subject_id for r in records] and not report.failed
    index = CacheIndex.load(out)
    assert index.settings == SETTINGS and set(index.entries) == {r.subject_id for r in records}
    for record in records:
        expected = SETTINGS.transform()(subject_from_record(record, with_label=True))
        entry = index.entries[record.subject_id]
        image = np.load(entry.image_path)
        label = np.load(entry.label_path)
        assert image.dtype == np.float32 and image.flags.c_contiguous and label.dtype == np.uint8
        assert np.array_equal(image, expected["image"].data[0].numpy())
        assert np.array_equal(label, expected["label"].data[0].numpy())
        assert np.array_equal(entry.affine_array, expected["image"].affine)
        assert entry.shape == tuple(expected.spatial_shape)
        assert entry.spacing == pytest.approx(expected["image"].spacing)
        assert entry.original_shape == (48, 48, 24) and entry.original_spacing == pytest.approx((4.0, 4.0, 8.0))
        assert entry.label_values == tuple(int(v) for v in np.unique(label))
        assert entry.label_counts == tuple(int((label == v).sum()) for v in entry.label_values)
        subject = load_cached_subject(index, record.subject_id, with_label=True)
        assert torch.equal(subject["image"].data, expected["image"].data)
        assert np.array_equal(subject["label"].affine, expected["label"].affine)
        assert subject["subject_id"] == record.subject_id


def test_index_json_fields(prepared) -> None:
    out, records, _ = prepared
    assert is_cache(out) and not is_cache(out / "subjects")
    data = json.loads((out / "index.json").read_text())
    assert data["format"] == CACHE_FORMAT and data["version"] == CACHE_VERSION
    assert data["settings"] == SETTINGS.to_dict()
    entry = data["subjects"][records[0].subject_id]
    assert set(entry) >= {"image", "label", "label_points", "shape", "spacing", "affine", "original_shape",
                          "original_spacing", "original_affine", "source", "stats", "label_values", "split"}
    assert entry["image"] == f"subjects/{records[0].subject_id}/image.npy"
    assert entry["source"]["image"] == str(records[0].image) and entry["source"]["label"] == str(records[0].label)
    assert entry["source"]["series_uid"] is None
    stat = records[0].image.stat()
    assert entry["source"]["fingerprint"]["image"] == {"kind": "file", "size": stat.st_size,
                                                       "mtime_ns": stat.st_mtime_ns}
    assert set(entry["stats"]) == {"min", "max", "mean", "std", "foreground_fraction"}
    stats = entry["stats"]
    assert stats["min"] == 0.0 and stats["max"] == 1.0 and 0 < stats["foreground_fraction"] < 1
    assert np.array(entry["affine"]).shape == (4, 4) and np.array(entry["original_affine"]).shape == (4, 4)
    assert [data["subjects"][r.subject_id]["split"] for r in records] == ["train", "val", None]
    with np.load(out / entry["label_points"]) as points:
        assert list(points["values"]) == entry["label_values"]
        for value in entry["label_values"]:
            coords = points[f"points_{value}"]
            assert coords.dtype == np.int32 and coords.shape[1] == 3 and 0 < len(coords) <= 4096
            label = np.load(out / entry["label"])
            assert (label[tuple(coords.T)] == value).all()


def test_second_run_skips_and_touched_source_is_reprepared(own_copy: Path, tmp_path: Path) -> None:
    records = _records(own_copy)
    out = tmp_path / "cache"
    first = prepare_cache(records, out, SETTINGS, workers=1, progress=False)
    assert len(first.prepared) == 3
    again = prepare_cache(records, out, SETTINGS, workers=1, progress=False)
    assert again.prepared == [] and sorted(again.skipped) == [r.subject_id for r in records]
    stat = records[1].image.stat()
    os.utime(records[1].image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    third = prepare_cache(records, out, SETTINGS, workers=1, progress=False)
    assert third.prepared == [records[1].subject_id] and len(third.skipped) == 2
    # a subject no longer among the records leaves the index and its files are deleted
    fourth = prepare_cache(records[:2], out, SETTINGS, workers=1, progress=False)
    assert fourth.removed == [records[2].subject_id] and len(fourth.skipped) == 2
    assert set(CacheIndex.load(out).entries) == {r.subject_id for r in records[:2]}
    assert not (out / "subjects" / records[2].subject_id).exists()


def test_other_settings_are_refused_unless_forced(tiny_ct_dir: Path, tmp_path: Path) -> None:
    records = _records(tiny_ct_dir)[:1]
    out = tmp_path / "cache"
    prepare_cache(records, out, SETTINGS, workers=1, progress=False)
    other = PreprocessSettings(modality="ct", target_spacing=(8.0, 8.0, 8.0))
    with pytest.raises(DataError, match="other settings.*--out.*--force") as info:
        prepare_cache(records, out, other, workers=1, progress=False)
    assert str(out / "index.json") in str(info.value)
    report = prepare_cache(records, out, other, workers=1, progress=False, force=True)
    assert report.prepared == [records[0].subject_id]
    index = CacheIndex.load(out)
    assert index.settings == other and index.entries[records[0].subject_id].spacing == (8.0, 8.0, 8.0)
    with pytest.raises(DataError, match="prepared with"):
        index.require_settings(SETTINGS)


def test_corrupt_and_missing_files_fail_alone(own_copy: Path, tmp_path: Path) -> None:
    records = _records(own_copy)
    corrupt = records[0].image
    corrupt.write_bytes(corrupt.read_bytes()[:200])  # truncated gzip
    missing = SubjectRecord("ghost", own_copy / "images" / "ghost.nii.gz")
    report = prepare_cache([*records, missing], tmp_path / "cache", SETTINGS, workers=1, progress=False)
    assert sorted(report.prepared) == [r.subject_id for r in records[1:]]
    assert set(report.failed) == {records[0].subject_id, "ghost"}
    assert str(corrupt) in report.failed[records[0].subject_id]
    assert str(missing.image) in report.failed["ghost"]
    assert set(CacheIndex.load(tmp_path / "cache").entries) == {r.subject_id for r in records[1:]}


def test_load_rejects_missing_or_invalid_caches(prepared, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=str(tmp_path / "index.json")):
        CacheIndex.load(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DataError, match="not a maesil cache"):
        CacheIndex.load(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"format": CACHE_FORMAT, "version": 99, "settings": {},
                                                     "subjects": {}}))
    with pytest.raises(DataError, match="version 99"):
        CacheIndex.load(tmp_path)
    out, _, _ = prepared
    broken = Path(shutil.copytree(out, tmp_path / "broken"))
    entry = next(iter(CacheIndex.load(broken).entries.values()))
    entry.label_path.unlink()
    with pytest.raises(DataError, match=str(entry.label_path)):
        CacheIndex.load(broken)


def test_patches_are_reproducible_and_change_with_epoch(prepared) -> None:
    out, records, _ = prepared
    index = CacheIndex.load(out)
    ids = [r.subject_id for r in records]
    patch = (16, 12, 8)
    dataset = CachedPatchDataset(index, ids, patch, samples_per_volume=4, seed=3)
    twin = CachedPatchDataset(index, ids, patch, samples_per_volume=4, seed=3)
    assert len(dataset) == 12
    sample = dataset[5]
    assert set(sample) == {"image", "subject_id", "location"} and sample["subject_id"] == ids[1]
    assert sample["image"].shape == (1, *patch) and sample["image"].dtype == torch.float32
    assert sample["location"].dtype == torch.int64
    loc = sample["location"].tolist()
    assert [b - a for a, b in zip(loc[:3], loc[3:])] == list(patch)
    volume = np.load(index.entries[ids[1]].image_path)
    assert np.array_equal(sample["image"][0].numpy(), volume[loc[0]:loc[3], loc[1]:loc[4], loc[2]:loc[5]])
    locations = [dataset[i]["location"] for i in range(len(dataset))]
    assert all(torch.equal(a, twin[i]["location"]) for i, a in enumerate(locations))
    dataset.set_epoch(1)
    moved = [dataset[i]["location"] for i in range(len(dataset))]
    assert sum(not torch.equal(a, b) for a, b in zip(locations, moved)) >= len(dataset) // 2
    dataset.set_epoch(0)
    assert torch.equal(dataset[7]["location"], locations[7])


def test_label_centred_sampling(prepared) -> None:
    out, records, _ = prepared
    index = CacheIndex.load(out)
    ids = [r.subject_id for r in records]
    for probabilities, wanted in (({7: 1.0}, {7}), ({2: 1.0, 5: 3.0}, {2, 5}), (None, set(range(1, 8)))):
        dataset = CachedPatchDataset(index, ids, 1, samples_per_volume=20, with_label=True,
                                     label_probabilities=probabilities)
        seen = set()
        for i in range(len(dataset)):
            value = int(dataset[i]["label"][0, 0, 0, 0])
            assert value in wanted
            seen.add(value)
        assert len(seen) >= min(2, len(wanted)) and (probabilities is None or seen == wanted)
    dataset = CachedPatchDataset(index, ids, 9, samples_per_volume=10, with_label=True, label_probabilities={6: 1})
    for i in range(len(dataset)):
        sample = dataset[i]
        label, loc = sample["label"][0], sample["location"]
        assert sample["label"].shape == (1, 9, 9, 9) and (label == 6).any()
        shape = index.entries[sample["subject_id"]].shape
        if (loc[:3] > 0).all() and all(int(loc[3 + a]) < shape[a] for a in range(3)):  # not clamped
            assert int(label[4, 4, 4]) == 6
    with pytest.raises(DataError, match="no voxel"):
        CachedPatchDataset(index, ids, 4, 1, with_label=True, label_probabilities={42: 1.0})[0]


@pytest.mark.parametrize("modality", ["ct", "mri"])
def test_small_volume_is_padded_like_torchio(tiny_ct_dir: Path, tmp_path: Path, modality: str) -> None:
    settings = PreprocessSettings(modality=modality, target_spacing=(6.0, 6.0, 6.0))
    record = _records(tiny_ct_dir)[0]
    prepare_cache([record], tmp_path, settings, workers=1, progress=False)
    index = CacheIndex.load(tmp_path)
    shape = index.entries[record.subject_id].shape
    patch = (shape[0] + 7, 16, shape[2] + 2)  # larger than the volume along X and Z
    fill = 0.0 if modality == "ct" else "minimum"
    padded = PadToMinShape(patch, fill)(settings.transform()(subject_from_record(record, with_label=True)))
    dataset = CachedPatchDataset(index, [record.subject_id], patch, samples_per_volume=6, with_label=True,
                                 label_probabilities={0: 1.0, 1: 1.0})
    for i in range(len(dataset)):
        sample = dataset[i]
        i0, j0, k0, i1, j1, k1 = sample["location"].tolist()
        assert i0 == 0 and k0 == 0 and (i1, k1) == (patch[0], patch[2])
        box = (slice(i0, i1), slice(j0, j1), slice(k0, k1))
        assert torch.equal(sample["image"][0], padded["image"].data[0][box])
        assert torch.equal(sample["label"][0].long(), padded["label"].data[0][box].long())


def test_dataloader_workers_and_collate(prepared) -> None:
    out, records, _ = prepared
    index = CacheIndex.load(out)
    ids = [r.subject_id for r in records]
    dataset = CachedPatchDataset(index, ids, 16, samples_per_volume=4, with_label=True)
    sampler = DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=3, sampler=sampler, num_workers=2,
                        collate_fn=lambda batch: collate_patches(batch, label_key="label"))
    batches = list(loader)
    assert len(batches) == 2
    for batch in batches:
        assert set(batch) == {"image", "subject_id", "location", "label"}
        assert batch["image"].shape == (3, 1, 16, 16, 16) and batch["image"].dtype == torch.float32
        assert batch["label"].shape == (3, 1, 16, 16, 16) and batch["label"].dtype == torch.long
        assert batch["location"].shape == (3, 6) and batch["location"].dtype == torch.long
        assert set(batch["subject_id"]) <= set(ids)
    expected = [dataset[i]["location"] for i in sampler]
    assert torch.equal(torch.cat([b["location"] for b in batches]), torch.stack(expected))


def test_cached_subject_feeds_the_validation_grid(prepared) -> None:
    out, records, _ = prepared
    index = CacheIndex.load(out)
    subject = load_cached_subject(index, records[0].subject_id, with_label=True)
    grid = grid_patches([subject], 16)
    batch = collate_patches([grid[i] for i in range(3)], label_key="label")
    assert batch["image"].shape == (3, 1, 16, 16, 16) and batch["label"].dtype == torch.long
    assert batch["subject_id"] == [records[0].subject_id] * 3


def test_cache_problems_from_the_index(prepared) -> None:
    out, _, _ = prepared
    entries = list(CacheIndex.load(out).entries.values())
    assert cache_problems(entries, (16, 16, 16), classes=list(range(8)), needs_labels=True) == []
    problems = cache_problems(entries, (64, 16, 16), classes=[0, 1])
    assert {p.severity for p in problems} == {"error", "warning"}
    assert any("outside the declared classes" in p.message and p.path == entries[0].source.label for p in problems)
    assert any("smaller than one superpatch" in p.message for p in problems)


def test_batched_read_is_collated_without_copy(prepared) -> None:
    out, records, _ = prepared
    index = CacheIndex.load(out)
    dataset = CachedPatchDataset(index, [r.subject_id for r in records], 16, samples_per_volume=2, with_label=True)
    indices = [4, 0, 3]
    samples = dataset.__getitems__(indices)
    batch = collate_patches(samples, label_key="label")
    assert batch["image"].data_ptr() == samples[0]["image"].data_ptr()  # a view, not a copy
    assert batch["label"].data_ptr() == samples[0]["label"].data_ptr() and batch["label"].dtype == torch.long
    single = [dataset[i] for i in indices]
    expected = collate_patches(single, label_key="label")
    for key in ("image", "label", "location"):
        assert torch.equal(batch[key], expected[key])
    assert batch["subject_id"] == expected["subject_id"]
    assert expected["image"].data_ptr() != single[0]["image"].data_ptr()  # separate samples are stacked


def test_collate_accepts_torchio_patches_and_dicts() -> None:
    image = torch.rand(1, 4, 4, 4)
    patch = tio.Subject(image=tio.ScalarImage(tensor=image), subject_id="a", location=torch.tensor([0, 0, 0, 4, 4, 4]))
    plain = {"image": image * 2, "subject_id": "b", "location": torch.tensor([1, 1, 1, 5, 5, 5])}
    batch = collate_patches([patch, plain])
    assert batch["image"].shape == (2, 1, 4, 4, 4) and torch.equal(batch["image"][1], image * 2)
    assert batch["subject_id"] == ["a", "b"] and batch["location"].dtype == torch.long
