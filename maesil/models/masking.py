"""Token masks for masked image modelling on 3D token grids.

All functions here are pure: they take a batch size and a token grid ``(gx, gy, gz)`` and return a
:class:`TokenMask`. Nothing depends on a model, so the caller (a Lightning module, a data pipeline, a test)
decides the masking and the model stays deterministic given the mask.

Conventions (shared with :mod:`maesil.models.vit3d`):

* images are ``(B, C, X, Y, Z)``; ``Z`` is the axial (inferior -> superior) axis;
* the token grid is ``(gx, gy, gz) = (X / p, Y / p, Z / p)``;
* the flattened token index is ``(ix * gy + iy) * gz + iz`` (``z`` fastest), so the ``gz`` tokens of one
  in-plane position ``(ix, iy)`` are contiguous.

Every sample of a batch keeps exactly the same number of tokens, so the visible tokens form a dense
``(B, n_keep, D)`` tensor without padding. The exact counts are:

* ``random``: ``n_keep = round(N * (1 - ratio))``;
* ``tube``: ``keep_xy = round(gx * gy * (1 - ratio))``, ``n_keep = keep_xy * gz``;
* ``dual``: ``keep_xy`` as for ``tube`` (with ``tube_ratio``), ``keep_per_slice = round(keep_xy * (1 - axial_ratio))``,
  ``n_keep = keep_per_slice * gz``; the effective masked fraction is about ``1 - (1 - r_tube)(1 - r_axial)``.

``round`` is Python's :func:`round` (ties to even).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

__all__ = [
    "MaskingMode",
    "TokenMask",
    "random_mask",
    "tube_mask",
    "dual_mask",
    "make_mask",
    "expected_mask_ratio",
    "num_kept_tokens",
]

MaskingMode = Literal["random", "tube", "dual"]
Grid = tuple[int, int, int]


@dataclass(frozen=True)
class TokenMask:
    """A batch of token masks in the MAE ``ids_keep`` / ``ids_restore`` form.

    Attributes:
        ids_keep: ``(B, n_keep)`` long, indices of the visible tokens, sorted ascending per row.
        ids_restore: ``(B, N)`` long, position of each token in the ``cat([kept, masked])`` order, i.e.
            ``torch.gather(cat([kept, masked], 1), 1, ids_restore[..., None].expand(-1, -1, D))`` puts every token
            back at its grid position (the MAE "unshuffle"). Kept and masked tokens are each in ascending order.
        mask: ``(B, N)`` bool, ``True`` = masked (hidden from the encoder).
    """

    ids_keep: Tensor
    ids_restore: Tensor
    mask: Tensor

    @property
    def num_tokens(self) -> int:
        """Total number of tokens ``N`` of the grid."""
        return int(self.ids_restore.shape[1])

    @property
    def num_keep(self) -> int:
        """Number of visible tokens per sample."""
        return int(self.ids_keep.shape[1])

    @property
    def ratio(self) -> float:
        """Masked fraction of the tokens (same for every sample)."""
        return 1.0 - self.num_keep / self.num_tokens

    @property
    def ids_masked(self) -> Tensor:
        """``(B, N - n_keep)`` long, indices of the masked tokens, ascending per row."""
        return torch.argsort(self.ids_restore, dim=1)[:, self.num_keep :]

    def to(self, device: torch.device | str) -> TokenMask:
        """Return a copy with all index tensors on ``device``."""
        return TokenMask(self.ids_keep.to(device), self.ids_restore.to(device), self.mask.to(device))


# --------------------------------------------------------------------------------------------------------------
# validation and counts
# --------------------------------------------------------------------------------------------------------------


def _check_grid(grid: tuple[int, int, int]) -> Grid:
    if len(grid) != 3 or any(int(g) != g or g < 1 for g in grid):
        raise ValueError(f"grid must be three positive integers (gx, gy, gz), got {grid}.")
    return int(grid[0]), int(grid[1]), int(grid[2])


def _check_ratio(name: str, ratio: float) -> float:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {ratio}.")
    return float(ratio)


def _mask_size(mode: MaskingMode, batch_size: int, grid: tuple[int, int, int], ratio: float,
               axial_ratio: float | None = None) -> tuple[Grid, int]:
    """The checked grid and the number of visible tokens per sample of a mask about to be drawn."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    return _check_grid(grid), num_kept_tokens(mode, grid, ratio, axial_ratio)


