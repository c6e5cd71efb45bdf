"""Smooth random fields for organ textures and shape perturbations.

Hashed lattice noise upsampled by a cubic B-spline, defined in mm: the value at a point depends
on the seed, the field number and the world position only, never on the voxel grid.
"""

from __future__ import annotations

import math

import numpy as np
from numpy import float32 as F32

__all__ = ["field_on", "hash_gauss", "smooth_field"]


def hash_gauss(seed: int, field: int, ix: np.ndarray, iy: np.ndarray, iz: np.ndarray) -> np.ndarray:
    """Approximately N(0, 1) value per integer lattice point; a pure function of its arguments."""
    with np.errstate(over="ignore"):
        h = (np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)) ^ (np.uint64(field) * np.uint64(0xC2B2AE3D27D4EB4F))
        h = h ^ (ix.astype(np.int64).astype(np.uint64) * np.uint64(0x165667B19E3779F9))
        h = h ^ (iy.astype(np.int64).astype(np.uint64) * np.uint64(0x27D4EB2F165667C5))
        h = h ^ (iz.astype(np.int64).astype(np.uint64) * np.uint64(0x94D049BB133111EB))
        # splitmix64 finaliser
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        h = h ^ (h >> np.uint64(31))
    total = np.zeros(h.shape, np.float64)
    for k in range(4):  # sum of four 16-bit uniforms: close enough to Gaussian once smoothed
        total += ((h >> np.uint64(16 * k)) & np.uint64(0xFFFF)).astype(np.float64)
    return ((total / 65535.0 - 2.0) / math.sqrt(4.0 / 12.0)).astype(F32)


def _bspline_matrix(coords: np.ndarray, step: float) -> tuple[np.ndarray, int]:
    """Cubic B-spline interpolation weights (len(coords) × lattice points) and the first lattice index."""
    t = coords.astype(np.float64) / step
    i = np.floor(t).astype(np.int64)
    f = t - i
    weights = [(1 - f) ** 3 / 6, (3 * f**3 - 6 * f**2 + 4) / 6, (-3 * f**3 + 3 * f**2 + 3 * f + 1) / 6, f**3 / 6]
    lo = int(i.min()) - 1
    n_lat = int(i.max()) + 2 - lo + 1
    mat = np.zeros((len(coords), n_lat), F32)
    rows = np.arange(len(coords))
    for k, w in enumerate(weights):
        mat[rows, i - 1 + k - lo] = w
    return mat, lo


def smooth_field(seed: int, field: int, x: np.ndarray, y: np.ndarray, z: np.ndarray, step: float) -> np.ndarray:
    """Smooth random field (≈ unit std, feature size ≈ ``step`` mm) on the separable grid x × y × z.

    Lattice values are hashed from world lattice indices, so the field does not depend on the
    voxel grid; three small matrix products upsample it (cheap even at full resolution).
    """
    x, y, z = (np.asarray(a, F32).ravel() for a in (x, y, z))
    wx, lx = _bspline_matrix(x, step)
    wy, ly = _bspline_matrix(y, step)
    wz, lz = _bspline_matrix(z, step)
    ix, iy, iz = np.meshgrid(
        np.arange(wx.shape[1]) + lx, np.arange(wy.shape[1]) + ly, np.arange(wz.shape[1]) + lz, indexing="ij"
    )
    lat = hash_gauss(seed, field, ix, iy, iz)  # (Lx, Ly, Lz)
    a = (wx @ lat.reshape(lat.shape[0], -1)).reshape(len(x), lat.shape[1], lat.shape[2])  # (nx, Ly, Lz)
    a = np.ascontiguousarray(np.matmul(wy, a))  # (nx, ny, Lz)
    out = (a.reshape(-1, a.shape[2]) @ wz.T).reshape(len(x), len(y), len(z))
    out *= F32(1.0 / 0.33)  # B-spline smoothing of unit-variance lattice noise leaves std ≈ 0.33
    return out


def field_on(seed: int, field: int, x3: np.ndarray, y3: np.ndarray, z3: np.ndarray, step: float) -> np.ndarray:
    """:func:`smooth_field` on the broadcastable coordinates that :meth:`Grid.box` returns."""
    return smooth_field(seed, field, x3.ravel(), y3.ravel(), z3.ravel(), step)
