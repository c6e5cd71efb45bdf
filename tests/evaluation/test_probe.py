"""The linear probe on frozen features: fit, prediction, Dice, feature maps and the picture."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maesil.evaluation.probe import (
    fit_probe,
    label_fractions,
    linear_probe,
    mid_and_deepest,
    probe_dice,
    probe_figure,
    stage_outputs,
    token_feature_map,
    whitening,
)
from maesil.models.vit3d import patchify

NUM_CLASSES = 4


def cube_labels(count: int, seed: int, size: int = 16) -> torch.Tensor:
    """``count`` label maps (size³) with one 6³ cube of each foreground class 1..3 at random places."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.zeros(count, size, size, size, dtype=torch.long)
    for sample in labels:
        for value in range(1, NUM_CLASSES):
            x, y, z = torch.randint(0, size - 6, (3,), generator=generator).tolist()
            sample[x:x + 6, y:y + 6, z:z + 6] = value
    return labels


def one_hot_features(labels: torch.Tensor, noise: float, seed: int) -> torch.Tensor:
    """Features that encode the label of every voxel (one-hot), plus Gaussian noise."""
    generator = torch.Generator().manual_seed(seed)
    one_hot = F.one_hot(labels, NUM_CLASSES).movedim(-1, 1).float()
    return one_hot + noise * torch.randn(one_hot.shape, generator=generator)


def test_features_that_encode_the_label_give_dice_near_one():
    train, test = cube_labels(3, seed=0), cube_labels(3, seed=1)
    result = linear_probe(one_hot_features(train, 0.1, 0), train, one_hot_features(test, 0.1, 1), test, NUM_CLASSES,
                          iterations=30)
    assert result.dice > 0.99
    assert result.class_dice.shape == (NUM_CLASSES - 1,) and (result.class_dice > 0.99).all()
    assert result.prediction.shape == test.shape and result.prediction.dtype == torch.int64


def test_random_features_score_low():
    train, test = cube_labels(3, seed=0), cube_labels(3, seed=1)
    generator = torch.Generator().manual_seed(2)
    noise = lambda labels: torch.randn(labels.shape[0], 8, *labels.shape[1:], generator=generator)  # noqa: E731
    result = linear_probe(noise(train), train, noise(test), test, NUM_CLASSES, iterations=30)
    assert result.dice < 0.2


def test_coarse_features_are_fitted_on_pooled_labels_and_upsampled_to_the_labels():
    train, test = cube_labels(3, seed=0), cube_labels(3, seed=1)

    def coarse(labels):  # the label fractions on an 8³ grid: what a stride-2 encoder could know at best
        return label_fractions(labels, (8, 8, 8), NUM_CLASSES)

    result = linear_probe(coarse(train), train, coarse(test), test, NUM_CLASSES, iterations=30)
    assert result.prediction.shape == (3, 16, 16, 16)
    assert 0.7 < result.dice < 1.0


def test_the_fit_is_deterministic_and_draws_no_random_number():
    labels = cube_labels(2, seed=0)
    features = one_hot_features(labels, 0.5, 0)
    fractions = label_fractions(labels, (16, 16, 16), NUM_CLASSES)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    first = fit_probe(features, fractions, iterations=10)
    assert torch.equal(torch.get_rng_state(), state)
    second = fit_probe(features, fractions, iterations=10)
    assert torch.equal(first.weight, second.weight) and torch.equal(first.bias, second.bias)
    assert not first.weight.requires_grad
    with torch.no_grad():  # fits under the callback's no_grad as well
        assert torch.equal(fit_probe(features, fractions, iterations=10).weight, first.weight)


def test_whitening_gives_identity_covariance():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(500, 3, generator=generator) @ torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.5, 0.2], [0.0, 0.0, 2.0]])
    mean, matrix = whitening(x, shrinkage=0.0)
    white = (x - mean) @ matrix
    assert torch.allclose(white.T @ white / x.shape[0], torch.eye(3), atol=1e-4)


def test_label_fractions_are_class_shares_of_each_grid_voxel():
    labels = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    labels[0, :2, :2, :2] = 1
    labels[0, 2:, :, :1] = 2
    fractions = label_fractions(labels, (2, 2, 2), 3)
    assert fractions.shape == (1, 3, 2, 2, 2)
    assert torch.allclose(fractions.sum(dim=1), torch.ones(1, 2, 2, 2))
    assert fractions[0, 1, 0, 0, 0] == 1.0
    assert fractions[0, 2, 1, 0, 0] == 0.5 and fractions[0, 0, 1, 0, 0] == 0.5


