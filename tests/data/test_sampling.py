"""Patch-location policies (uniform, label-centred with the border rule) and the resumable samplers."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from maesil.data.sampling import (
    LabelCentredPolicy,
    LabelMapVoxels,
    ResumableSampler,
    UniformPolicy,
    UnrepeatedSampler,
    place_around,
)
from maesil.data.records import DataError

SHAPE = np.array([20, 16, 12])
SIZE = np.array([8, 8, 6])


def _one_voxel(voxel: tuple[int, int, int], value: int = 1) -> LabelMapVoxels:
    label = np.zeros(tuple(SHAPE), np.uint8)
    label[voxel] = value
    return LabelMapVoxels(label, where="label.nii.gz: subject 's'")


def test_uniform_policy_is_uniform_over_all_positions() -> None:
    rng = np.random.default_rng(0)
    starts = np.array([UniformPolicy().start((7, 8, 4), (3, 8, 2), rng) for _ in range(6000)])
    assert starts[:, 1].tolist() == [0] * 6000  # the patch fills Y: one position
    for axis, positions in ((0, 5), (2, 3)):
        counts = Counter(starts[:, axis].tolist())
        assert sorted(counts) == list(range(positions))  # every position, flush with both borders
        expected = 6000 / positions
        assert all(abs(n - expected) < 0.1 * expected for n in counts.values())


@pytest.mark.parametrize("voxel", [(0, 0, 0), (19, 15, 11), (0, 8, 11), (10, 8, 6), (3, 14, 1)])
def test_label_centred_patch_holds_the_voxel_and_moves_least(voxel: tuple[int, int, int]) -> None:
    start = LabelCentredPolicy().start(SHAPE, SIZE, np.random.default_rng(1), _one_voxel(voxel))
    assert start.tolist() == np.clip(np.array(voxel) - SIZE // 2, 0, SHAPE - SIZE).tolist()
    assert ((start <= voxel) & (np.array(voxel) < start + SIZE)).all()  # the labelled voxel is inside
    assert (start >= 0).all() and (start + SIZE <= SHAPE).all()
    if voxel == (10, 8, 6):  # away from the border: centred exactly (centre index size // 2)
        assert (start + SIZE // 2).tolist() == list(voxel)


def test_place_around_is_the_documented_rule() -> None:
    assert place_around(np.array([0, 5, 11]), SHAPE, SIZE).tolist() == [0, 1, 6]
    assert place_around(np.array([19, 4, 3]), SHAPE, SIZE).tolist() == [12, 0, 0]


def test_label_probabilities_choose_among_present_values() -> None:
    label = np.zeros(tuple(SHAPE), np.int16)
    label[:4] = 1
    label[4:6] = 2
    labels = LabelMapVoxels(label, where="l: subject 's'")
    assert labels.values.tolist() == [0, 1, 2] and labels.counts.tolist() == [2688, 768, 384]
    rng = np.random.default_rng(2)
    drawn = Counter(LabelCentredPolicy({1: 1.0, 2: 3.0, 9: 5.0}).draw_value(labels, rng) for _ in range(4000))
    assert set(drawn) == {1, 2} and 0.7 < drawn[2] / 4000 < 0.8  # 9 is absent: 1 and 2 renormalised
    by_count = Counter(LabelCentredPolicy().draw_value(labels, rng) for _ in range(3000))  # label > 0, per voxel
    assert set(by_count) == {1, 2} and 0.6 < by_count[1] / 3000 < 0.73
    for _ in range(50):
        start = LabelCentredPolicy({2: 1.0}).start(SHAPE, SIZE, rng, labels)
        assert (label[start[0]:start[0] + 8, start[1]:start[1] + 8, start[2]:start[2] + 6] == 2).any()
    with pytest.raises(DataError, match=r"l: subject 's' has no voxel with label in \[9\] to centre a patch on"):
        LabelCentredPolicy({9: 1.0}).start(SHAPE, SIZE, rng, labels)


def test_policies_refuse_bad_input() -> None:
    with pytest.raises(ValueError, match="smaller than the patch"):
        UniformPolicy().start((4, 8, 8), (8, 8, 8), np.random.default_rng(0))
    with pytest.raises(ValueError, match="needs the subject's labels"):
        LabelCentredPolicy().start(SHAPE, SIZE, np.random.default_rng(0))
    with pytest.raises(ValueError, match="label_probabilities must be >= 0"):
        LabelCentredPolicy({1: -1.0})


def test_resumable_sampler_skips_once_and_forwards_the_epoch() -> None:
    epochs: list[int] = []
    sampler = ResumableSampler(range(10), num_replicas=1, rank=0, shuffle=True, seed=3, epoch_listeners=[epochs.append])
    full = list(sampler)
    sampler.skip_once(4)
    assert len(sampler) == 10 and list(sampler) == full[4:] and list(sampler) == full
    sampler.set_epoch(2)
    assert epochs == [2] and sampler.epoch == 2 and list(sampler) != full


def test_unrepeated_sampler_shards_every_index_once() -> None:
    shards = [list(UnrepeatedSampler(range(7), num_replicas=3, rank=r)) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert [len(UnrepeatedSampler(range(7), num_replicas=3, rank=r)) for r in range(3)] == [3, 2, 2]


@pytest.mark.parametrize("subjects, ranks", [(6, 2), (5, 2), (7, 3)])
def test_grouped_sharding_gives_each_subject_to_one_rank(subjects: int, ranks: int) -> None:
    from maesil.data.sampling import ResumableSampler

    per_subject = 4
    data = list(range(subjects * per_subject))
    for epoch in (0, 1):
        shards = []
        for rank in range(ranks):
            sampler = ResumableSampler(data, num_replicas=ranks, rank=rank, seed=3, group_size=per_subject)
            sampler.set_epoch(epoch)
            shards.append(list(sampler))
            assert len(shards[-1]) == len(sampler) == -(-subjects // ranks) * per_subject
        owners = [{i // per_subject for i in shard} for shard in shards]
        for shard, mine in zip(shards, owners):  # whole subjects: all their superpatches, once each
            assert sorted(shard) == sorted(g * per_subject + k for g in mine for k in range(per_subject))
        assert set().union(*owners) == set(range(subjects))
        repeated = sum(len(o) for o in owners) - subjects
        assert repeated == -(-subjects // ranks) * ranks - subjects  # only the padding repeats a subject
    assert shards[0] != sorted(shards[0])  # shuffled