def _keep(n: int, ratio: float) -> int:
    return int(round(n * (1.0 - ratio)))


def num_kept_tokens(
    mode: MaskingMode, grid: tuple[int, int, int], ratio: float, axial_ratio: float | None = None
) -> int:
    """Number of visible tokens per sample that :func:`make_mask` produces (see the module docstring).

    Raises:
        ValueError: on an unknown mode, a bad grid or ratio, ``axial_ratio`` given for ``random``/``tube``, or
            when no token would stay visible.
    """
    gx, gy, gz = _check_grid(grid)
    if mode not in get_args(MaskingMode):
        raise ValueError(f"mode must be one of {get_args(MaskingMode)}, got {mode!r}.")
    ratio = _check_ratio("ratio" if mode != "dual" else "tube_ratio", ratio)
    if mode == "random":
        if axial_ratio is not None:
            raise ValueError("axial_ratio is only used by mode='dual'; pass None for 'random'.")
        n_keep = _keep(gx * gy * gz, ratio)
    elif mode == "tube":
        if axial_ratio is not None:
            raise ValueError("axial_ratio is only used by mode='dual'; pass None for 'tube'.")
        n_keep = _keep(gx * gy, ratio) * gz
    else:
        axial = _check_ratio("axial_ratio", ratio if axial_ratio is None else axial_ratio)
        n_keep = _keep(_keep(gx * gy, ratio), axial) * gz
    if n_keep == 0:
        raise ValueError(f"mode={mode!r} with ratio={ratio}, axial_ratio={axial_ratio} on grid {grid} keeps no token.")
    return n_keep


def expected_mask_ratio(
    mode: MaskingMode, grid: tuple[int, int, int], ratio: float, axial_ratio: float | None = None
) -> float:
    """Exact masked fraction that :func:`make_mask` produces for these arguments (rounding included)."""
    gx, gy, gz = _check_grid(grid)
    return 1.0 - num_kept_tokens(mode, grid, ratio, axial_ratio) / (gx * gy * gz)


# --------------------------------------------------------------------------------------------------------------
# mask construction
# --------------------------------------------------------------------------------------------------------------


def _from_bool_mask(mask: Tensor, n_keep: int) -> TokenMask:
    """Build ``ids_keep``/``ids_restore`` from a ``(B, N)`` bool mask with ``n_keep`` visible tokens per row."""
    # stable sort of 0 (visible) before 1 (masked): kept ascending, then masked ascending
    ids_shuffle = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)  # (B, N)
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (B, N) inverse permutation
    ids_keep = ids_shuffle[:, :n_keep].contiguous()  # (B, n_keep)
    return TokenMask(ids_keep=ids_keep, ids_restore=ids_restore, mask=mask)


def _keep_lowest(noise: Tensor, k: int) -> Tensor:
    """Bool mask (``True`` = masked) keeping the ``k`` lowest-noise entries along the last dim."""
    mask = torch.ones_like(noise, dtype=torch.bool)
    idx = torch.topk(noise, k, dim=-1, largest=False, sorted=False).indices
    return mask.scatter_(-1, idx, False)


