"""RoIAlign3D: two views of a known volume, aligned over their overlap, match the volume itself."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from maesil.data.views import box_intersection, render_view
from maesil.models.roi_align3d import RoIAlign3D, roi_align3d

SIZE = (24, 20, 16)


def linear_volume(shape=SIZE) -> torch.Tensor:
    """(2, X, Y, Z) volume whose channels are linear in the voxel-centre position: trilinear
    interpolation reproduces it exactly, so the only tolerance needed is float rounding."""
    x, y, z = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) + 0.5 for n in shape], indexing="ij")
    return torch.stack([0.3 * x - 0.7 * y + 1.1 * z, -0.2 * x + 0.5 * y + 0.05 * z]).float()


def smooth_volume(shape=SIZE) -> torch.Tensor:
    x, y, z = torch.meshgrid(*[(torch.arange(n, dtype=torch.float64) + 0.5) / n for n in shape], indexing="ij")
    return torch.stack([torch.sin(2.0 * x) * torch.cos(1.5 * y) + z ** 2]).float()


def direct_crop(volume: torch.Tensor, roi: torch.Tensor, size) -> torch.Tensor:
    """Ground truth: the volume itself sampled over ``roi`` (no view involved)."""
    return render_view(volume, roi, torch.zeros(3, dtype=torch.bool), size)


def aligned(view: torch.Tensor, box, flips, roi, size, sampling_ratio=1) -> torch.Tensor:
    return roi_align3d(view[None], box[None], flips[None], roi[None], size, sampling_ratio)[0]


@pytest.mark.parametrize(
    "box1, flips1, box2, flips2",
    [
        # same scale, no flips: plain crops that overlap
        ([0, 0, 0, 16, 12, 10], [0, 0, 0], [6, 4, 4, 22, 16, 14], [0, 0, 0]),
        # flipped case: view 1 flipped along x and z, view 2 along y
        ([0, 0, 0, 16, 12, 10], [1, 0, 1], [6, 4, 4, 22, 16, 14], [0, 1, 0]),
        # scaled case: boxes of different size (and non-integer edges) resized to the same view size
        ([1.5, 0, 2, 21.5, 18, 15], [0, 0, 0], [5, 3, 0, 17, 13, 9.5], [1, 1, 1]),
    ],
)
def test_aligned_views_match_the_direct_crop(box1, flips1, box2, flips2):
    volume = linear_volume()
    box1, box2 = torch.tensor(box1, dtype=torch.float32), torch.tensor(box2, dtype=torch.float32)
    flips1, flips2 = torch.tensor(flips1, dtype=torch.bool), torch.tensor(flips2, dtype=torch.bool)
    view_size = (16, 16, 16)
    view1 = render_view(volume, box1, flips1, view_size)
    view2 = render_view(volume, box2, flips2, view_size)
    overlap = box_intersection(box1, box2)
    out = (6, 5, 4)
    truth = direct_crop(volume, overlap, out)
    first = aligned(view1, box1, flips1, overlap, out)
    second = aligned(view2, box2, flips2, overlap, out)
    assert first.shape == second.shape == truth.shape == (2, *out)
    torch.testing.assert_close(first, truth, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(second, truth, atol=1e-4, rtol=1e-4)


def test_downsampled_feature_maps_align_too():
    """A feature map at half the view's resolution (a stride-2 scale of a U-Net) aligns to the same
    anatomy: on a smooth volume both views agree with the direct crop to interpolation accuracy."""
    volume = smooth_volume((32, 32, 32))
    box1 = torch.tensor([0.0, 2, 4, 24, 26, 28])
    box2 = torch.tensor([6.0, 8, 2, 30, 32, 22])
    flips1 = torch.tensor([True, False, True])
    flips2 = torch.tensor([False, True, False])
    view1 = render_view(volume, box1, flips1, (32, 32, 32))
    view2 = render_view(volume, box2, flips2, (32, 32, 32))
    half1 = F.avg_pool3d(view1[None], 2)[0]
    half2 = F.avg_pool3d(view2[None], 2)[0]
    overlap = box_intersection(box1, box2)
    out = (6, 6, 6)
    truth = direct_crop(volume, overlap, out)
    first = aligned(half1, box1, flips1, overlap, out)
    second = aligned(half2, box2, flips2, overlap, out)
    assert (first - truth).abs().max() < 0.02
    assert (second - truth).abs().max() < 0.02
    # Without undoing the flips the views would disagree badly: the check above is not vacuous.
    unflipped = aligned(half1, box1, torch.zeros(3, dtype=torch.bool), overlap, out)
    assert (unflipped - truth).abs().max() > 0.1


def test_sampling_ratio_averages_the_bin():
    volume = linear_volume()
    box = torch.tensor([0.0, 0, 0, *SIZE])
    roi = torch.tensor([4.0, 4, 4, 12, 12, 12])
    flips = torch.zeros(3, dtype=torch.bool)
    one = aligned(volume, box, flips, roi, (4, 4, 4), sampling_ratio=1)
    four = aligned(volume, box, flips, roi, (4, 4, 4), sampling_ratio=4)
    # For a linear field the mean over a bin is the value at its centre.
    torch.testing.assert_close(one, four, atol=1e-4, rtol=1e-4)
    # Bin centres of roi [4, 12) in 4 bins lie at 5, 7, 9, 11 (edge coordinates), i.e. 0.3 * x + ...
    expected_x = torch.tensor([5.0, 7.0, 9.0, 11.0])
    slope = one[0, :, 0, 0] - one[0, 0, 0, 0]
    torch.testing.assert_close(slope, 0.3 * (expected_x - expected_x[0]), atol=1e-4, rtol=1e-4)


def test_batched_module_and_gradients():
    features = torch.randn(3, 4, 8, 8, 8, requires_grad=True)
    boxes = torch.tensor([[0.0, 0, 0, 16, 16, 16]] * 3)
    rois = torch.tensor([[2.0, 2, 2, 10, 12, 14]] * 3)
    flips = torch.tensor([[False, False, False], [True, False, False], [True, True, True]])
    out = RoIAlign3D((4, 3, 2), sampling_ratio=2)(features, boxes, flips, rois)
    assert out.shape == (3, 4, 4, 3, 2)
    out.sum().backward()
    assert features.grad is not None and features.grad.abs().sum() > 0


def test_bad_arguments_raise():
    features = torch.randn(1, 2, 4, 4, 4)
    box = torch.tensor([[0.0, 0, 0, 8, 8, 8]])
    flips = torch.zeros(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="positive size"):
        roi_align3d(features, torch.tensor([[0.0, 0, 0, 0, 8, 8]]), flips, box, 2)
    with pytest.raises(ValueError, match="output_size"):
        roi_align3d(features, box, flips, box, (2, 2))
    with pytest.raises(ValueError, match=r"\(B, C, X, Y, Z\)"):
        roi_align3d(features[0], box, flips, box, 2)
    with pytest.raises(ValueError, match="sampling_ratio"):
        RoIAlign3D(2, sampling_ratio=0)