def test_dice_is_pooled_over_superpatches_with_nan_for_absent_classes():
    target = torch.zeros(2, 4, 4, 4, dtype=torch.long)
    target[0, :2] = 1  # 32 voxels of class 1 in the first superpatch, none in the second
    prediction = torch.zeros_like(target)
    prediction[0, :1] = 1  # 16 of them found
    prediction[1, :1, :1, :1] = 2  # class 2 predicted, absent from the target
    dice = probe_dice(prediction, target, 4)
    assert dice[0] == pytest.approx(2 * 16 / (16 + 32))
    assert dice[1] == 0.0
    assert math.isnan(dice[2])


def test_dice_equals_torchmetrics_dice_score():
    from torchmetrics.functional.segmentation import dice_score

    generator = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (3, 6, 6, 6), generator=generator)
    prediction = torch.randint(0, 4, (3, 6, 6, 6), generator=generator)
    expected = dice_score(prediction, target, num_classes=5, include_background=False, average="none",
                          input_format="index", aggregation_level="global").reshape(-1)
    assert torch.allclose(probe_dice(prediction, target, 5), expected.float(), atol=1e-6)


def test_token_feature_map_places_token_n_at_its_grid_position():
    images = torch.arange(2 * 8 * 12 * 16, dtype=torch.float32).reshape(2, 1, 8, 12, 16)
    tokens = patchify(images, 4)  # (2, 2*3*4, 64)
    features = token_feature_map(tokens, (2, 3, 4))
    assert features.shape == (2, 64, 2, 3, 4)
    assert torch.equal(features[1, :, 1, 2, 3], images[1, 0, 4:8, 8:12, 12:16].reshape(-1))
    with pytest.raises(ValueError, match=r"do not fill the token grid \(2, 3, 3\)"):
        token_feature_map(tokens, (2, 3, 3))


def test_mid_and_deepest_concatenates_the_middle_resolution_and_the_deepest_upsampled():
    stages = [torch.rand(1, 2, 16, 16, 16), torch.rand(1, 3, 8, 8, 8), torch.rand(1, 4, 4, 4, 4),
              torch.rand(1, 5, 2, 2, 2), torch.rand(1, 6, 2, 2, 2)]  # the last two share a resolution
    features = mid_and_deepest(stages)
    assert features.shape == (1, 4 + 6, 4, 4, 4)
    assert torch.equal(features[:, :4], stages[2])
    assert torch.allclose(features[:, 4:].mean(), stages[4].mean(), atol=1e-5)
    single = torch.rand(1, 3, 4, 4, 4)
    assert torch.equal(mid_and_deepest([single]), single)
    blocks = [torch.nn.Conv3d(1, 2, 3, stride=2, padding=1), torch.nn.Conv3d(2, 3, 3, stride=2, padding=1)]
    assert [tuple(o.shape) for o in stage_outputs(blocks, torch.rand(1, 1, 8, 8, 8))] == [(1, 2, 4, 4, 4),
                                                                                          (1, 3, 2, 2, 2)]


def test_bad_inputs_are_named():
    labels = cube_labels(1, seed=0)
    features = one_hot_features(labels, 0.0, 0)
    with pytest.raises(ValueError, match="probe-train labels must be integers"):
        linear_probe(features, labels.float(), features, labels, NUM_CLASSES)
    with pytest.raises(ValueError, match=r"probe-test labels lie in \[0, 3\], outside 0..2"):
        linear_probe(features, labels.clamp(max=2), features, labels, 3)
    with pytest.raises(ValueError, match="probe-test: 1 feature maps for 2 label maps"):
        linear_probe(features, labels, features, labels.repeat(2, 1, 1, 1), NUM_CLASSES)
    with pytest.raises(ValueError, match="differ in channels or grid"):
        linear_probe(features, labels, features[:, :2], labels, NUM_CLASSES)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        linear_probe(features, labels, features, labels, 1)


def test_probe_figure_shows_image_reference_and_prediction():
    image = np.random.default_rng(0).random((16, 16, 16))
    label = cube_labels(1, seed=0)[0].numpy()
    figure = probe_figure(image, label, np.zeros_like(label), {0: "background", 1: "a", 2: "b", 3: "c"}, title="t")
    rows = [axis.get_ylabel() for axis in figure.axes if axis.get_ylabel()]
    assert rows == ["image", "reference", "probe"]
    assert [text.get_text() for text in figure.legends[0].get_texts()] == ["a", "b", "c"]
