"""The TorchIO queue back-end: the policy sampler inside TorchIO, and the seeding of its locations."""

from __future__ import annotations

from itertools import islice

import pytest
import torch
import torchio as tio

from maesil.data.backends.queue import PolicyPatchSampler
from maesil.data.sampling import LabelCentredPolicy, UniformPolicy

SIZE = (8, 8, 6)


def _subject(voxel: tuple[int, int, int]) -> tio.Subject:
    label = torch.zeros(1, 20, 16, 12, dtype=torch.uint8)
    label[(0, *voxel)] = 1
    return tio.Subject(subject_id="s", image=tio.ScalarImage(tensor=torch.rand(1, 20, 16, 12)),
                       label=tio.LabelMap(tensor=label))


def test_policy_patch_sampler_drives_torchio() -> None:
    """Guards the private hook the queue relies on: ``PatchSampler.__call__`` runs our
    ``_generate_patches`` (TorchIO's base class would raise NotImplementedError otherwise)."""
    subject = _subject((0, 15, 11))  # the only labelled voxel sits in a corner
    sampler = PolicyPatchSampler(SIZE, LabelCentredPolicy())
    patches = list(sampler(subject, num_patches=3))
    assert len(patches) == 3
    for patch in patches:
        assert patch[tio.LOCATION].tolist() == [0, 8, 6, 8, 16, 12]  # flush with the border, voxel inside
        assert int(patch["label"].data.sum()) == 1 and patch["image"].shape == (1, *SIZE)
    assert len(list(islice(sampler(subject), 5))) == 5  # the queue's way: an endless generator, sliced
    with pytest.raises(RuntimeError, match="Empty probability map"):  # TorchIO's own rule cannot centre there
        next(tio.LabelSampler(SIZE, "label")(subject))


def test_locations_come_from_torch_global_rng() -> None:
    subject = _subject((10, 8, 6))
    sampler = PolicyPatchSampler(SIZE, UniformPolicy())

    def draw() -> list[list[int]]:
        return [p[tio.LOCATION].tolist() for p in sampler(subject, num_patches=8)]

    torch.manual_seed(5)
    first = draw()
    torch.manual_seed(5)
    assert draw() == first and len({tuple(loc) for loc in first}) > 1  # seed_everything decides them
