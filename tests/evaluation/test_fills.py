"""The training-free reference fills of ``benchmark-recon --protocol inpaint``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from maesil.evaluation.fills import FILLS, _box_sum, blur_fill, fill_volume, mean_fill


def random_hidden(shape, fraction=0.6, seed=0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < fraction


@pytest.mark.parametrize("fill", [mean_fill, blur_fill])
def test_fills_reproduce_a_constant_volume_exactly(fill):
    images = torch.full((2, 1, 24, 20, 16), 0.3)
    hidden = random_hidden(images.shape)
    assert hidden.any() and (~hidden).any()
    assert torch.equal(fill(images, hidden), images)


def test_blur_fill_beats_mean_fill_on_a_smooth_gradient():
    x, y, z = torch.meshgrid(*(torch.linspace(0, 1, n) for n in (32, 32, 32)), indexing="ij")
    images = (0.5 * x + 0.3 * y + 0.2 * z)[None, None]
    hidden = random_hidden(images.shape, 0.75, seed=1)
    errors = {name: float(((fill(images, hidden) - images)[hidden] ** 2).mean()) for name, fill in FILLS.items()}
    assert errors["blur fill"] < 0.2 * errors["mean fill"]


def test_fills_keep_visible_voxels_and_fill_per_superpatch():
    images = torch.rand(3, 1, 8, 8, 8)
    hidden = random_hidden(images.shape)
    for fill in (mean_fill, blur_fill):
        out = fill(images, hidden)
        assert torch.equal(out[~hidden], images[~hidden])
    out = mean_fill(images, hidden)
    for b in range(3):
        expected = images[b][~hidden[b]].mean()
        assert torch.allclose(out[b][hidden[b]], expected.expand(int(hidden[b].sum())), atol=1e-6)


def test_blur_fill_is_the_normalised_box_convolution():
    images = torch.rand(1, 1, 20, 18, 19, dtype=torch.float64)
    hidden = random_hidden(images.shape, 0.5, seed=2)
    box = torch.ones(1, 1, 5, 5, 5, dtype=torch.float64)
    assert torch.allclose(_box_sum(images, 5), F.conv3d(images, box, padding=2))
    visible = (~hidden).double()
    expected = F.conv3d(images * visible, box, padding=2) / F.conv3d(visible, box, padding=2)
    out = blur_fill(images, hidden, size=5)
    assert torch.allclose(out[hidden], expected[hidden])


def test_blur_fill_falls_back_to_the_mean_where_the_box_sees_nothing():
    images = torch.rand(1, 1, 16, 16, 16)
    hidden = torch.ones_like(images, dtype=torch.bool)
    hidden[..., :2] = False  # only the first two axial slices are visible
    out = blur_fill(images, hidden, size=3)
    far = hidden.clone()
    far[..., :4] = False  # a 3³ box around z ≥ 4 holds no visible voxel
    assert torch.allclose(out[far], images[~hidden].mean().expand(int(far.sum())), atol=1e-6)
    assert not torch.allclose(out, mean_fill(images, hidden), atol=1e-6)


def test_fill_volume_uses_the_padded_superpatch_grid():
    image = torch.rand(20, 13, 9)
    hidden = random_hidden(image.shape, 0.5, seed=3)
    out = fill_volume(mean_fill, image, hidden, 8, padding_value=0.0)
    assert out.shape == image.shape and torch.equal(out[~hidden], image[~hidden])
    # the superpatch at the grid's origin: the volume is padded centred to 24×16×16, i.e. 2, 1 and 3 voxels
    padded = torch.zeros(24, 16, 16)
    mask = torch.zeros(24, 16, 16, dtype=torch.bool)
    padded[2:22, 1:14, 3:12], mask[2:22, 1:14, 3:12] = image, hidden
    corner, corner_mask = padded[:8, :8, :8], mask[:8, :8, :8]
    expected = corner[~corner_mask].mean()
    inside = corner_mask[2:, 1:, 3:]
    assert torch.allclose(out[:6, :7, :5][inside], expected.expand(int(inside.sum())), atol=1e-6)
