"""Both back-ends behind one interface: the same batches, and superpatches placed by the same rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from maesil.data import VolumeDataModule
from maesil.data.cache import CachedPatchDataset, CacheIndex, prepare_cache
from maesil.data.preprocess import PreprocessSettings
from maesil.data.records import SubjectRecord
from maesil.data.sampling import LabelCentredPolicy, LabelMapVoxels, place_around

from ..conftest import SHAPE, make_ct, write_volume

SIZE = (8, 8, 6)
BORDER_VOXELS = [(0, 10, 8), (39, 35, 19), (20, 0, 0)]


@pytest.fixture
def border_label_dir(tmp_path: Path) -> Path:
    """Three CT volumes whose only labelled voxel lies on the border of the volume."""
    root = tmp_path / "border"
    for i, voxel in enumerate(BORDER_VOXELS):
        label = np.zeros(SHAPE, np.uint8)
        label[voxel] = 1
        write_volume(root / "images" / f"case_{i:03d}.nii.gz", make_ct(i)[0])
        write_volume(root / "labels" / f"case_{i:03d}.nii.gz", label)
    return root


def _dm(data_dir: Path, **kwargs) -> VolumeDataModule:
    return VolumeDataModule(data_dir=str(data_dir), task="segment", superpatch_size=SIZE, target_spacing=None,
                            crop_foreground=False, val_fraction=0.0, batch_size=2, samples_per_volume=3,
                            queue_length=9, num_workers=0, **kwargs)


def _locations(dm: VolumeDataModule) -> dict[str, set[tuple[int, ...]]]:
    dm.setup("fit")
    seen: dict[str, set[tuple[int, ...]]] = {}
    for batch in dm.train_dataloader():
        for sid, location, label in zip(batch["subject_id"], batch["location"], batch["label"]):
            assert int(label.sum()) == 1  # the one labelled voxel is inside every patch
            seen.setdefault(sid, set()).add(tuple(location.tolist()))
    assert sum(map(len, seen.values())) == 3
    return seen


def test_both_backends_centre_on_a_border_label_by_the_same_rule(border_label_dir: Path, tmp_path: Path) -> None:
    queue = _dm(border_label_dir)
    cached = _dm(border_label_dir, cache_dir=str(tmp_path / "cache"))
    cached.prepare_data()
    queue.setup("fit")
    expected = {}
    for record in queue.train_records:
        label = queue.preprocessing()(queue._make_subject(record))["label"].data[0].numpy()
        voxel = np.argwhere(label > 0)[0]  # after reorientation to RAS
        assert (voxel == 0).any() or (voxel == np.array(label.shape) - 1).any()  # still on the border
        start = place_around(voxel, np.array(label.shape), np.array(SIZE))
        expected[record.subject_id] = {(*start.tolist(), *(start + SIZE).tolist())}
    assert _locations(queue) == expected
    assert _locations(cached) == expected


def test_cache_draws_as_the_policy_does_on_the_label_map(tiny_ct_dir: Path, tmp_path: Path) -> None:
    """With the same policy and seed, the cache's stored label points give the locations the policy gives on
    the whole label map (the queue's view of it), as long as a value has at most 4096 voxels."""
    images = sorted((tiny_ct_dir / "images").glob("*.nii.gz"))
    records = [SubjectRecord(p.name[:-7], p, tiny_ct_dir / "labels" / p.name) for p in images]
    prepare_cache(records, tmp_path, PreprocessSettings(target_spacing=6.0), workers=1, progress=False)
    index = CacheIndex.load(tmp_path)
    counts = [dict(zip(e.label_values, e.label_counts)) for e in index.entries.values()]
    small = [v for v in range(1, 8) if all(0 < c.get(v, 0) <= 4096 for c in counts)]  # all stored as points
    assert len(small) >= 2
    policy = LabelCentredPolicy({v: float(k + 1) for k, v in enumerate(small)})
    dataset = CachedPatchDataset(index, [r.subject_id for r in records], 8, samples_per_volume=6, with_label=True,
                                 seed=4, policy=policy)
    dataset.set_epoch(2)
    for i in range(len(dataset)):
        sample = dataset[i]
        label = np.load(index.entries[sample["subject_id"]].image_path.parent / "label.npy")
        start = policy.start(label.shape, (8, 8, 8), np.random.default_rng([4, 2, i]), LabelMapVoxels(label, "label"))
        assert sample["location"][:3].tolist() == start.tolist()
        assert torch.isin(sample["label"], torch.tensor(small)).any()
