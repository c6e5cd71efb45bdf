from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torchio as tio

from maesil.data.io import read_volume, subject_from_record
from maesil.phantoms import ORGAN_LABELS
from maesil.data.preprocess import PreprocessSettings
from maesil.data.records import SubjectRecord
from maesil.evaluation.segmentation import (
    SegmentationScoreboard,
    grid_overlap,
    segmentation_scores,
    sliding_window_probabilities,
    to_original_geometry,
    write_label_map,
)

NUM_ORGANS = len(ORGAN_LABELS)


# ---------------------------------------------------------------- sliding window


def _pointwise_logits(x: torch.Tensor) -> torch.Tensor:
    """Three-class logits computed voxel by voxel from the input, so the whole-volume answer is known."""
    return torch.cat([3 * x, -2 * x + 1, x * x], dim=1)


def _ramp_volume(shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    """Random values plus a ramp along every axis: any misplaced patch changes the answer."""
    generator = torch.Generator().manual_seed(seed)
    grids = torch.meshgrid(*(torch.linspace(0, 1, n) for n in shape), indexing="ij")
    return (torch.rand(1, *shape, generator=generator) + grids[0] - grids[1] + 0.5 * grids[2]).float()


def test_grid_overlap_rounds_to_even_voxels() -> None:
    assert grid_overlap(96, 0.5) == (48, 48, 48)
    assert grid_overlap((15, 3, 1), 0.5) == (8, 2, 0)
    assert grid_overlap((4, 16, 10), 0.9) == (2, 14, 8)  # always smaller than the patch
    assert grid_overlap(16, 0.0) == (0, 0, 0)
    with pytest.raises(ValueError, match="overlap"):
        grid_overlap(16, 1.0)


@pytest.mark.parametrize("blend", ["hann", "average"])
@pytest.mark.parametrize("overlap", [0.0, 0.5])
@pytest.mark.parametrize("shape", [(21, 18, 11), (16, 8, 8), (5, 12, 7)])  # not divisible; exact; smaller than patch
def test_sliding_window_matches_whole_volume(blend: str, overlap: float, shape: tuple[int, int, int]) -> None:
    image = _ramp_volume(shape)
    calls = []

    def predict(batch: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(batch.shape))
        return _pointwise_logits(batch)

    probabilities = sliding_window_probabilities(predict, image, superpatch_size=(8, 8, 8), overlap=overlap,
                                                 blend=blend, batch_size=3)
    expected = torch.softmax(_pointwise_logits(image[None]), dim=1)[0]
    assert probabilities.shape == (3, *shape) and probabilities.dtype == torch.float32
    assert probabilities.device.type == "cpu"
    torch.testing.assert_close(probabilities, expected, atol=1e-5, rtol=1e-5)
    assert all(c[0] <= 3 and c[1:] == (1, 8, 8, 8) for c in calls)
    n_patches = sum(c[0] for c in calls)
    padded = [max(s, 8) for s in shape]
    step = 8 - grid_overlap(8, overlap)[0]
    assert n_patches == math.prod(math.ceil((s - 8) / step) + 1 for s in padded)


def test_sliding_window_geometry_of_an_image() -> None:
    """A tio.ScalarImage in: the output has its shape and, wrapped with its affine, its exact grid."""
    affine = np.array([[-1.5, 0, 0, 30.0], [0, -0.8, 0, 12.0], [0, 0, 2.5, -40.0], [0, 0, 0, 1]])
    image = tio.ScalarImage(tensor=_ramp_volume((19, 6, 13), seed=1), affine=affine)
    probabilities = sliding_window_probabilities(_pointwise_logits, image, superpatch_size=(8, 8, 8), overlap=0.5)
    output = tio.ScalarImage(tensor=probabilities, affine=image.affine)
    assert output.spatial_shape == image.spatial_shape
    assert np.allclose(output.affine, affine) and output.orientation == image.orientation
    expected = torch.softmax(_pointwise_logits(image.data[None]), dim=1)[0]
    torch.testing.assert_close(probabilities, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probabilities.sum(0), torch.ones(19, 6, 13))


def test_sliding_window_blends_overlapping_patches() -> None:
    """Two patches along X that disagree: 'average' gives exactly 1/2 in the overlap, 'hann' a
    smooth monotone transition, and both keep each patch's own answer where it is alone."""
    image = torch.zeros(1, 24, 8, 8)
    seen = []

    def predict(batch: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(batch.shape[0], 2, *batch.shape[2:])
        for b in range(batch.shape[0]):
            logits[b, len(seen) % 2] = 30.0  # first patch: class 0; second: class 1
            seen.append(b)
        return logits

    average = sliding_window_probabilities(predict, image, (16, 8, 8), overlap=0.5, blend="average", batch_size=1)
    assert len(seen) == 2
    torch.testing.assert_close(average[1, :8], torch.zeros(8, 8, 8))
    torch.testing.assert_close(average[1, 8:16], torch.full((8, 8, 8), 0.5))
    torch.testing.assert_close(average[1, 16:], torch.ones(8, 8, 8))
    seen.clear()
    hann = sliding_window_probabilities(predict, image, (16, 8, 8), overlap=0.5, blend="hann", batch_size=2)
    profile = hann[1, :, 4, 4]
    assert torch.all(profile[1:] >= profile[:-1] - 1e-6)
    assert float(profile[:8].max()) < 1e-6 and float(profile[16:].min()) > 1 - 1e-6
    assert 0.0 < float(profile[8]) < 0.5 < float(profile[15]) < 1.0
    torch.testing.assert_close(hann.sum(0), torch.ones(24, 8, 8))


def test_sliding_window_checks_the_model_output() -> None:
    with pytest.raises(ValueError, match=r"predict_fn returned shape \(1, 2, 4, 4, 4\)"):
        sliding_window_probabilities(lambda x: torch.zeros(x.shape[0], 2, 4, 4, 4), torch.zeros(1, 8, 8, 8),
                                     superpatch_size=8, batch_size=1)
    with pytest.raises(ValueError, match="blend"):
        sliding_window_probabilities(_pointwise_logits, torch.zeros(1, 8, 8, 8), 8,
                                     blend="crop")  # type: ignore[arg-type]


# ---------------------------------------------------------------- scores


def test_perfect_prediction_scores() -> None:
    target = torch.zeros(20, 20, 12, dtype=torch.long)
    target[3:12, 4:15, 2:8] = 1
    target[14:18, 2:6, 5:10] = 3
    scores = segmentation_scores(target.clone(), target, num_classes=4, spacing=(0.8, 0.8, 2.5))
    assert scores["dice"][0] == 1.0 and scores["dice"][2] == 1.0
    assert scores["hd95"][0] == 0.0 and scores["hd95"][2] == 0.0
    assert math.isnan(scores["dice"][1]) and math.isnan(scores["hd95"][1])  # class 2 absent from both
    assert scores["target_present"].tolist() == [True, False, True]
    assert scores["prediction_present"].tolist() == [True, False, True]
    assert scores["dice"].dtype == scores["hd95"].dtype == torch.float32


@pytest.mark.parametrize(("axis", "shift", "spacing", "dice", "hd95"), [
    (0, 2, (0.8, 1.0, 2.5), 8 / 10, 2 * 0.8),  # 10-voxel cube moved 2 voxels: overlap 8/10 along the axis
    (2, 1, (0.8, 1.0, 2.5), 9 / 10, 1 * 2.5),
    (1, 3, (0.8, 1.25, 2.5), 7 / 10, 3 * 1.25),
])
def test_shifted_cube(axis: int, shift: int, spacing: tuple, dice: float, hd95: float) -> None:
    target = torch.zeros(24, 24, 24, dtype=torch.long)
    target[4:14, 4:14, 4:14] = 1
    prediction = torch.roll(target, shifts=shift, dims=axis)
    scores = segmentation_scores(prediction, target, num_classes=2, spacing=spacing)
    # Dice = 2 |A ∩ B| / (|A| + |B|) = 2 * 10 * 10 * (10 - shift) / (2 * 1000)
    assert float(scores["dice"][0]) == pytest.approx(dice, abs=1e-6)
    assert float(scores["hd95"][0]) == pytest.approx(hd95, abs=1e-5)


def test_one_sided_and_absent_classes() -> None:
    target = torch.zeros(10, 10, 10, dtype=torch.long)
    target[2:5, 2:5, 2:5] = 1  # class 1: missed by the prediction
    prediction = torch.zeros_like(target)
    prediction[6:9, 6:9, 6:9] = 2  # class 2: spurious
    scores = segmentation_scores(prediction, target, num_classes=4, spacing=(1.0, 1.0, 1.0))
    assert scores["dice"][:2].tolist() == [0.0, 0.0]
    assert math.isnan(scores["dice"][2])
    assert all(math.isnan(v) for v in scores["hd95"].tolist())
    with pytest.raises(ValueError, match=r"outside 0\.\.3"):
        segmentation_scores(prediction + 2, target, num_classes=4, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="differ in shape"):
        segmentation_scores(prediction[:5], target, num_classes=4, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="integer labels"):
        segmentation_scores(prediction.float(), target, num_classes=4, spacing=(1.0, 1.0, 1.0))


def _scores(dice: list[float], hd95: list[float], target: list[bool], pred: list[bool]) -> dict[str, torch.Tensor]:
    return {"dice": torch.tensor(dice), "hd95": torch.tensor(hd95), "target_present": torch.tensor(target),
            "prediction_present": torch.tensor(pred)}


def test_scoreboard_means_skip_nan() -> None:
    nan = float("nan")
    board = SegmentationScoreboard(num_classes=4)
    assert board.add(_scores([0.8, nan, 0.0], [2.0, nan, nan], [True, False, True], [True, False, False]), "a")
    assert board.add(_scores([0.6, nan, 0.5], [4.0, nan, 3.0], [True, False, True], [True, False, True]), "b")
    assert not board.add(_scores([0.0, 0.0, 0.0], [9.0, 9.0, 9.0], [True] * 3, [True] * 3), "a")  # DDP repeat
    assert len(board) == 2
    per_class = board.per_class()
    torch.testing.assert_close(per_class["dice"][[0, 2]], torch.tensor([0.7, 0.25]))
    torch.testing.assert_close(per_class["hd95"][[0, 2]], torch.tensor([3.0, 3.0]))
    assert math.isnan(per_class["dice"][1]) and math.isnan(per_class["hd95"][1])
    mean = board.mean()
    assert float(mean["dice"]) == pytest.approx((0.7 + 0.25) / 2)
    assert float(mean["hd95"]) == pytest.approx(3.0)
    counts = board.counts()
    assert counts["volumes"].tolist() == [2, 2, 2]
    assert counts["dice"].tolist() == [2, 0, 2] and counts["hd95"].tolist() == [2, 0, 1]
    assert counts["hd95_one_sided"].tolist() == [0, 0, 1] and counts["absent"].tolist() == [0, 2, 0]
    logged = board.compute(["background", "liver", "spleen", "kidney"])
    assert set(logged) == {"dice/mean", "hd95/mean", "dice/liver", "hd95/liver", "dice/spleen", "hd95/spleen",
                           "dice/kidney", "hd95/kidney"}
    table = board.format_table({1: "liver", 2: "spleen", 3: "kidney"})
    assert "liver" in table and "0.7000" in table and "3.00" in table and "mean" in table
    assert table.splitlines()[0] == "2 volume(s)"
    other = SegmentationScoreboard(num_classes=4)
    other.update(torch.zeros(4, 4, 4, dtype=torch.long), torch.zeros(4, 4, 4, dtype=torch.long), (1.0, 1.0, 1.0), "c")
    other.add(_scores([0.0] * 3, [0.0] * 3, [True] * 3, [True] * 3), "b")
    board.merge(other)
    assert board.subject_ids == ["a", "b", "c"]
    board.reset()
    assert len(board) == 0 and math.isnan(board.mean()["dice"])


def test_scoreboard_rejects_wrong_sizes() -> None:
    board = SegmentationScoreboard(num_classes=3)
    with pytest.raises(ValueError, match="expected 2"):
        board.add(_scores([1.0] * 3, [0.0] * 3, [True] * 3, [True] * 3))
    with pytest.raises(ValueError, match="class_names has 5 names"):
        board.format_table(["a", "b", "c", "d", "e"])


# ---------------------------------------------------------------- back to the input geometry


def _reoriented_copy(root: Path, out: Path, spacing: tuple[float, float, float], orientation: str) -> Path:
    """Phantom 0 resampled to ``spacing`` and stored in another axis order / direction."""
    subject = tio.Subject(image=tio.ScalarImage(root / "images" / "phantom_000.nii.gz", reader=read_volume),
                          label=tio.LabelMap(root / "labels" / "phantom_000.nii.gz", reader=read_volume))
    subject = tio.ToOrientation(orientation)(tio.Resample(spacing)(subject))
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    subject["image"].save(out / "images" / "phantom_000.nii.gz")
    subject["label"].save(out / "labels" / "phantom_000.nii.gz")
    return out


@pytest.fixture(scope="module")
def reoriented_dirs(tiny_ct_dir: Path, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("reoriented")
    return {
        "LPS": _reoriented_copy(tiny_ct_dir, base / "lps", (3.0, 5.0, 6.0), "LPS"),
        "PIL": _reoriented_copy(tiny_ct_dir, base / "pil", (5.0, 3.0, 4.0), "PIL"),  # axes permuted too
    }


@pytest.mark.parametrize(("case", "target_spacing"), [
    ("tiny", (4.0, 4.0, 4.0)), ("tiny", (3.0, 3.0, 6.0)), ("LPS", (4.0, 4.0, 4.0)), ("PIL", (3.0, 3.0, 3.0)),
])
def test_label_through_preprocessing_maps_back(tiny_ct_dir: Path, reoriented_dirs: dict[str, Path], case: str,
                                               target_spacing: tuple[float, float, float], tmp_path: Path) -> None:
    root = tiny_ct_dir if case == "tiny" else reoriented_dirs[case]
    seeds = range(3) if case == "tiny" else range(1)
    settings = PreprocessSettings(target_spacing=target_spacing)
    for seed in seeds:
        name = f"phantom_{seed:03d}.nii.gz"
        record = SubjectRecord(name, root / "images" / name, root / "labels" / name)
        # superpatch 64 > the cropped volume along some axes: padding is undone too
        preprocessed = settings.transform(min_shape=64)(subject_from_record(record, with_label=True))
        assert preprocessed["image"].orientation == ("R", "A", "S")
        label = preprocessed["label"].data[0].long()
        probabilities = torch.nn.functional.one_hot(label, NUM_ORGANS).permute(3, 0, 1, 2).float()
        source = tio.ScalarImage(record.image, reader=read_volume)
        mapped = to_original_geometry(probabilities, preprocessed, source)
        original = tio.LabelMap(record.label, reader=read_volume)
        assert mapped.spatial_shape == original.spatial_shape == source.spatial_shape
        assert np.allclose(mapped.affine, source.affine)
        if case != "tiny":
            assert source.orientation == tuple(case)
        scores = segmentation_scores(mapped.data[0].long(), original.data[0].long(), NUM_ORGANS, source.spacing)
        counts = torch.bincount(original.data.long().flatten(), minlength=NUM_ORGANS)[1:]
        for organ, (dice, count) in enumerate(zip(scores["dice"].tolist(), counts.tolist()), start=1):
            if count >= 200:  # organs of a few voxels may vanish at coarse spacing
                assert dice > 0.95, (seed, ORGAN_LABELS[organ], dice)  # a 1-voxel shift gives ~0.7-0.9
        if seed == 0:
            path = write_label_map(mapped, tmp_path / "out" / f"{case}.nii.gz")
            written = nib.load(str(path))
            assert written.get_data_dtype() == np.uint8
            assert np.allclose(written.affine, source.affine, atol=1e-4)
            assert np.array_equal(np.asanyarray(written.dataobj), mapped.data[0].numpy())


def test_to_original_geometry_checks_shapes(tiny_ct_dir: Path) -> None:
    subject = tio.Subject(image=tio.ScalarImage(tensor=torch.zeros(1, 6, 6, 6)), subject_id="s1")
    with pytest.raises(ValueError, match=r"subject s1: probabilities of shape \(5, 6, 6\)"):
        to_original_geometry(torch.zeros(2, 5, 6, 6), subject, subject["image"])
    with pytest.raises(ValueError, match="NIfTI"):
        write_label_map(tio.LabelMap(tensor=torch.zeros(1, 2, 2, 2, dtype=torch.uint8)), tiny_ct_dir / "x.mha")


def test_outside_the_preprocessed_volume_is_background() -> None:
    """The original grid extends beyond the (cropped) preprocessed volume: background there."""
    source = tio.ScalarImage(tensor=torch.zeros(1, 20, 20, 20), affine=np.diag([2.0, 2.0, 2.0, 1.0]))
    cropped = tio.Crop((5, 5, 5, 5, 5, 5))(tio.Subject(image=source))
    probabilities = torch.zeros(3, 10, 10, 10)
    probabilities[2] = 1.0  # everything class 2 inside
    mapped = to_original_geometry(probabilities, cropped, source)
    expected = torch.zeros(20, 20, 20, dtype=torch.uint8)
    expected[5:15, 5:15, 5:15] = 2
    assert torch.equal(mapped.data[0], expected)
