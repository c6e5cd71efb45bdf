from __future__ import annotations

import re

import sys
import types
import warnings
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.utils.data.distributed import DistributedSampler

from maesil.data import DataError, DataSpec, VolumeDataModule
from maesil.data.sampling import UnrepeatedSampler
from maesil.data.splits import split_subjects
from maesil.data.tasks import TASKS, PatchTask
from maesil.data.sources import discover_subjects

from .conftest import make_ct, write_volume

PATCH = (16, 16, 16)


def _dm(data_dir: Path | None, **kwargs) -> VolumeDataModule:
    args = dict(
        data_dir=None if data_dir is None else str(data_dir), superpatch_size=PATCH, target_spacing=3.0, batch_size=3,
        samples_per_volume=2, queue_length=6, num_workers=0, split_seed=0,
    )
    args.update(kwargs)
    return VolumeDataModule(**args)


def test_train_batch_format(flat_ct_dir: Path) -> None:
    dm = _dm(flat_ct_dir)
    dm.setup("fit")
    assert dm.superpatch_size == PATCH and dm.spec.target_spacing == (3.0, 3.0, 3.0)
    assert len(dm.train_records) == 3 and len(dm.val_records) == 1
    loader = dm.train_dataloader()
    assert len(loader) == 2  # 3 subjects x 2 patches / batch 3
    batch = next(iter(loader))
    assert set(batch) == {"image", "subject_id", "location"}
    assert batch["image"].shape == (3, 1, *PATCH) and batch["image"].dtype == torch.float32
    assert 0.0 <= float(batch["image"].min()) and float(batch["image"].max()) <= 1.0
    assert batch["location"].shape == (3, 6) and batch["location"].dtype == torch.long
    assert torch.equal(batch["location"][:, 3:] - batch["location"][:, :3], torch.tensor([PATCH] * 3))
    train_ids = {r.subject_id for r in dm.train_records}
    assert isinstance(batch["subject_id"], list) and set(batch["subject_id"]) <= train_ids


def test_val_grid_covers_each_subject_exactly(flat_ct_dir: Path) -> None:
    dm = _dm(flat_ct_dir, val_fraction=0.5, val_batch_size=4)
    dm.setup("fit")
    preprocess = dm.preprocessing()
    expected = {}
    for record in dm.val_records:
        shape = np.array(preprocess(dm._make_subject(record)).spatial_shape)
        expected[record.subject_id] = (shape, int(np.prod(np.ceil(shape / PATCH))))
    counts: Counter = Counter()
    covered: dict[str, np.ndarray] = {}
    for batch in dm.val_dataloader():
        assert set(batch) == {"image", "subject_id", "location"}
        assert batch["image"].dtype == torch.float32 and batch["image"].shape[1:] == (1, *PATCH)
        for sid, loc in zip(batch["subject_id"], batch["location"].tolist()):
            counts[sid] += 1
            padded = (np.ceil(expected[sid][0] / PATCH) * PATCH).astype(int)
            grid = covered.setdefault(sid, np.zeros(padded, np.int32))
            grid[loc[0]:loc[3], loc[1]:loc[4], loc[2]:loc[5]] += 1
    assert dict(counts) == {sid: n for sid, (_, n) in expected.items()}
    assert all((grid == 1).all() for grid in covered.values())  # every voxel exactly once
    assert dm.val_patches() is dm.val_patches()  # preprocessed once, cached


def test_split_deterministic_and_disjoint(labeled_ct_dir: Path) -> None:
    records = discover_subjects(labeled_ct_dir)
    splits = set()
    for seed in range(8):
        train, val = split_subjects(records, 0.34, seed)
        again = split_subjects(records, 0.34, seed)
        assert (train, val) == again
        assert len(val) == 2 and len(train) == 4
        assert not {r.subject_id for r in train} & {r.subject_id for r in val}
        splits.add(tuple(r.subject_id for r in val))
    assert len(splits) > 1
    two = records[:2]
    assert [len(part) for part in split_subjects(two, 0.01, 0)] == [1, 1]  # val >= 1 subject
    with pytest.warns(UserWarning, match="only one subject|Only one subject"):
        train, val = split_subjects(records[:1], 0.2, 0)
    assert train == val == records[:1]
    dm1, dm2 = _dm(labeled_ct_dir, split_seed=3), _dm(labeled_ct_dir, split_seed=3)
    dm1.setup("fit")
    dm2.setup("fit")
    assert dm1.val_records == dm2.val_records


