"""Batch collation: TorchIO patches and plain dicts, whole volumes, and shared-memory batch buffers."""

from __future__ import annotations

import torch
import torchio as tio
from torch.utils.data import DataLoader, Dataset

from maesil.data.collate import HostList, batch_buffer, collate_patches, collate_volumes


def test_collate_accepts_torchio_patches_and_dicts() -> None:
    image = torch.rand(1, 4, 4, 4)
    patch = tio.Subject(image=tio.ScalarImage(tensor=image), subject_id="a", location=torch.tensor([0, 0, 0, 4, 4, 4]))
    plain = {"image": image * 2, "subject_id": "b", "location": torch.tensor([1, 1, 1, 5, 5, 5])}
    batch = collate_patches([patch, plain])
    assert batch["image"].shape == (2, 1, 4, 4, 4) and torch.equal(batch["image"][1], image * 2)
    assert batch["subject_id"] == ["a", "b"] and batch["location"].dtype == torch.long


class _Buffers(Dataset):
    """Reports, from inside a DataLoader worker, whether batch buffers and collated batches are shared."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.full((1, 2, 2, 2), float(i)), "subject_id": str(i), "location": torch.zeros(6)}


def _collate_in_worker(patches: list) -> dict:
    batch = collate_patches(patches)
    batch["shared"] = torch.tensor([batch_buffer((3, 4), torch.float32).is_shared(), batch["image"].is_shared()])
    return batch


def test_batch_buffers_are_shared_inside_workers_only() -> None:
    assert not batch_buffer((3, 4), torch.float32).is_shared()  # main process: plain memory
    batch = next(iter(DataLoader(_Buffers(), batch_size=2, num_workers=1, collate_fn=_collate_in_worker)))
    assert batch["shared"].tolist() == [True, True]
    assert batch["image"].shape == (2, 1, 2, 2, 2) and batch["image"][1].eq(1).all()


def test_collate_volumes_keeps_subjects_on_the_host() -> None:
    subject = tio.Subject(subject_id="s", image=tio.ScalarImage(tensor=torch.rand(1, 3, 4, 5)),
                          label=tio.LabelMap(tensor=torch.ones(1, 3, 4, 5, dtype=torch.uint8)), source="/x.nii.gz")
    batch = collate_volumes([subject], label_key="label")
    assert batch["location"].tolist() == [[0, 0, 0, 3, 4, 5]] and batch["label"].dtype == torch.long
    assert isinstance(batch["subject"], HostList) and batch["subject"].to("cpu") is batch["subject"]
    assert batch["source"] == ["/x.nii.gz"] and batch["spacing"].tolist() == [[1.0, 1.0, 1.0]]
