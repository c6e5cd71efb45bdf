"""3D RoIAlign: resample a view's feature map over a box given in the coordinates of the volume the view
was cut from, undoing the view's flips, so that two views' features of the same anatomy land on one grid.

This is the alignment step of PGL (prior-guided local consistency). The *prior* is the geometry that
made each view from the superpatch (:mod:`maesil.data.views`): a box in continuous voxel-edge
coordinates of the superpatch (voxel ``i`` covers ``[i, i + 1)``), resized to the view, then flipped per
axis. A feature map of the view, at any resolution, is assumed to cover the view's box uniformly: its
voxel ``j`` of ``n`` along an axis sits at the fraction ``(j + 0.5) / n`` of the box, which is what
``grid_sample(align_corners=False)`` assumes too. Sampling the feature maps of both views over their
overlap box therefore gives features of the same superpatch positions, in the superpatch's orientation.

Example::

    >>> boxes = torch.tensor([[0., 0, 0, 32, 32, 32]])
    >>> features = torch.randn(1, 8, 16, 16, 16)
    >>> roi_align3d(features, boxes, torch.zeros(1, 3, dtype=torch.bool), boxes, (16, 16, 16)).shape
    torch.Size([1, 8, 16, 16, 16])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maesil.shapes import as_triple


def roi_sampling_grid(view_boxes: Tensor, flips: Tensor, rois: Tensor, output_size: int | Sequence[int],
                      sampling_ratio: int = 1) -> Tensor:
    """The ``grid_sample`` grid that reads ``rois`` out of feature maps of views cut at ``view_boxes``.

    Args:
        view_boxes: (B, 6) ``(x0, y0, z0, x1, y1, z1)`` of each view in superpatch edge coordinates.
        flips: (B, 3) bool, the axes along which each view was flipped after resizing.
        rois: (B, 6) the regions to read, in the same coordinates (e.g. the two views' overlap).
        output_size: the grid size per axis.
        sampling_ratio: samples per output voxel and axis (averaged by :func:`roi_align3d`).

    Returns:
        (B, X·r, Y·r, Z·r, 3) normalised coordinates in ``grid_sample``'s order (last axis = z, y, x).
    """
    size = as_triple(output_size, "output_size")
    if view_boxes.shape != rois.shape or view_boxes.ndim != 2 or view_boxes.shape[1] != 6:
        raise ValueError(f"view_boxes and rois must both be (B, 6), got {tuple(view_boxes.shape)} and "
                         f"{tuple(rois.shape)}")
    if flips.shape != (view_boxes.shape[0], 3):
        raise ValueError(f"flips must be (B, 3), got {tuple(flips.shape)}")
    extent = view_boxes[:, 3:] - view_boxes[:, :3]
    if bool((extent <= 0).any()):
        raise ValueError("every view box needs a positive size along each axis")
    dtype, device = view_boxes.dtype if view_boxes.is_floating_point() else torch.float32, view_boxes.device
    view_boxes, rois = view_boxes.to(dtype), rois.to(dtype)
    axes = []
    for axis, n in enumerate(size):
        steps = n * sampling_ratio
        offsets = (torch.arange(steps, device=device, dtype=dtype) + 0.5) / steps  # (steps,)
        start, stop = rois[:, axis:axis + 1], rois[:, axis + 3:axis + 4]
        positions = start + offsets * (stop - start)  # (B, steps), superpatch edge coordinates
        fraction = (positions - view_boxes[:, axis:axis + 1]) / extent[:, axis:axis + 1].to(dtype)
        fraction = torch.where(flips[:, axis:axis + 1].bool(), 1.0 - fraction, fraction)
        axes.append(2.0 * fraction - 1.0)
    gx, gy, gz = axes
    batch = view_boxes.shape[0]
    x = gx[:, :, None, None].expand(batch, gx.shape[1], gy.shape[1], gz.shape[1])
    y = gy[:, None, :, None].expand_as(x)
    z = gz[:, None, None, :].expand_as(x)
    return torch.stack((z, y, x), dim=-1)


def roi_align3d(features: Tensor, view_boxes: Tensor, flips: Tensor, rois: Tensor,
                output_size: int | Sequence[int], sampling_ratio: int = 1) -> Tensor:
    """Trilinear samples of ``features`` over ``rois``, in superpatch orientation (flips undone).

    Args:
        features: (B, C, X, Y, Z) feature maps of the views (any resolution; they cover the view boxes).
        view_boxes: (B, 6) box of each view in superpatch edge coordinates.
        flips: (B, 3) bool flip flags of each view.
        rois: (B, 6) regions to sample, in superpatch edge coordinates; they should lie inside the view
            boxes (points outside read the border value).
        output_size: grid size of the result per axis.
        sampling_ratio: as in 2D RoIAlign: each output voxel averages ``r³`` regularly spaced samples of
            its bin, which avoids aliasing when the output grid is coarser than the feature map.

    Returns:
        (B, C, *output_size) aligned features; element ``[b, :, i, j, k]`` is the feature of the
        superpatch position at the centre of bin (i, j, k) of ``rois[b]``, whatever the view's flips.
    """
    if features.ndim != 5:
        raise ValueError(f"features must be (B, C, X, Y, Z), got shape {tuple(features.shape)}")
    if sampling_ratio < 1:
        raise ValueError(f"sampling_ratio must be >= 1, got {sampling_ratio}")
    if features.shape[0] != view_boxes.shape[0]:
        raise ValueError(f"features hold {features.shape[0]} views but view_boxes {view_boxes.shape[0]}")
    grid = roi_sampling_grid(view_boxes, flips, rois, output_size, sampling_ratio).to(features.dtype)
    sampled = F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if sampling_ratio > 1:
        sampled = F.avg_pool3d(sampled, kernel_size=sampling_ratio, stride=sampling_ratio)
    return sampled


class RoIAlign3D(nn.Module):
    """Module form of :func:`roi_align3d` with a fixed output size and sampling ratio."""

    def __init__(self, output_size: int | Sequence[int], sampling_ratio: int = 1) -> None:
        super().__init__()
        self.output_size = as_triple(output_size, "output_size")
        if sampling_ratio < 1:
            raise ValueError(f"sampling_ratio must be >= 1, got {sampling_ratio}")
        self.sampling_ratio = int(sampling_ratio)

    def forward(self, features: Tensor, view_boxes: Tensor, flips: Tensor, rois: Tensor) -> Tensor:
        return roi_align3d(features, view_boxes, flips, rois, self.output_size, self.sampling_ratio)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, sampling_ratio={self.sampling_ratio}"