def test_segment_task(labeled_ct_dir: Path) -> None:
    dm = _dm(labeled_ct_dir, task="segment", label_probabilities={0: 0, 1: 1, 2: 0}, samples_per_volume=3,
             queue_length=12, batch_size=4, val_fraction=0.34)
    dm.setup("fit")
    seen = 0
    for batch in dm.train_dataloader():
        assert set(batch) == {"image", "subject_id", "location", "label"}
        label = batch["label"]
        assert label.dtype == torch.long and label.shape == (4, 1, *PATCH)
        assert set(torch.unique(label).tolist()) <= {0, 1, 2}
        centre = tuple(p // 2 for p in PATCH)
        assert (label[:, 0, centre[0], centre[1], centre[2]] == 1).all()  # centred on label 1
        seen += len(label)
    assert seen == 12
    val = next(iter(dm.val_dataloader()))  # whole volumes for segmentation
    assert val["label"].dtype == torch.long and val["label"].shape[:2] == (1, 1)
    assert val["label"].shape[2:] == val["image"].shape[2:]


def test_segment_needs_labels(flat_ct_dir: Path) -> None:
    with pytest.raises(DataError, match=r"case_000\.nii\.gz: no label"):
        _dm(flat_ct_dir, task="segment").setup("fit")


def test_bad_folder_fails_in_setup(flat_ct_dir: Path) -> None:
    (flat_ct_dir / "notes.docx").write_bytes(b"x")
    write_volume(flat_ct_dir / "slice.nii.gz", make_ct(0)[0][:, :, 0], spacing=(2, 2))
    with pytest.raises(DataError, match="notes.docx"):
        _dm(flat_ct_dir).setup("fit")
    (flat_ct_dir / "notes.docx").unlink()
    with pytest.raises(DataError, match=r"slice\.nii\.gz: is 2D"):
        _dm(flat_ct_dir).setup("fit")


@pytest.mark.parametrize("suffix", [".mha", ".nii.gz"])  # NIfTI: ITK alone would read the NaN as 0
def test_nan_volume_fails_in_setup_or_when_loaded(flat_ct_dir: Path, suffix: str) -> None:
    array = make_ct(9)[0].astype(np.float32)
    array[5, 5, 5] = np.nan
    write_volume(flat_ct_dir / f"zz_nan{suffix}", array)
    with pytest.raises(DataError, match=rf"zz_nan{re.escape(suffix)}: contains 1 NaN"):
        _dm(flat_ct_dir, val_fraction=0.4).setup("fit")  # caught up front by the voxel checks
    dm = _dm(flat_ct_dir, val_fraction=0.4, check_voxels=False)
    dm.setup("fit")
    assert any(r.subject_id == "zz_nan" for r in dm.train_records + dm.val_records)
    with pytest.raises(DataError, match=rf"zz_nan{re.escape(suffix)}: contains 1 NaN"):
        list(dm.val_dataloader())
        list(dm.train_dataloader())


def test_task_registry_is_pluggable() -> None:
    assert {"reconstruct", "segment"} <= set(TASKS)
    assert all(issubclass(cls, PatchTask) for cls in TASKS.values())


def test_ddp_subject_sampler_and_set_epoch(flat_ct_dir: Path, tmp_path: Path) -> None:
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        dm = _dm(flat_ct_dir)
        dm.setup("fit")
        loader = dm.train_dataloader()
        sampler = loader.dataset.subject_sampler  # the tio.Queue's
        assert isinstance(sampler, DistributedSampler)
        assert sampler.num_replicas == dist.get_world_size() and sampler.rank == dist.get_rank()
        assert sampler.shuffle
        dm.set_epoch(3)
        assert sampler.epoch == 3
        loader.sampler.set_epoch(5)  # what Lightning calls at each epoch start
        assert sampler.epoch == 5
        assert isinstance(loader.sampler, DistributedSampler)  # so Lightning never re-wraps it
        assert len(list(iter(loader))) == len(loader)
        assert isinstance(dm.val_dataloader().sampler, DistributedSampler)
    finally:
        dist.destroy_process_group()


class _TinyModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Conv3d(1, 1, 1)
        self.val_subjects: set[str] = set()

    def training_step(self, batch, batch_idx):
        return (self.layer(batch["image"]) - batch["image"]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.val_subjects.update(batch["subject_id"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_lightning_fit_smoke(flat_ct_dir: Path, tmp_path: Path) -> None:
    dm = _dm(flat_ct_dir)
    model = _TinyModule()
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 4
    assert model.val_subjects == {r.subject_id for r in dm.val_records}
    assert trainer.train_dataloader.dataset.subject_sampler.epoch == 1  # Lightning's set_epoch reached the queue


def test_data_dir_none_writes_phantoms_in_prepare_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_write_phantoms(out_dir, count, seed=0, shape=None, spacing=None, workers=1):
        calls.append((Path(out_dir), count, workers))
        for i in range(count):
            ct, label = make_ct(i)
            write_volume(Path(out_dir) / "images" / f"phantom_{i:03d}.nii.gz", ct)
            write_volume(Path(out_dir) / "labels" / f"phantom_{i:03d}.nii.gz", label)

    monkeypatch.setitem(sys.modules, "maesil.phantoms",
                        types.SimpleNamespace(write_phantoms=fake_write_phantoms, default_workers=lambda count: 2))
    phantom_dir = tmp_path / "phantoms"
    dm = _dm(None, phantom_dir=str(phantom_dir), phantom_count=3, task="segment")
    dm.prepare_data()
    assert calls == [(phantom_dir, 3, 2)]  # generated in as many processes as default_workers says
    dm.setup("fit")
    assert dm.resolved_data_dir == phantom_dir
    assert len(dm.train_records) == 2 and len(dm.val_records) == 1
    assert "label" in next(iter(dm.train_dataloader()))


def test_real_phantoms(tiny_ct_dir: Path) -> None:
    """The project's phantom folder (session fixture of tests/conftest.py) loads as segment data."""
    dm = _dm(tiny_ct_dir, task="segment", val_fraction=0.34, batch_size=2, target_spacing=4.0)
    dm.setup("fit")
    assert len(dm.train_records) == 2 and len(dm.val_records) == 1
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 1, *PATCH) and batch["label"].shape == (2, 1, *PATCH)
    assert next(iter(dm.val_dataloader()))["image"].shape[:2] == (1, 1)  # a whole volume
    assert dm.val_patches()[0]["image"].shape == (1, *PATCH)


def test_manifest_splits_and_test_loader(labeled_ct_dir: Path) -> None:
    rows = ["subject_id,image,label,split"]
    for i, split in enumerate(["train", "train", "", "", "val", "test"]):
        rows.append(f"s{i},images/case_{i:03d}.nii.gz,labels/case_{i:03d}.nii.gz,{split}")
    (labeled_ct_dir / "subjects.csv").write_text("\n".join(rows) + "\n")
    dm = _dm(labeled_ct_dir / "subjects.csv", task="segment", num_classes=3)
    dm.setup("fit")
    assert [r.subject_id for r in dm.train_records] == ["s0", "s1", "s2", "s3"]
    assert [r.subject_id for r in dm.val_records] == ["s4"] and [r.subject_id for r in dm.test_records] == ["s5"]
    assert {sid for batch in dm.test_dataloader() for sid in batch["subject_id"]} == {"s5"}
    assert {sid for batch in dm.val_dataloader() for sid in batch["subject_id"]} == {"s4"}


def test_label_classes_checked_in_setup(labeled_ct_dir: Path) -> None:
    with pytest.raises(DataError, match=r"case_00\d\.nii\.gz: label values \[2\] are outside the declared classes \[0, 1\]"):
        _dm(labeled_ct_dir, task="segment", num_classes=2).setup("fit")


# ---------------------------------------------------------------- prepared cache


def test_cache_gives_the_same_validation_patches(labeled_ct_dir: Path, tmp_path: Path) -> None:
    plain = _dm(labeled_ct_dir, task="segment", val_fraction=0.34)
    cached = _dm(labeled_ct_dir, task="segment", val_fraction=0.34, cache_dir=str(tmp_path / "cache"))
    cached.prepare_data()
    assert (tmp_path / "cache" / "index.json").is_file()
    plain.setup("fit")
    cached.setup("fit")
    assert [r.subject_id for r in cached.val_records] == [r.subject_id for r in plain.val_records]
    batches = list(zip(plain.val_dataloader(), cached.val_dataloader(), strict=True))
    for a, b in batches:
        assert a["subject_id"] == b["subject_id"] and torch.equal(a["location"], b["location"])
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_cache_training_batches(labeled_ct_dir: Path, tmp_path: Path) -> None:
    dm = _dm(labeled_ct_dir, task="segment", cache_dir=str(tmp_path / "cache"), num_workers=2)
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.num_workers == 2 and len(loader.dataset) == len(dm.train_records) * 2
    batch = next(iter(loader))
    assert set(batch) == {"image", "label", "subject_id", "location"}
    assert batch["image"].shape == (3, 1, *PATCH) and batch["label"].shape == (3, 1, *PATCH)
    assert batch["image"].dtype == torch.float32 and batch["label"].dtype == torch.long
    centre = [s // 2 for s in PATCH]
    assert (batch["label"][:, 0, centre[0], centre[1], centre[2]] > 0).all()  # label-centred patches
    first = [b["location"] for b in loader]
    loader.sampler.set_epoch(1)  # what Lightning does at each epoch start
    second = [b["location"] for b in loader]
    assert not all(torch.equal(a, b) for a, b in zip(first, second))  # new locations each epoch


def test_data_dir_can_be_a_cache(flat_ct_dir: Path, tmp_path: Path) -> None:
    _dm(flat_ct_dir, cache_dir=str(tmp_path / "cache")).prepare_data()
    dm = _dm(tmp_path / "cache")
    dm.setup("fit")
    assert len(dm.train_records) + len(dm.val_records) == 4
    assert next(iter(dm.train_dataloader()))["image"].shape == (3, 1, *PATCH)
    with pytest.raises(DataError, match=r"cache was prepared with .*'target_spacing': \[3.0, 3.0, 3.0\].* asks for"):
        _dm(tmp_path / "cache", target_spacing=2.0).setup("fit")
    with pytest.raises(DataError, match="no prepared cache"):
        _dm(flat_ct_dir, cache_dir=str(tmp_path / "never_prepared")).setup("fit")


def test_cache_failure_names_the_file(flat_ct_dir: Path, tmp_path: Path) -> None:
    write_volume(flat_ct_dir / "blank.nii.gz", np.full((40, 36, 20), 5, np.int16))
    with pytest.raises(DataError, match=r"blank\.nii\.gz: is constant"):
        _dm(flat_ct_dir, cache_dir=str(tmp_path / "cache")).prepare_data()


# ---------------------------------------------------------------- DICOM


def test_dicom_tree_trains(tmp_path: Path) -> None:
    from .dicom_factory import write_dicom_series

    root = tmp_path / "pacs"
    for i in range(3):
        ct = make_ct(i)[0].astype(np.float32)
        write_dicom_series(root / f"patient{i}" / "study", ct, spacing=(2.0, 2.0, 3.0), series_uid=f"1.2.3.{i}",
                           shuffle_names=True, extension="")
    dm = _dm(root)
    dm.setup("fit")
    assert sorted(r.subject_id for r in dm.train_records + dm.val_records) == [
        "patient0_study", "patient1_study", "patient2_study"]
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (3, 1, *PATCH) and float(batch["image"].max()) > 0.2


# ---------------------------------------------------------------- whole volumes (segmentation) and prediction


def test_segment_validation_yields_whole_volumes(labeled_ct_dir: Path) -> None:
    import torchio as tio
    from lightning.fabric.utilities.apply_func import move_data_to_device

    dm = _dm(labeled_ct_dir, task="segment", val_fraction=0.34, num_classes=3)
    dm.setup("fit")
    subjects = dm.whole_volumes("val")
    assert dm.whole_volumes("val") is subjects  # preprocessed once, kept in memory
    assert [s["subject_id"] for s in subjects] == [r.subject_id for r in dm.val_records]
    loader = dm.val_dataloader()
    assert loader.batch_size == 1
    batches = list(loader)
    assert [b["subject_id"] for b in batches] == [[r.subject_id] for r in dm.val_records]
    for batch, subject in zip(batches, subjects):
        assert set(batch) == {"image", "label", "subject_id", "spacing", "location", "subject"}
        shape = tuple(subject.spatial_shape)
        assert all(s >= p for s, p in zip(shape, PATCH)) and shape != PATCH  # whole (padded) volume, not a patch
        assert batch["image"].shape == (1, 1, *shape) and batch["image"].dtype == torch.float32
        assert batch["label"].shape == (1, 1, *shape) and batch["label"].dtype == torch.long
        assert set(torch.unique(batch["label"]).tolist()) == {0, 1, 2}
        assert batch["spacing"].shape == (1, 3) and batch["spacing"].dtype == torch.float32
        torch.testing.assert_close(batch["spacing"], torch.tensor([[3.0, 3.0, 3.0]]))
        assert batch["location"].tolist() == [[0, 0, 0, *shape]]
        assert isinstance(batch["subject"][0], tio.Subject) and batch["subject"][0] is subject
        assert torch.equal(batch["image"][0], subject["image"].data)
        assert batch["image"].data_ptr() != subject["image"].data.data_ptr()  # a copy: the cache stays intact
        moved = move_data_to_device(batch, torch.device("cpu"))  # what Lightning does with every batch
        assert moved["subject"][0] is subject
    test_batches = list(dm.test_dataloader())  # no test split: the validation subjects
    assert [b["subject_id"] for b in test_batches] == [b["subject_id"] for b in batches]
    reconstruct = _dm(labeled_ct_dir, val_fraction=0.34)
    reconstruct.setup("fit")
    assert next(iter(reconstruct.val_dataloader()))["image"].shape[2:] == PATCH  # other tasks: patch grid


def test_whole_volume_loader_under_ddp(labeled_ct_dir: Path, tmp_path: Path) -> None:
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        dm = _dm(labeled_ct_dir, task="segment", val_fraction=0.34)
        dm.setup("fit")
        loader = dm.val_dataloader()
        assert isinstance(loader.sampler, DistributedSampler) and not loader.sampler.shuffle
        assert len(list(loader)) == len(dm.val_records)
        assert isinstance(dm.predict_dataloader().sampler, UnrepeatedSampler)
    finally:
        dist.destroy_process_group()


def test_test_subjects_without_label_cannot_be_scored(labeled_ct_dir: Path) -> None:
    rows = ["subject_id,image,label,split"]
    for i in range(5):
        rows.append(f"s{i},images/case_{i:03d}.nii.gz,labels/case_{i:03d}.nii.gz,{'val' if i == 4 else ''}")
    rows.append("s5,images/case_005.nii.gz,,test")
    (labeled_ct_dir / "subjects.csv").write_text("\n".join(rows) + "\n")
    dm = _dm(labeled_ct_dir / "subjects.csv", task="segment")
    dm.setup("fit")
    assert [b["subject_id"] for b in dm.val_dataloader()] == [["s4"]]
    with pytest.raises(DataError, match=r"case_005\.nii\.gz: subject 's5' has no label"):
        dm.test_dataloader()


def test_predict_dataloader_yields_every_image(flat_ct_dir: Path) -> None:
    dm = _dm(flat_ct_dir, task="segment")  # segmentation model, unlabelled images
    dm.setup("predict")  # no label needed for prediction
    loader = dm.predict_dataloader()
    batches = list(loader)
    records = discover_subjects(flat_ct_dir)
    assert [b["subject_id"] for b in batches] == [[r.subject_id] for r in records]
    for batch, record in zip(batches, records):
        assert set(batch) == {"image", "subject_id", "spacing", "location", "subject", "source"}
        assert batch["source"] == [str(record.image)] and Path(batch["source"][0]).is_file()
        subject = batch["subject"][0]
        assert batch["image"].shape == (1, 1, *subject.spatial_shape)
        assert all(s >= p for s, p in zip(subject.spatial_shape, PATCH))
        torch.testing.assert_close(batch["spacing"], torch.tensor([[3.0, 3.0, 3.0]]))
        assert dm.source_image(record.subject_id).path == record.image
    with pytest.raises(DataError, match="no label"):
        dm.setup("fit")  # training still needs labels


def test_predict_ignores_labels_and_maps_back(tiny_ct_dir: Path) -> None:
    """Labels are not part of prediction batches; a prediction maps back onto the source grid."""
    import numpy as np
    import torchio as tio

    from maesil.data.io import read_volume
    from maesil.evaluation.segmentation import segmentation_scores, to_original_geometry

    dm = _dm(tiny_ct_dir, task="segment", target_spacing=4.0, num_workers=1)
    dm.setup("predict")
    assert len(dm.predict_records) == 3 and all(r.label is None for r in dm.predict_records)
    batch = next(iter(dm.predict_dataloader()))
    assert "label" not in batch and "label" not in batch["subject"][0]
    source = dm.source_image(batch["subject_id"][0])
    assert str(source.path) == batch["source"][0]
    # a "model" that thresholds the preprocessed image: body vs air
    body = (batch["image"][0, 0] > 0.05).long()
    probabilities = torch.stack([1 - body, body]).float()
    mapped = to_original_geometry(probabilities, batch["subject"][0], source)
    assert mapped.spatial_shape == source.spatial_shape and np.allclose(mapped.affine, source.affine)
    hu = tio.ScalarImage(batch["source"][0], reader=read_volume).data[0]
    expected = (hu > -175 + 0.05 * 425).long()
    assert segmentation_scores(mapped.data[0].long(), expected, 2, source.spacing)["dice"][0] > 0.9


class _ThresholdSegmenter(L.LightningModule):
    """Body vs air by thresholding, through the whole-volume evaluation path."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(40.0))
        self.scored: list[str] = []

    def _probabilities(self, image: torch.Tensor) -> torch.Tensor:
        from maesil.evaluation.segmentation import sliding_window_probabilities

        def predict(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([torch.zeros_like(x), self.scale * (x - 0.05)], dim=1)

        return sliding_window_probabilities(predict, image, PATCH, overlap=0.5, device=self.device)

    def validation_step(self, batch, batch_idx):
        from maesil.evaluation.segmentation import segmentation_scores

        probabilities = self._probabilities(batch["image"][0])
        assert probabilities.shape[1:] == batch["image"].shape[2:]
        spacing = tuple(batch["spacing"][0].tolist())
        body = probabilities.argmax(0)
        scores = segmentation_scores(body, body.clone(), 2, spacing)
        assert float(scores["dice"][0]) == 1.0 and float(scores["hd95"][0]) == 0.0
        organs = batch["label"][0, 0] > 0
        assert bool(body[organs].all())  # the labelled organs lie inside the body
        self.scored.extend(batch["subject_id"])

    def predict_step(self, batch, batch_idx):
        from maesil.evaluation.segmentation import to_original_geometry

        probabilities = self._probabilities(batch["image"][0])
        label_map = to_original_geometry(probabilities, batch["subject"][0], self.trainer.datamodule.source_image(
            batch["subject_id"][0]))
        return label_map.data, label_map.affine  # Lightning moves predictions to the CPU: no tio objects here


def test_lightning_whole_volume_validate_and_predict(labeled_ct_dir: Path, tmp_path: Path) -> None:
    import numpy as np

    dm = _dm(labeled_ct_dir, task="segment", val_fraction=0.34)
    model = _ThresholdSegmenter()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.validate(model, datamodule=dm)
    assert model.scored == [r.subject_id for r in dm.val_records]
    label_maps = trainer.predict(model, datamodule=dm)
    assert len(label_maps) == 6
    for (data, affine), record in zip(label_maps, dm.predict_records):
        source = dm.source_image(record.subject_id)
        assert tuple(data.shape[1:]) == source.spatial_shape and np.allclose(affine, source.affine)
        assert set(torch.unique(data).tolist()) == {0, 1}


def test_hu_window_null_is_for_mri_only(flat_ct_dir: Path) -> None:
    mri = _dm(flat_ct_dir, modality="mri", hu_window=None)
    assert mri.hu_window is None and mri.settings.hu_window is None
    assert _dm(flat_ct_dir, modality="mri").settings == mri.settings  # the window is no MRI setting
    with pytest.raises(ValueError, match="hu_window is None, but CT needs a window"):
        _dm(flat_ct_dir, hu_window=None)  # CT: an error, not a silent default window
    assert _dm(flat_ct_dir, hu_window=(-100, 300)).settings.hu_window == (-100.0, 300.0)


def test_mri_cache_is_not_refused_over_a_window(flat_ct_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _dm(flat_ct_dir, modality="mri", hu_window=(-1000, 1000), cache_dir=str(cache)).prepare_data()
    for window in (None, (-175.0, 250.0)):
        dm = _dm(cache, modality="mri", hu_window=window)
        dm.setup("fit")
        assert len(dm.train_records) + len(dm.val_records) == 4
    _dm(flat_ct_dir, cache_dir=str(tmp_path / "ct"), hu_window=(-1000, 1000)).prepare_data()
    with pytest.raises(DataError, match="cache was prepared with"):
        _dm(tmp_path / "ct").setup("fit")  # for CT the window still decides the cache


# ---------------------------------------------------------------- what methods and checkpoints read


def test_spec_is_the_typed_view_methods_read(labeled_ct_dir: Path) -> None:
    assert _dm(labeled_ct_dir, task="segment", num_classes=3).spec == DataSpec(
        task="segment", modality="ct", superpatch_size=PATCH, target_spacing=(3.0, 3.0, 3.0),
        hu_window=(-175.0, 250.0), num_classes=3, batch_size=3)
    mri = _dm(labeled_ct_dir, modality="mri", target_spacing=None, superpatch_size=16).spec
    assert mri.hu_window is None and mri.target_spacing is None and mri.num_classes is None
    assert mri.superpatch_size == (16, 16, 16) and mri.task == "reconstruct"


class _DataPositions(L.Callback):
    """The DataModule's data position at the end of every training batch (when a checkpoint may be saved)."""

    def __init__(self) -> None:
        self.positions: list[tuple[int, int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        state = trainer.datamodule.state_dict()
        self.positions.append((state["epoch"], state["batches_in_epoch"]))


def test_state_dict_counts_the_training_batches_of_the_epoch(flat_ct_dir: Path, tmp_path: Path) -> None:
    dm = _dm(flat_ct_dir)  # 3 training subjects x 2 superpatches / batch 3: 2 batches an epoch
    callback = _DataPositions()
    trainer = L.Trainer(max_steps=5, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        limit_val_batches=0, callbacks=[callback])
    trainer.fit(_TinyModule(), datamodule=dm)
    assert callback.positions == [(0, 1), (0, 2), (1, 1), (1, 2), (2, 1)]
    resumed = _dm(flat_ct_dir)
    resumed.load_state_dict({"epoch": 2, "batches_in_epoch": 1, "batch_size": 3})
    resumed.setup("fit")
    assert [len(batch["subject_id"]) for batch in resumed.train_dataloader()] == [3]  # the epoch's second half


def test_loaders_leave_the_warning_filters_alone(labeled_ct_dir: Path, tmp_path: Path) -> None:
    before = list(warnings.filters)
    for dm in (_dm(labeled_ct_dir, task="segment"), _dm(labeled_ct_dir, cache_dir=str(tmp_path / "cache"))):
        dm.prepare_data()
        dm.setup("fit")
        for build in (dm.train_dataloader, dm.val_dataloader, dm.predict_dataloader):
            build()
    assert warnings.filters == before