def random_mask(
    batch_size: int,
    grid: tuple[int, int, int],
    ratio: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> TokenMask:
    """Mask a uniformly random subset of tokens per sample (MAE masking).

    Args:
        batch_size: number of samples ``B``.
        grid: token grid ``(gx, gy, gz)``.
        ratio: fraction of tokens to mask, in ``[0, 1)``; ``n_keep = round(N * (1 - ratio))``.
        generator: optional RNG for reproducible masks (must live on ``device``).
        device: device of the returned tensors.
    """
    (gx, gy, gz), n_keep = _mask_size("random", batch_size, grid, ratio)
    noise = torch.rand(batch_size, gx * gy * gz, generator=generator, device=device)  # (B, N)
    return _from_bool_mask(_keep_lowest(noise, n_keep), n_keep)


def _tube_xy(batch_size: int, gxy: int, keep_xy: int, generator: torch.Generator | None, device) -> Tensor:
    noise = torch.rand(batch_size, gxy, generator=generator, device=device)  # (B, gx*gy)
    return _keep_lowest(noise, keep_xy)  # (B, gx*gy) True = masked tube


def tube_mask(
    batch_size: int,
    grid: tuple[int, int, int],
    ratio: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> TokenMask:
    """Mask whole tubes along ``z``: one random subset of in-plane ``(ix, iy)`` positions, shared by every slice.

    Hiding a tube removes all axial context of that position, so the model cannot copy from adjacent slices.

    Args:
        batch_size: number of samples ``B``.
        grid: token grid ``(gx, gy, gz)``.
        ratio: fraction of in-plane positions to mask, in ``[0, 1)``; ``keep_xy = round(gx * gy * (1 - ratio))``.
        generator: optional RNG for reproducible masks.
        device: device of the returned tensors.
    """
    (gx, gy, gz), n_keep = _mask_size("tube", batch_size, grid, ratio)
    mask_xy = _tube_xy(batch_size, gx * gy, n_keep // gz, generator, device)  # (B, gx*gy)
    mask = mask_xy[:, :, None].expand(batch_size, gx * gy, gz).reshape(batch_size, -1)  # (B, N), z fastest
    return _from_bool_mask(mask, n_keep)


def dual_mask(
    batch_size: int,
    grid: tuple[int, int, int],
    tube_ratio: float,
    axial_ratio: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> TokenMask:
    """Tube mask, then, independently for each ``z`` slice, a random subset of that slice's still-visible tokens.

    Every slice keeps exactly ``round(keep_xy * (1 - axial_ratio))`` tokens, all inside the tube-visible set.

    Args:
        batch_size: number of samples ``B``.
        grid: token grid ``(gx, gy, gz)``.
        tube_ratio: fraction of in-plane positions masked as tubes, in ``[0, 1)``.
        axial_ratio: fraction of the remaining tokens of each slice masked in addition, in ``[0, 1)``.
        generator: optional RNG for reproducible masks.
        device: device of the returned tensors.
    """
    (gx, gy, gz), n_keep = _mask_size("dual", batch_size, grid, tube_ratio, axial_ratio)
    gxy = gx * gy
    keep_xy = _keep(gxy, tube_ratio)
    mask_xy = _tube_xy(batch_size, gxy, keep_xy, generator, device)  # (B, gx*gy)
    noise = torch.rand(batch_size, gz, gxy, generator=generator, device=device)  # (B, gz, gx*gy)
    noise = noise.masked_fill(mask_xy[:, None, :], 2.0)  # tube-masked positions are never picked (noise < 1)
    mask = _keep_lowest(noise, n_keep // gz)  # (B, gz, gx*gy)
    mask = mask.transpose(1, 2).reshape(batch_size, -1)  # (B, N), z fastest
    return _from_bool_mask(mask, n_keep)


def make_mask(
    mode: MaskingMode,
    batch_size: int,
    grid: tuple[int, int, int],
    ratio: float,
    axial_ratio: float | None = None,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> TokenMask:
    """Dispatch to :func:`random_mask`, :func:`tube_mask` or :func:`dual_mask`.

    Args:
        mode: ``"random"``, ``"tube"`` or ``"dual"``.
        batch_size: number of samples ``B``.
        grid: token grid ``(gx, gy, gz)``.
        ratio: masking ratio (``tube_ratio`` for ``"dual"``).
        axial_ratio: per-slice ratio for ``"dual"``; ``None`` means ``ratio``. Must be ``None`` for the other modes
            (a ``ValueError`` is raised otherwise, so a misconfigured run fails loudly instead of silently ignoring it).
        generator: optional RNG for reproducible masks.
        device: device of the returned tensors.
    """
    num_kept_tokens(mode, grid, ratio, axial_ratio)  # validates mode and the ratio/axial_ratio combination
    if mode == "random":
        return random_mask(batch_size, grid, ratio, generator=generator, device=device)
    if mode == "tube":
        return tube_mask(batch_size, grid, ratio, generator=generator, device=device)
    axial = ratio if axial_ratio is None else axial_ratio
    return dual_mask(batch_size, grid, ratio, axial, generator=generator, device=device)
