"""Reference in-fillings that need no training, for ``benchmark-recon --protocol inpaint``.

Both fill the hidden voxels of a batch of superpatches ``(B, C, X, Y, Z)`` from the visible ones of the
same superpatch and channel, and copy the visible voxels as they are (as the masked methods do):

* :func:`mean_fill`: every hidden voxel gets the mean of the visible voxels of its superpatch;
* :func:`blur_fill`: normalised convolution: the visible intensities and the visibility mask are both
  box-filtered (``size``³ box, stride 1, zero padding that keeps the shape; separable, one ``conv1d`` per
  axis, which equals the ``conv3d`` with a box of ones) and divided, so that each
  hidden voxel gets the mean of the visible voxels within its box; the border needs no special case,
  since numerator and denominator see the same zero padding. Where the box holds no visible voxel the
  mean fill is used.

:func:`fill_volume` applies a fill to a whole volume superpatch by superpatch, on the grid
:func:`~maesil.evaluation.reconstruction.reconstruct_volume` uses (padded, centred, to a multiple of the
superpatch), so a fill sees exactly the context a masked method sees.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from maesil.shapes import as_triple

__all__ = ["mean_fill", "blur_fill", "fill_volume", "FILLS"]


def _check(images: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
    if images.ndim != 5:
        raise ValueError(f"expected images (B, C, X, Y, Z), got shape {tuple(images.shape)}")
    hidden = hidden.to(device=images.device, dtype=torch.bool).expand_as(images)
    return images, hidden


def _visible_mean(images: Tensor, visible: Tensor) -> Tensor:
    """Mean of the visible voxels per superpatch and channel, (B, C, 1, 1, 1); 0 where none is visible."""
    weight = visible.to(images.dtype)
    total = (images * weight).sum(dim=(2, 3, 4), keepdim=True)
    count = weight.sum(dim=(2, 3, 4), keepdim=True)
    return torch.where(count > 0, total / count.clamp_min(1.0), torch.zeros_like(total))


def _box_sum(x: Tensor, size: int) -> Tensor:
    """Sum over a ``size``³ box centred on each voxel, zero padding, same shape: the 3D convolution with a box
    of ones (stride 1, padding ``size // 2``), done separably along each axis by ``F.conv1d`` so that it costs
    3 × ``size`` rather than ``size``³ operations per voxel."""
    kernel = torch.ones(1, 1, size, dtype=x.dtype, device=x.device)
    for dim in (2, 3, 4):
        moved = x.movedim(dim, -1)
        flat = moved.reshape(-1, 1, moved.shape[-1])
        summed = F.conv1d(flat, kernel, padding=size // 2)
        x = summed.reshape(moved.shape).movedim(-1, dim)
    return x


def mean_fill(images: Tensor, hidden: Tensor) -> Tensor:
    """Hidden voxels ← the mean of the visible voxels of their superpatch (and channel); visible voxels kept.

    Args:
        images: (B, C, X, Y, Z).
        hidden: bool, broadcastable to ``images``, True where the voxel is hidden.
    """
    images, hidden = _check(images, hidden)
    mean = _visible_mean(images.double(), ~hidden).to(images.dtype)  # double sums: a constant stays exact
    return torch.where(hidden, mean.expand_as(images), images)


def blur_fill(images: Tensor, hidden: Tensor, size: int = 17) -> Tensor:
    """Hidden voxels ← normalised convolution of the visible voxels with a ``size``³ box (odd ``size``);
    the mean fill where the box sees no visible voxel; visible voxels kept.

    Args:
        images: (B, C, X, Y, Z).
        hidden: bool, broadcastable to ``images``, True where the voxel is hidden.
        size: side of the box in voxels, odd (default 17).
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"size must be a positive odd number, got {size}")
    images, hidden = _check(images, hidden)
    work = images.double()  # sums of many voxels: avoid float32 round-off in the ratio
    visible = (~hidden).to(work.dtype)
    numerator = _box_sum(work * visible, size)
    denominator = _box_sum(visible, size)
    seen = denominator > 0.5  # at least one visible voxel in the box
    blurred = numerator / torch.where(seen, denominator, torch.ones_like(denominator))
    filled = torch.where(seen, blurred, _visible_mean(work, visible > 0).expand_as(work))
    return torch.where(hidden, filled.to(images.dtype), images)


#: The fills by their row name in the benchmark tables.
FILLS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"mean fill": mean_fill, "blur fill": blur_fill}


def fill_volume(fill: Callable[[Tensor, Tensor], Tensor], image: Tensor, hidden: Tensor,
                superpatch_size: int | Sequence[int], padding_value: float | str = 0.0, chunk: int = 8) -> Tensor:
    """Applies ``fill`` to an (X, Y, Z) volume superpatch by superpatch.

    The volume is padded (centred, as :func:`maesil.data.grid.pad_to_multiple` pads) to a multiple of
    ``superpatch_size`` with ``padding_value`` (a number, or ``"minimum"``: the volume's minimum), the
    padding counted as visible, as it is to the models; the fill sees one superpatch at a time; the
    result is cropped back to the volume.

    Args:
        fill: e.g. :func:`mean_fill` or :func:`blur_fill`.
        image: (X, Y, Z) volume.
        hidden: bool (X, Y, Z), True where hidden.
        superpatch_size: the superpatch of the grid.
        padding_value: padding of the grid.
        chunk: superpatches filled at a time (bounds the memory).
    """
    if image.ndim != 3 or tuple(hidden.shape) != tuple(image.shape):
        raise ValueError(f"expected an (X, Y, Z) volume and a mask of its shape, got {tuple(image.shape)} and "
                         f"{tuple(hidden.shape)}")
    size = as_triple(superpatch_size, "superpatch_size")
    shape = tuple(int(s) for s in image.shape)
    padded_shape = tuple(math.ceil(s / p) * p for s, p in zip(shape, size))
    start = tuple((p - s) // 2 for p, s in zip(padded_shape, shape))
    value = float(image.min()) if padding_value == "minimum" else float(padding_value)
    volume = torch.full(padded_shape, value, dtype=image.dtype)
    mask = torch.zeros(padded_shape, dtype=torch.bool)
    crop = tuple(slice(b, b + s) for b, s in zip(start, shape))
    volume[crop] = image
    mask[crop] = hidden.bool()
    grid = tuple(p // s for p, s in zip(padded_shape, size))

    def to_patches(x: Tensor) -> Tensor:  # (X, Y, Z) -> (B, 1, sx, sy, sz)
        x = x.reshape(grid[0], size[0], grid[1], size[1], grid[2], size[2])
        return x.permute(0, 2, 4, 1, 3, 5).reshape(-1, 1, *size)

    patches, masks = to_patches(volume), to_patches(mask)
    patches = torch.cat([fill(patches[i:i + chunk], masks[i:i + chunk]) for i in range(0, len(patches), chunk)])
    out = patches.reshape(*grid, *size).permute(0, 3, 1, 4, 2, 5).reshape(padded_shape)
    return out[crop].contiguous()
