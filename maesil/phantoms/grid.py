"""The voxel grid of a phantom: argument checks, the RAS+ affine, voxel-centre coordinates in mm."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy import float32 as F32

__all__ = ["Box", "Grid", "affine", "check_shape_spacing"]

#: Voxel slices of a sub-box and its broadcastable coordinates in mm: ``(slices, x3, y3, z3)``.
Box = tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray, np.ndarray]


def check_shape_spacing(shape: Any, spacing: Any) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Validates and normalises ``shape`` / ``spacing`` (clear errors instead of numpy failures)."""
    try:
        shape_t = tuple(shape)
        spacing_t = tuple(spacing)
    except TypeError:
        raise ValueError(f"shape and spacing must be sequences of 3 numbers, got {shape!r} and {spacing!r}") from None
    if len(shape_t) != 3 or not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) for n in shape_t):
        raise ValueError(f"shape must be 3 integers (X, Y, Z), got {shape!r}")
    if any(n < 16 for n in shape_t):
        raise ValueError(f"shape must be at least 16 voxels along each axis, got {shape!r}")
    if len(spacing_t) != 3:
        raise ValueError(f"spacing must be 3 numbers in mm (X, Y, Z), got {spacing!r}")
    try:
        spacing_f = tuple(float(s) for s in spacing_t)
    except (TypeError, ValueError):
        raise ValueError(f"spacing must be 3 numbers in mm (X, Y, Z), got {spacing!r}") from None
    if not all(math.isfinite(s) and s > 0 for s in spacing_f):
        raise ValueError(f"spacing must be finite and > 0 mm along each axis, got {spacing!r}")
    return (int(shape_t[0]), int(shape_t[1]), int(shape_t[2])), spacing_f  # type: ignore[return-value]


def affine(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """RAS+ affine with diagonal spacing whose world origin (0, 0, 0) is the volume centre."""
    aff = np.diag([*spacing, 1.0]).astype(np.float64)
    aff[:3, 3] = [-(n - 1) / 2.0 * s for n, s in zip(shape, spacing)]
    return aff


class Grid:
    """Voxel-centre coordinates in mm (world = RAS, origin at the volume centre) and sub-boxes."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float]):
        self.shape = shape
        self.spacing = spacing
        self.origin = tuple(-(n - 1) / 2.0 * s for n, s in zip(shape, spacing))
        self.axes = [(o + np.arange(n) * s).astype(F32) for n, s, o in zip(shape, spacing, self.origin)]

    def box(self, lo: tuple[float, float, float], hi: tuple[float, float, float]) -> Box | None:
        """Slices and broadcastable coordinates (x3, y3, z3) of the voxels inside [lo, hi] mm.

        Returns ``None`` when the box misses the grid, so that small fields of view still work.
        """
        slices = []
        for ax in range(3):
            s, o, n = self.spacing[ax], self.origin[ax], self.shape[ax]
            i0 = max(0, int(math.ceil((lo[ax] - o) / s - 1e-6)))
            i1 = min(n, int(math.floor((hi[ax] - o) / s + 1e-6)) + 1)
            if i1 <= i0:
                return None
            slices.append(slice(i0, i1))
        x = self.axes[0][slices[0]][:, None, None]
        y = self.axes[1][slices[1]][None, :, None]
        z = self.axes[2][slices[2]][None, None, :]
        return tuple(slices), x, y, z  # type: ignore[return-value]

    def full(self) -> Box:
        """The whole grid as :meth:`box` returns it."""
        return self.box((-1e9,) * 3, (1e9,) * 3)  # type: ignore[return-value]

    def around(self, centre: tuple[float, ...], radius: tuple[float, ...]) -> Box | None:
        """:meth:`box` of ``centre ± radius`` mm along each axis."""
        return self.box(tuple(c - r for c, r in zip(centre, radius)), tuple(c + r for c, r in zip(centre, radius)))

    def tube_box(self, centre_fn: Callable[[np.ndarray], tuple], z_lo: float, z_hi: float, pad: float) -> Box | None:
        """Box of a roughly vertical tube: its (x, y) extent over [z_lo, z_hi] (+ pad mm)."""
        zs = self.axes[2]
        zs = zs[(zs >= z_lo) & (zs <= z_hi)]
        if len(zs) == 0:
            return None
        cx, cy = centre_fn(zs)[:2]
        lo = (float(np.min(cx)) - pad, float(np.min(cy)) - pad, z_lo)
        hi = (float(np.max(cx)) + pad, float(np.max(cy)) + pad, z_hi)
        return self.box(lo, hi)

    def sub(self, slices: tuple[slice, slice, slice]) -> Grid:
        """The part of the grid selected by ``slices`` (for rasterising into a box-sized array)."""
        sub = Grid.__new__(Grid)
        sub.shape = tuple(s.stop - s.start for s in slices)
        sub.spacing = self.spacing
        sub.origin = tuple(float(self.axes[i][slices[i].start]) for i in range(3))
        sub.axes = [self.axes[i][slices[i]] for i in range(3)]
        return sub
