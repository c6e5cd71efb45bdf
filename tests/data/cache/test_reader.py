"""Reading a cache: reproducible superpatches, label-centred placement, read-time padding, batched reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from maesil.data.cache import CachedPatchDataset, CacheIndex, load_cached_subject, prepare_cache
from maesil.data.collate import collate_patches
from maesil.data.grid import grid_patches
from maesil.data.io import subject_from_record
from maesil.data.preprocess import PadToMinShape, PreprocessSettings
from maesil.data.records import DataError

from .conftest import records_of


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
    record = records_of(tiny_ct_dir)[0]
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
