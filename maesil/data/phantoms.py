"""Deterministic synthetic torso CT phantoms: the built-in data of the demo and of the tests.

No CT data set can be downloaded here, so :func:`make_phantom` draws a plausible thorax-abdomen
CT from a seed: an elliptical body with skin, subcutaneous fat and a muscle wall, lungs with
branching vessel trees above a two-domed diaphragm, heart and mediastinum, liver (with portal
vessels), spleen, stomach, gall bladder, two kidneys (cortex, medulla, sinus fat), a
contrast-enhanced aorta, inferior vena cava, vertebrae (cortical shell, cancellous core, discs,
posterior elements), ribs, sternum, a table, smooth organ textures and correlated noise.

All anatomy is defined in millimetres around the centre of the volume, so another ``shape`` or
``spacing`` samples the same patient (only the voxel grid, the fine textures and the noise
differ). Arrays are in (X, Y, Z) = (left→right, posterior→anterior, inferior→superior) voxel
order, i.e. RAS+ as read by NIfTI / TorchIO; ``x > 0`` is the patient's right (liver side).
:func:`write_phantoms` stores image (int16 HU) and organ labels (uint8) as NIfTI.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_SHAPE",
    "DEFAULT_SPACING",
    "ORGAN_LABELS",
    "Phantom",
    "make_phantom",
    "write_phantoms",
]

#: Organ label values of the label maps (``0`` is everything else, including air).
ORGAN_LABELS: dict[int, str] = {
    0: "background",
    1: "liver",
    2: "spleen",
    3: "kidney_left",
    4: "kidney_right",
    5: "aorta",
    6: "lung",
    7: "bone",
}

#: Default grid: 384 × 384 × 96 voxels of 0.8 × 0.8 × 2.5 mm ≈ 307 × 307 × 240 mm (thorax-abdomen).
DEFAULT_SHAPE: tuple[int, int, int] = (384, 384, 96)
DEFAULT_SPACING: tuple[float, float, float] = (0.8, 0.8, 2.5)

#: Bumped whenever the generated anatomy changes, so :func:`write_phantoms` regenerates old files.
GENERATOR_VERSION = 1

_MANIFEST = "phantoms.json"
_NOISE_STD = 14.0  # HU, after the PSF blur
_PSF_SIGMA_MM = 0.55  # in-plane blur of the scanner
_F32 = np.float32

# Label values used while painting.
_LIVER, _SPLEEN, _KID_L, _KID_R, _AORTA, _LUNG, _BONE = 1, 2, 3, 4, 5, 6, 7


@dataclass(frozen=True, eq=False)
class Phantom:
    """One synthetic CT volume with its organ label map, on a RAS+ voxel grid.

    Attributes:
        image: int16 Hounsfield units, shape (X, Y, Z).
        label: uint8 organ labels (see :data:`ORGAN_LABELS`), same shape.
        spacing: voxel size in mm along X, Y, Z.
        affine: 4x4 float64 voxel-to-world (RAS+, mm) matrix, diagonal, volume centred on 0.
    """

    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray


# --------------------------------------------------------------------------------------------
# Argument checks and the voxel grid
# --------------------------------------------------------------------------------------------


def _check_shape_spacing(shape: Any, spacing: Any) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
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


def _affine(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """RAS+ affine with diagonal spacing whose world origin (0, 0, 0) is the volume centre."""
    aff = np.diag([*spacing, 1.0]).astype(np.float64)
    aff[:3, 3] = [-(n - 1) / 2.0 * s for n, s in zip(shape, spacing)]
    return aff


class _Grid:
    """Voxel-centre coordinates in mm (world = RAS, origin at the volume centre) and sub-boxes."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float]):
        self.shape = shape
        self.spacing = spacing
        self.origin = tuple(-(n - 1) / 2.0 * s for n, s in zip(shape, spacing))
        self.axes = [(o + np.arange(n) * s).astype(_F32) for n, s, o in zip(shape, spacing, self.origin)]

    def box(self, lo: tuple[float, float, float], hi: tuple[float, float, float]):
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
        return tuple(slices), x, y, z

    def full(self):
        """The whole grid as :meth:`box` returns it."""
        return self.box((-1e9,) * 3, (1e9,) * 3)


# --------------------------------------------------------------------------------------------
# Smooth random fields: hashed lattice noise + cubic B-spline, defined in mm (grid independent)
# --------------------------------------------------------------------------------------------


def _hash_gauss(seed: int, field: int, ix: np.ndarray, iy: np.ndarray, iz: np.ndarray) -> np.ndarray:
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
    return ((total / 65535.0 - 2.0) / math.sqrt(4.0 / 12.0)).astype(_F32)


def _bspline_matrix(coords: np.ndarray, step: float) -> tuple[np.ndarray, int]:
    """Cubic B-spline interpolation weights (len(coords) × lattice points) and the first lattice index."""
    t = coords.astype(np.float64) / step
    i = np.floor(t).astype(np.int64)
    f = t - i
    weights = [(1 - f) ** 3 / 6, (3 * f**3 - 6 * f**2 + 4) / 6, (-3 * f**3 + 3 * f**2 + 3 * f + 1) / 6, f**3 / 6]
    lo = int(i.min()) - 1
    n_lat = int(i.max()) + 2 - lo + 1
    mat = np.zeros((len(coords), n_lat), _F32)
    rows = np.arange(len(coords))
    for k, w in enumerate(weights):
        mat[rows, i - 1 + k - lo] = w
    return mat, lo


def _smooth_field(seed: int, field: int, x: np.ndarray, y: np.ndarray, z: np.ndarray, step: float) -> np.ndarray:
    """Smooth random field (≈ unit std, feature size ≈ ``step`` mm) on the separable grid x × y × z.

    Lattice values are hashed from world lattice indices, so the field does not depend on the
    voxel grid; three small matrix products upsample it (cheap even at full resolution).
    """
    x, y, z = (np.asarray(a, _F32).ravel() for a in (x, y, z))
    wx, lx = _bspline_matrix(x, step)
    wy, ly = _bspline_matrix(y, step)
    wz, lz = _bspline_matrix(z, step)
    ix, iy, iz = np.meshgrid(
        np.arange(wx.shape[1]) + lx, np.arange(wy.shape[1]) + ly, np.arange(wz.shape[1]) + lz, indexing="ij"
    )
    lat = _hash_gauss(seed, field, ix, iy, iz)  # (Lx, Ly, Lz)
    a = (wx @ lat.reshape(lat.shape[0], -1)).reshape(len(x), lat.shape[1], lat.shape[2])  # (nx, Ly, Lz)
    a = np.ascontiguousarray(np.matmul(wy, a))  # (nx, ny, Lz)
    out = (a.reshape(-1, a.shape[2]) @ wz.T).reshape(len(x), len(y), len(z))
    out *= _F32(1.0 / 0.33)  # B-spline smoothing of unit-variance lattice noise leaves std ≈ 0.33
    return out


def _field_on(seed: int, field: int, x3: np.ndarray, y3: np.ndarray, z3: np.ndarray, step: float) -> np.ndarray:
    """:func:`_smooth_field` on the broadcastable coordinates that :meth:`_Grid.box` returns."""
    return _smooth_field(seed, field, x3.ravel(), y3.ravel(), z3.ravel(), step)


# --------------------------------------------------------------------------------------------
# Anatomy parameters (all in mm; drawn from the seed only, never from the grid)
# --------------------------------------------------------------------------------------------


def _sample_anatomy(seed: int) -> SimpleNamespace:
    """Draws the per-patient shape parameters (body size, organ positions and sizes, ...)."""
    rng = np.random.default_rng([seed, 0xC7])
    u = rng.uniform
    p = SimpleNamespace(seed=seed)
    # Body: boxy ellipse, wider anteriorly than posteriorly (the patient lies on the table).
    p.a = u(126, 146)
    p.b_ant = u(100, 118)
    p.b_post = u(96, 108)
    p.yc = u(0, 10)
    p.beta = u(0.15, 0.45)
    p.ka = u(-0.07, 0.02)  # width change towards the top (fraction per 120 mm)
    p.kb = u(-0.02, 0.08)  # the abdomen protrudes towards the bottom
    p.f_ant, p.f_lat, p.f_post = u(10, 28), u(10, 28), u(8, 18)
    p.m_ant, p.m_lat = u(8, 13), u(9, 15)
    # Spine.
    p.vb_depth = u(68, 78)  # posterior skin → vertebral body centre
    p.sp_cl, p.sp_cq, p.sp_x = u(-5, 5), u(-8, 0), u(-4, 4)
    p.vb_rx, p.vb_ry = u(19, 23), u(15, 17)
    p.vb_phase = u(0, 1)
    p.cav_gap = u(22, 28)
    # Diaphragm.
    p.z_dr = u(0, 25)
    p.z_dl = p.z_dr - u(8, 18)
    p.dome_c = u(40, 55)
    # Ribs.
    p.rib_pitch, p.rib_h, p.rib_drop = u(24, 28), u(10, 12), u(75, 95)
    p.rib_low = p.z_dr - u(100, 115)
    p.z_xiph_off = u(15, 30)
    # Organ sizes / offsets.
    p.liver_s = u(0.9, 1.1)
    p.liver_dx, p.liver_dz = u(-8, 8), u(-10, 10)
    p.spleen_s = u(0.8, 1.2)
    p.spleen_phi = u(205, 228)
    p.kid_s = u(0.9, 1.1)
    p.kid_zr = u(-80, -60)
    p.kid_zl = p.kid_zr + u(8, 20)
    p.kid_dx = u(-5, 5)
    p.stom_s = u(0.8, 1.2)
    p.stom_gas = u(0.25, 0.7)
    p.heart_s = u(0.9, 1.1)
    p.heart_rot = u(-45, -25)
    p.aorta_r = u(10, 12.5)
    p.bowel_th = u(-0.1, 0.4)
    p.gb = u() < 0.8
    return p


def _derive(p: SimpleNamespace) -> None:
    """Quantities shared by several structures (mid-thorax cavity size, heart, carina, ...)."""
    zr = p.z_dr
    a_c, ycc, bc = _cavity_params(p, np.float32(zr))
    p.a_c0, p.ycc0, p.bc0 = float(a_c), float(ycc), float(bc)
    p.yv0 = float(_spine_y(p, np.float32(zr)))
    p.xv0 = float(_spine_x(p, np.float32(zr)))
    # Heart: anterior-left, resting on the diaphragm.
    p.h_c = (p.xv0 - 0.14 * p.a_c0, p.ycc0 + 0.22 * p.bc0, 0.0)
    p.h_ax = (0.48 * p.a_c0 * p.heart_s, 0.52 * p.bc0 * p.heart_s, 50.0 * p.heart_s)
    z_floor = float(_z_diaphragm(p, np.float32(p.h_c[0]), np.float32(p.h_c[1])))
    p.h_c = (p.h_c[0], p.h_c[1], z_floor + 0.62 * p.h_ax[2])
    p.h_top = p.h_c[2] + p.h_ax[2]
    p.z_car = p.h_top + 8.0
    p.tr = (p.xv0 + 2.0, p.yv0 + p.vb_ry + 20.0)  # trachea centre (x, y)
    p.z_xiph = p.z_dr - p.z_xiph_off


# --------------------------------------------------------------------------------------------
# Analytic geometry (broadcastable: works on grid boxes and on point clouds alike)
# --------------------------------------------------------------------------------------------


def _zn(z):
    return z * _F32(1 / 120)


def _body_params(p, z):
    zn = _zn(z)
    a = p.a * (1 + p.ka * zn)
    b_ant = p.b_ant * (1 - p.kb * zn)
    return a, b_ant


def _spine_y(p, z):
    zn = _zn(z)
    return _F32(p.yc - p.b_post + p.vb_depth) + _F32(p.sp_cl) * zn + _F32(p.sp_cq) * zn * zn


def _spine_x(p, z):
    return _F32(p.sp_x) * _zn(z)


def _vb_radii(p, z):
    t = np.clip(_zn(z) * 0.5 + 0.5, 0, 1)  # 0 at the bottom (lumbar), 1 at the top (thoracic)
    return _F32(p.vb_rx) * (1 - 0.22 * t), _F32(p.vb_ry) * (1 - 0.12 * t)


def _cavity_params(p, z):
    """Inner wall of the trunk (pleura / peritoneum): LR semi-axis, AP centre and semi-axis."""
    a, b_ant = _body_params(p, z)
    a_c = a - p.f_lat - p.m_lat
    ant = p.yc + b_ant - p.f_ant - p.m_ant
    post = _spine_y(p, z) - p.cav_gap
    return a_c, (ant + post) / 2, (ant - post) / 2


def _rho2(dx, dy, ax, by, beta=0.0):
    """Squared normalised radius of a (boxy for beta > 0) ellipse; <= 1 inside."""
    u2 = (dx / ax) ** 2
    v2 = (dy / by) ** 2
    if beta:
        return u2 * (1 - _F32(beta) * v2) + v2
    return u2 + v2


def _body_rho2(p, x, y, z, shrink_lat=0.0, shrink_ant=0.0, shrink_post=0.0):
    a, b_ant = _body_params(p, z)
    dy = y - _F32(p.yc)
    by = np.where(dy > 0, b_ant - shrink_ant, _F32(p.b_post - shrink_post)).astype(_F32)
    return _rho2(x, dy, a - shrink_lat, by, p.beta)


def _cavity_rho2(p, x, y, z):
    a_c, ycc, bc = _cavity_params(p, z)
    dy = y - ycc
    v2 = (dy / bc) ** 2
    beta = np.where(dy < 0, _F32(0.6), _F32(0.5 * p.beta)).astype(_F32)  # flat back, round front
    return (x / a_c) ** 2 * (1 - beta * v2) + v2


def _z_diaphragm(p, x, y):
    """Height of the diaphragm: two domes (right higher), lowest posteriorly and laterally."""
    yd = _F32(p.ycc0 + 0.15 * p.bc0)
    wx, wy = _F32(0.62 * p.a_c0), _F32(1.1 * p.bc0)
    xr = _F32(0.45 * p.a_c0)
    ey = ((y - yd) / wy) ** 2
    right = _F32(p.z_dr) - _F32(p.dome_c) * np.minimum(((x - xr) / wx) ** 2 + ey, _F32(1.3))
    left = _F32(p.z_dl) - _F32(p.dome_c) * np.minimum(((x + xr) / wx) ** 2 + ey, _F32(1.3))
    return np.maximum(right, left)  # the posterior recesses reach at most 1.3 dome depths down


def _rot_ellipsoid_rho2(x, y, z, c, axes, rot_z_deg=0.0, rot_y_deg=0.0):
    """Squared normalised radius of an ellipsoid rotated about z (axial) then y (coronal tilt)."""
    dx, dy, dz = x - _F32(c[0]), y - _F32(c[1]), z - _F32(c[2])
    if rot_y_deg:
        t = math.radians(rot_y_deg)
        ct, st = _F32(math.cos(t)), _F32(math.sin(t))
        dx, dz = ct * dx + st * dz, -st * dx + ct * dz
    if rot_z_deg:
        t = math.radians(rot_z_deg)
        ct, st = _F32(math.cos(t)), _F32(math.sin(t))
        dx, dy = ct * dx + st * dy, -st * dx + ct * dy
    return (dx / _F32(axes[0])) ** 2 + (dy / _F32(axes[1])) ** 2 + (dz / _F32(axes[2])) ** 2, (dx, dy, dz)


def _heart_rho2(p, x, y, z):
    return _rot_ellipsoid_rho2(x, y, z, p.h_c, p.h_ax, p.heart_rot)[0]


def _aorta_center(p, z):
    """Descending aorta: left-lateral of the vertebral body in the thorax, anterior-left below."""
    w = 1 / (1 + np.exp(-(z - _F32(p.z_dl - 10)) / _F32(25)))  # 1 in the thorax
    xv, yv = _spine_x(p, z), _spine_y(p, z)
    rx, ry = _vb_radii(p, z)
    cx = xv - (8 + (rx + 6 - 8) * w)
    cy = yv + (ry + 11) * (1 - w) + 6 * w
    r = _F32(p.aorta_r) * (1 + 0.12 * w)
    return cx, cy, r


def _asc_aorta(p):
    return p.h_c[0] + 0.3 * p.h_ax[0], p.h_c[1] + 0.2 * p.h_ax[1], p.h_c[2] + 0.3 * p.h_ax[2], p.aorta_r * 1.3


def _mediastinum(p, x, y, z, with_heart=True):
    """Soft-tissue core of the chest that the lungs wrap around (heart, vessels, spine, airway)."""
    xv, yv = _spine_x(p, z), _spine_y(p, z)
    rx, ry = _vb_radii(p, z)
    _, ycc, bc = _cavity_params(p, z)
    t = np.clip((y - yv) / (ycc + bc - yv), 0, 1)
    hw = 10 + 14 * t
    med = np.abs(x - (xv - 4)) < hw
    med = med | (_rho2(x - xv, y - yv, rx + 8, ry + 14) < 1)
    ax, ay, ar = _aorta_center(p, z)
    med = med | (_rho2(x - ax, y - ay, ar + 5, ar + 5) < 1)
    if with_heart:
        med = med | (_heart_rho2(p, x, y, z) < 1.12**2)
    sx, sy, sz, sr = _asc_aorta(p)
    med = med | ((_rho2(x - sx, y - sy, sr + 12, sr + 12) < 1) & (z > sz - 10))
    return med


def _lung(p, x, y, z):
    """Lungs: chest cavity above the diaphragm minus the mediastinum (unperturbed geometry)."""
    inside = (_cavity_rho2(p, x, y, z) < 0.97) & (z > _z_diaphragm(p, x, y) + 1)
    return inside & ~_mediastinum(p, x, y, z)


def _liver_rho2(p, x, y, z):
    s = p.liver_s
    right = _rot_ellipsoid_rho2(
        x, y, z,
        (0.42 * p.a_c0 + p.liver_dx, p.ycc0 - 0.02 * p.bc0, p.z_dr - 58 + p.liver_dz),
        (0.64 * p.a_c0 * s, 1.0 * p.bc0 * s, 78 * s),
    )[0]
    left = _rot_ellipsoid_rho2(
        x, y, z,
        (-0.08 * p.a_c0 + p.liver_dx, p.ycc0 + 0.48 * p.bc0, p.z_dr - 34 + p.liver_dz),
        (0.42 * p.a_c0 * s, 0.42 * p.bc0 * s, 42 * s),
        rot_z_deg=-15,
    )[0]
    return np.minimum(right, left)


def _liver(p, x, y, z):
    return (_liver_rho2(p, x, y, z) < 1) & (_cavity_rho2(p, x, y, z) < 0.96) & (z < _z_diaphragm(p, x, y) - 5)


# --------------------------------------------------------------------------------------------
# Tubes and vessel trees
# --------------------------------------------------------------------------------------------


def _grow_tree(rng, root, points, r_root, max_depth, r_min=0.7, exponent=2.7):
    """Space-filling branching tree, built level by level (vectorised over all branches).

    Each branch heads for the centroid of its share of ``points`` (partway, except at the
    root), then the share is split across its principal axis between two children; radii
    shrink with the share (Murray-like law). Returns segment starts, ends and radii (mm).
    """
    pts = np.asarray(points, np.float64)
    n_all = len(pts)
    node = np.zeros(n_all, np.int64)
    start = np.asarray(root, np.float64)[None, :]
    out_a, out_b, out_r = [], [], []
    for depth in range(max_depth + 1):
        n_nodes = len(start)
        cnt = np.bincount(node, minlength=n_nodes).astype(np.float64)
        safe = np.maximum(cnt, 1)[:, None]
        cen = np.stack([np.bincount(node, weights=pts[:, k], minlength=n_nodes) for k in range(3)], 1) / safe
        radius = np.maximum(r_min, r_root * (cnt / n_all) ** (1 / exponent))
        terminal = (cnt < 4) | (depth == max_depth)
        frac = np.ones(n_nodes) if depth == 0 else rng.uniform(0.45, 0.8, n_nodes)
        end = start + frac[:, None] * (cen - start) + rng.normal(0, 1.0, (n_nodes, 3))
        end[terminal] = cen[terminal] + rng.normal(0, 2.0, (int(terminal.sum()), 3))
        alive = cnt > 0
        out_a.append(start[alive]), out_b.append(end[alive]), out_r.append(radius[alive])
        if depth == max_depth:
            break
        keep = ~terminal[node]
        pts, node = pts[keep], node[keep]
        if len(pts) == 0:
            break
        d = pts - cen[node]
        cov = np.empty((n_nodes, 3, 3))
        for i in range(3):
            for j in range(i, 3):
                cov[:, i, j] = cov[:, j, i] = np.bincount(node, weights=d[:, i] * d[:, j], minlength=n_nodes)
        cov += np.eye(3) * 1e-6
        axis = np.linalg.eigh(cov)[1][:, :, -1]
        proj = (d * axis[node]).sum(1)
        order = np.lexsort((proj, node))
        sorted_node = node[order]
        first = np.searchsorted(sorted_node, np.arange(n_nodes))
        rank = np.empty(len(order), np.int64)
        rank[order] = np.arange(len(order)) - first[sorted_node]
        q = rng.uniform(0.35, 0.65, n_nodes)
        node = 2 * node + (rank >= np.floor(q[node] * cnt[node])).astype(np.int64)
        start = np.repeat(end, 2, axis=0)
    return np.concatenate(out_a), np.concatenate(out_b), np.concatenate(out_r)


def _sample_points(rng, inside_fn, lo, hi, n):
    """``n`` points drawn uniformly from the region where ``inside_fn`` is true inside [lo, hi]."""
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    got = []
    total = 0
    for _ in range(20):
        cand = rng.uniform(lo, hi, size=(max(4 * n, 2000), 3)).astype(_F32)
        keep = cand[inside_fn(cand[:, 0], cand[:, 1], cand[:, 2])]
        got.append(keep)
        total += len(keep)
        if total >= n:
            break
    pts = np.concatenate(got)[:n]
    return pts.astype(np.float64)


def _raster_capsules(grid: _Grid, out: np.ndarray, a: np.ndarray, b: np.ndarray, r: np.ndarray, soft: float) -> None:
    """Coverage (0..1, antialiased over ``soft`` mm) of capsules a→b of radius r, max-merged into ``out``.

    Segments are cut into short pieces; every piece gets its own tight voxel box, and all boxes
    are enumerated at once as one ragged list of voxels (vectorised: no Python loop per piece).
    """
    if len(a) == 0:
        return
    seg = b - a
    length = np.linalg.norm(seg, axis=1)
    n_piece = np.maximum(1, np.ceil(length / np.maximum(3.0, 1.5 * r))).astype(np.int64)
    idx = np.repeat(np.arange(len(a)), n_piece)
    k = np.arange(len(idx)) - np.repeat(np.cumsum(n_piece) - n_piece, n_piece)
    t0 = (k / n_piece[idx])[:, None]
    t1 = ((k + 1) / n_piece[idx])[:, None]
    pa = a[idx] + t0 * seg[idx]
    pd = (t1 - t0) * seg[idx]
    pr = r[idx]
    spacing = np.asarray(grid.spacing)
    origin = np.asarray(grid.origin)
    shape = np.asarray(grid.shape)
    ext = (pr + soft)[:, None]
    i0 = np.clip(np.ceil((np.minimum(pa, pa + pd) - ext - origin) / spacing), 0, shape).astype(np.int64)
    i1 = np.clip(np.floor((np.maximum(pa, pa + pd) + ext - origin) / spacing) + 1, 0, shape).astype(np.int64)
    dims = np.maximum(i1 - i0, 0)
    cnt = dims.prod(axis=1)
    keep = cnt > 0
    pa, pd, pr, i0, dims, cnt = pa[keep], pd[keep], pr[keep], i0[keep], dims[keep], cnt[keep]
    if len(cnt) == 0:
        return
    csum = np.cumsum(cnt)
    flat_out = out.reshape(-1)
    sp32 = spacing.astype(_F32)
    or32 = origin.astype(_F32)
    budget = 1_500_000
    first = 0
    while first < len(cnt):
        base = csum[first] - cnt[first]
        last = max(first + 1, int(np.searchsorted(csum, base + budget, side="right")))
        sl = slice(first, last)
        c = cnt[sl]
        pid = np.repeat(np.arange(last - first), c)
        local = np.arange(int(c.sum())) - np.repeat(np.cumsum(c) - c, c)
        d = dims[sl][pid]
        iz = local % d[:, 2]
        rest = local // d[:, 2]
        iy = rest % d[:, 1]
        ix = rest // d[:, 1]
        vox = i0[sl][pid] + np.stack([ix, iy, iz], axis=1)
        w = vox.astype(_F32) * sp32 + or32 - pa[sl].astype(_F32)[pid]
        dv = pd[sl].astype(_F32)[pid]
        dd = np.maximum((dv * dv).sum(1), _F32(1e-6))
        t = np.clip((w * dv).sum(1) / dd, 0, 1)
        w -= t[:, None] * dv
        dist = np.sqrt((w * w).sum(1))
        cov = np.clip((pr[sl].astype(_F32)[pid] - dist) / _F32(soft) + _F32(0.5), 0, 1)
        m = cov > 0
        flat = (vox[m, 0] * shape[1] + vox[m, 1]) * shape[2] + vox[m, 2]
        np.maximum.at(flat_out, flat, cov[m])
        first = last


def _blur3(a: np.ndarray, axis: int, w: float) -> np.ndarray:
    """Convolution with [w, 1 - 2w, w] along ``axis`` (edges replicated): a cheap small PSF."""
    out = a * _F32(1 - 2 * w)
    lo = [slice(None)] * 3
    hi = [slice(None)] * 3
    lo[axis], hi[axis] = slice(0, -1), slice(1, None)
    lo, hi = tuple(lo), tuple(hi)
    out[hi] += _F32(w) * a[lo]
    out[lo] += _F32(w) * a[hi]
    edge0 = [slice(None)] * 3
    edge1 = [slice(None)] * 3
    edge0[axis], edge1[axis] = slice(0, 1), slice(-1, None)
    out[tuple(edge0)] += _F32(w) * a[tuple(edge0)]
    out[tuple(edge1)] += _F32(w) * a[tuple(edge1)]
    return out


def _subgrid(grid: _Grid, slices: tuple[slice, slice, slice]) -> _Grid:
    """The part of ``grid`` selected by ``slices`` (for rasterising into a box-sized array)."""
    sub = _Grid.__new__(_Grid)
    sub.shape = tuple(s.stop - s.start for s in slices)
    sub.spacing = grid.spacing
    sub.origin = tuple(float(grid.axes[i][slices[i].start]) for i in range(3))
    sub.axes = [grid.axes[i][slices[i]] for i in range(3)]
    return sub


def _tube_z(grid, cx_fn, z_lo, z_hi, pad):
    """Box of a roughly vertical tube: its (x, y) extent over [z_lo, z_hi] (+ pad mm)."""
    zs = grid.axes[2]
    zs = zs[(zs >= z_lo) & (zs <= z_hi)]
    if len(zs) == 0:
        return None
    cx, cy = cx_fn(zs)[:2]
    lo = (float(np.min(cx)) - pad, float(np.min(cy)) - pad, z_lo)
    hi = (float(np.max(cx)) + pad, float(np.max(cy)) + pad, z_hi)
    return grid.box(lo, hi)


# --------------------------------------------------------------------------------------------
# The phantom
# --------------------------------------------------------------------------------------------


def make_phantom(
    seed: int,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
) -> Phantom:
    """Generates one synthetic torso CT phantom, deterministically from ``seed``.

    The anatomy is defined in mm around the volume centre, so ``shape`` and ``spacing`` only
    choose how it is sampled (the default covers ≈ 307 × 307 × 240 mm, lungs at the top, liver,
    spleen and kidneys below).

    Args:
        seed: non-negative integer; the same seed always gives the same arrays.
        shape: voxels along (X, Y, Z), each >= 16.
        spacing: voxel size in mm along (X, Y, Z), each > 0.

    Returns:
        A :class:`Phantom` (int16 HU image, uint8 label map, spacing, RAS+ affine).

    Raises:
        ValueError: on a negative / non-integer seed or an invalid shape / spacing.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    shape, spacing = _check_shape_spacing(shape, spacing)
    grid = _Grid(shape, spacing)
    p = _sample_anatomy(seed)
    _derive(p)
    tree_rng = np.random.default_rng([seed, 0x7EE])
    noise_rng = np.random.default_rng([seed, 0x2015E])

    lab = np.zeros(shape, np.uint8)
    _, X, Y, Z = grid.full()

    # ---- table (carbon-fibre shell, foam core) under the patient --------------------------
    y_table = _F32(p.yc - p.b_post - 4.0)
    xx = X[:, :, 0]
    yy = Y[:, :, 0]
    top = y_table + 0.0012 * xx * xx
    depth = top - yy
    plate = (depth >= 0) & (depth < 9) & (np.abs(xx) < 200)
    table_val = np.where((depth < 1.6) | (depth > 7.4), _F32(150), _F32(-450))

    # ---- body layers: skin, subcutaneous fat, muscle wall, cavity ---------------------------
    # Nested layers become one class map; HU = per-class base + per-class texture gain (a table
    # lookup is far cheaper than one masked assignment per layer on ~14 M voxels).
    tex = _field_on(seed, 4, X, Y, Z, 5.0)  # shared soft-tissue texture
    rb = _body_rho2(p, X, Y, Z)
    rb += 0.03 * _field_on(seed, 1, X, Y, Z, 45.0)
    cls = (rb <= 1).view(np.uint8)  # 1: skin
    cls += rb <= (1 - 2.2 / p.b_post) ** 2  # 2: subcutaneous fat
    del rb
    pert_in = _field_on(seed, 3, X, Y, Z, 40.0)
    rm = _body_rho2(p, X, Y, Z, shrink_lat=p.f_lat, shrink_ant=p.f_ant, shrink_post=p.f_post)
    rm += 0.05 * pert_in
    rm = rm <= 1
    rm &= cls == 2
    cls += rm  # 3: muscle wall
    rc = _cavity_rho2(p, X, Y, Z)
    rc += 0.03 * pert_in
    del pert_in
    cav = rm & (rc <= 1)
    in_wall = rm
    del rm
    cls += cav  # 4: abdominal cavity
    zd = _z_diaphragm(p, X, Y)  # (X, Y, 1)
    above = Z > zd
    below_dia = Z < zd - 5
    cls += cav & ~below_dia  # 5: diaphragm sheet
    cls += cav & above  # 6: chest cavity (mediastinal fat; lungs come later)
    base = np.array([-1000, 25, -100, 52, 0, 48, -90], _F32)
    gain = np.array([0, 0, 6, 5, 0, 0, 6], _F32)
    hu = base[cls]
    hu += gain[cls] * tex
    hu[plate] = table_val[plate][:, None]
    # abdomen: mesenteric fat with bowel loops (wall, fluid content, a little gas)
    bowel_f = _field_on(seed, 5, X, Y, Z, 14.0)
    th = _F32(p.bowel_th)
    val = np.where(bowel_f > th + 0.25, 22.0 + 6.0 * tex, 45.0 + 4 * tex)
    val = np.where(bowel_f > th, val, -95.0 + 6.0 * tex)
    val[(bowel_f > th + 1.5) & (Y > _F32(p.ycc0))] = -900.0
    np.copyto(hu, val, where=cls == 4)
    del val, bowel_f, cls
    muscle_tex = tex

    # ---- psoas muscles -------------------------------------------------------------------
    z_psoas = p.kid_zl + 35
    bx = grid.box((-90, p.yv0 - 40, -1e9), (90, p.yv0 + 60, z_psoas))
    if bx is not None:
        s_, x3, y3, z3 = bx
        xv, yv = _spine_x(p, z3), _spine_y(p, z3)
        rx, ry = _vb_radii(p, z3)
        w = 7 + 14 * np.clip((z_psoas - z3) / 110, 0, 1)
        m = np.zeros(np.broadcast_shapes(x3.shape, y3.shape, z3.shape), bool)
        for side in (-1, 1):
            m |= _rho2(x3 - (xv + side * (rx + w * 0.8)), y3 - (yv + 4), w, 0.9 * w) < 1
        m &= cav[s_]
        hu[s_][m] = 50.0 + 5.0 * muscle_tex[s_][m]

    # ---- abdominal organs ----------------------------------------------------------------
    def organ_box(c, r):
        return grid.box(tuple(ci - ri for ci, ri in zip(c, r)), tuple(ci + ri for ci, ri in zip(c, r)))

    # liver (with portal vessels)
    bx = grid.box((-0.6 * p.a_c0, p.ycc0 - 1.2 * p.bc0, p.z_dr - 150), (1.2 * p.a_c0, p.ycc0 + 1.2 * p.bc0, p.z_dr + 5))
    if bx is not None:
        s_, x3, y3, z3 = bx
        lr = _liver_rho2(p, x3, y3, z3) + 0.05 * _field_on(seed, 10, x3, y3, z3, 30.0)
        m = (lr < 1) & cav[s_] & below_dia[s_]
        del lr
        tex = 5.0 * _field_on(seed, 11, x3, y3, z3, 7.0) + 2.5 * _field_on(seed, 12, x3, y3, z3, 2.5)
        vfrac = np.zeros(m.shape, _F32)
        inside = lambda a, b, c: _liver(p, a, b, c)  # noqa: E731
        pts = _sample_points(tree_rng, inside, (-0.5 * p.a_c0, p.ycc0 - p.bc0, p.z_dr - 140),
                             (p.a_c0, p.ycc0 + p.bc0, p.z_dr), 256)
        if len(pts) >= 8:
            root = (0.2 * p.a_c0, p.ycc0 + 0.05 * p.bc0, p.z_dr - 70)
            sa, sb, sr = _grow_tree(tree_rng, root, pts, 6.0, 5, r_min=1.0)
            sub = _subgrid(grid, s_)
            _raster_capsules(sub, vfrac, sa, sb, sr, soft=max(0.8, min(spacing)))
        val = 58.0 + tex
        val = val + vfrac * (150.0 - val)
        hu[s_][m] = val[m]
        lab[s_][m] = _LIVER
        del val, tex, vfrac, m

    # gall bladder
    if p.gb:
        c = (0.28 * p.a_c0, p.ycc0 + 0.55 * p.bc0, p.z_dr - 95 + p.liver_dz)
        bx = organ_box(c, (20, 20, 35))
        if bx is not None:
            s_, x3, y3, z3 = bx
            r2 = _rot_ellipsoid_rho2(x3, y3, z3, c, (14, 13, 30), 30, 20)[0]
            m = (r2 < 1) & cav[s_]
            hu[s_][m & (r2 > 0.8)] = 40.0
            hu[s_][m & (r2 <= 0.8)] = 8.0
            lab[s_][m] = 0

    # stomach (fluid with an anterior gas cap: the patient is supine)
    c = (-0.45 * p.a_c0, p.ycc0 + 0.2 * p.bc0, p.z_dl - 42)
    ax = tuple(v * p.stom_s for v in (38, 34, 46))
    bx = organ_box(c, (50, 50, 55))
    if bx is not None:
        s_, x3, y3, z3 = bx
        r2 = _rot_ellipsoid_rho2(x3, y3, z3, c, ax, -30, -25)[0]
        r2 = r2 + 0.1 * _field_on(seed, 20, x3, y3, z3, 20.0)
        m = (r2 < 1) & cav[s_] & below_dia[s_]
        wall = m & (r2 > 0.8)
        yrel = np.broadcast_to(y3 - _F32(c[1]), m.shape)
        lumen = m & ~wall
        gas = lumen & (yrel > (1 - 2 * p.stom_gas) * ax[1])
        v = hu[s_]
        v[wall] = 48.0
        v[lumen] = 12.0 + 4.0 * muscle_tex[s_][lumen]
        v[gas] = -990.0
        lab[s_][m] = 0

    # spleen: crescent against the posterolateral left wall
    phi = math.radians(p.spleen_phi)
    bpt = np.array([p.a_c0 * math.cos(phi), p.ycc0 + p.bc0 * math.sin(phi)])
    nrm = np.array([math.cos(phi) / p.a_c0, math.sin(phi) / p.bc0])
    nrm /= np.linalg.norm(nrm)
    sc = (*(bpt - 22 * p.spleen_s * nrm), p.z_dl - 48)
    tang = math.degrees(math.atan2(nrm[1], nrm[0]))
    sax = tuple(v * p.spleen_s for v in (22, 55, 52))
    bx = organ_box(sc, (70, 70, 60))
    if bx is not None:
        s_, x3, y3, z3 = bx
        r2 = _rot_ellipsoid_rho2(x3, y3, z3, sc, sax, tang, 10)[0]
        cut_c = (sc[0] - 30 * nrm[0], sc[1] - 30 * nrm[1], sc[2])
        r2c = _rot_ellipsoid_rho2(x3, y3, z3, cut_c, (26, 40, 40), tang)[0]
        r2 = r2 + 0.06 * _field_on(seed, 30, x3, y3, z3, 20.0)
        m = (r2 < 1) & (r2c > 1) & cav[s_] & below_dia[s_]
        tex = 4.0 * _field_on(seed, 31, x3, y3, z3, 4.0)
        hu[s_][m] = (50.0 + tex)[m]
        lab[s_][m] = _SPLEEN

    # kidneys (perirenal fat, cortex, medulla, sinus fat, pelvis)
    for side, lab_k, zk, fid in ((1, _KID_R, p.kid_zr, 40), (-1, _KID_L, p.kid_zl, 50)):
        yv_k = float(_spine_y(p, np.float32(zk)))
        rx_k = float(_vb_radii(p, np.float32(zk))[0])
        c = (side * (rx_k + 42 + p.kid_dx), yv_k + 6, zk)
        ax = tuple(v * p.kid_s for v in (27, 22, 52))
        bx = organ_box(c, (60, 60, 75))
        if bx is None:
            continue
        s_, x3, y3, z3 = bx
        rot_z, rot_y = -side * 35.0, side * 14.0
        r2, (lx, ly, lz) = _rot_ellipsoid_rho2(x3, y3, z3, c, ax, rot_z, rot_y)
        r2 = r2 + 0.04 * _field_on(seed, fid, x3, y3, z3, 25.0)
        region = cav[s_] & below_dia[s_]
        fat = (r2 + 0.15 * _field_on(seed, fid + 2, x3, y3, z3, 12.0) < 1.25**2) & region & (lab[s_] != _SPLEEN)
        hu[s_][fat] = -95.0 + 5.0 * muscle_tex[s_][fat]
        lab[s_][fat] = 0
        lat = side * lx  # > 0 laterally; the hilum faces medially
        kid = (r2 < 1) & region & ~((lat < -0.55 * ax[0]) & (np.abs(lz) < 0.4 * ax[2]))
        sinus = kid & (((lat + 0.45 * ax[0]) / (0.55 * ax[0])) ** 2 + (ly / (0.5 * ax[1])) ** 2
                       + (lz / (0.6 * ax[2])) ** 2 < 1)
        pelvis = sinus & (((lat + 0.5 * ax[0]) / (0.3 * ax[0])) ** 2 + (ly / (0.25 * ax[1])) ** 2
                          + (lz / (0.3 * ax[2])) ** 2 < 1)
        tex = _field_on(seed, fid + 1, x3, y3, z3, 3.0)
        val = np.where(r2 > 0.62, 33.0 + 3.0 * tex, 22.0 + 4.0 * tex)
        val = np.where(sinus, -85.0, val)
        val = np.where(pelvis, 6.0, val)
        v = hu[s_]
        v[kid] = val[kid]
        lab[s_][kid] = lab_k
        lab[s_][sinus] = 0

    # ---- heart, great vessels, oesophagus -------------------------------------------------
    bx = organ_box(p.h_c, tuple(v * 1.2 for v in (max(p.h_ax),) * 3))
    if bx is not None:
        s_, x3, y3, z3 = bx
        r2, (hx, hy, hz) = _rot_ellipsoid_rho2(x3, y3, z3, p.h_c, p.h_ax, p.heart_rot)
        m = (r2 < 1) & cav[s_] & (z3 > zd[s_[0], s_[1]] - 2)
        septum = np.abs(hx + 0.15 * p.h_ax[0] - 0.25 * hy) < 5  # interventricular septum
        chambers = m & (r2 < 0.7) & ~septum
        v = hu[s_]
        v[m] = 45.0
        v[chambers] = 165.0 + 6.0 * muscle_tex[s_][chambers]
        lab[s_][m] = 0

    def paint_tube(center_fn, z_lo, z_hi, value, label, pad=20.0):
        bx = _tube_z(grid, center_fn, z_lo, z_hi, pad)
        if bx is None:
            return
        s_, x3, y3, z3 = bx
        cx, cy, r = center_fn(z3)[:3]
        r2 = ((x3 - cx) ** 2 + (y3 - cy) ** 2) / (r * r)
        m = r2 < 1
        v = hu[s_]
        v[m] = value
        lab[s_][m] = label

    # descending + abdominal aorta, ascending aorta, IVC, SVC, oesophagus
    paint_tube(lambda z: _aorta_center(p, z), -1e9, 1e9, 200.0, _AORTA, pad=30.0)
    sx, sy, sz, sr = _asc_aorta(p)
    paint_tube(lambda z: (np.full_like(z, sx), np.full_like(z, sy), np.full_like(z, sr)), sz, 1e9, 200.0, _AORTA)
    paint_tube(lambda z: (_spine_x(p, z) + 24, _spine_y(p, z) + _vb_radii(p, z)[1] + 12, np.full_like(z, 11.0)),
               -1e9, p.z_dr - 8, 115.0, 0)
    paint_tube(lambda z: (np.full_like(z, sx + 30), np.full_like(z, sy - 4), np.full_like(z, 9.0)),
               p.h_top - 15, 1e9, 120.0, 0)
    paint_tube(lambda z: (_spine_x(p, z) - 5, _spine_y(p, z) + _vb_radii(p, z)[1] + 8, np.full_like(z, 7.0)),
               p.z_dl - 30, 1e9, 40.0, 0)

    # ---- lungs with vessel trees ----------------------------------------------------------
    z_lung_lo = p.z_dl - 1.3 * p.dome_c - 5
    bx = grid.box((-1e9, -1e9, z_lung_lo), (1e9, 1e9, 1e9))
    if bx is not None:
        s_, x3, y3, z3 = bx
        lung = _mediastinum(p, x3, y3, z3, with_heart=False)
        hb = grid.box(tuple(c - 1.15 * r for c, r in zip(p.h_c, (max(p.h_ax),) * 3)),
                      tuple(c + 1.15 * r for c, r in zip(p.h_c, (max(p.h_ax),) * 3)))
        if hb is not None:
            inter = [slice(max(h.start, o.start), min(h.stop, o.stop)) for h, o in zip(hb[0], s_)]
            if all(i.stop > i.start for i in inter):
                hx, hy, hz = (grid.axes[i][inter[i]] for i in range(3))
                local = tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(inter, s_))
                lung[local] |= _heart_rho2(p, hx[:, None, None], hy[None, :, None], hz[None, None, :]) < 1.12**2
        np.logical_not(lung, out=lung)
        lung &= cav[s_]
        lung &= above[s_]
        lung &= rc[s_] < 0.97
        sub = _subgrid(grid, s_)
        vfrac = np.zeros(sub.shape, _F32)
        inside = lambda a, b, c: _lung(p, a, b, c)  # noqa: E731
        for side in (1, -1):
            lo = (0.0 if side > 0 else -p.a_c0 * 1.1, p.ycc0 - 1.2 * p.bc0, z_lung_lo)
            hi = (p.a_c0 * 1.1 if side > 0 else 0.0, p.ycc0 + 1.2 * p.bc0, p.z_dr + 150)
            pts = _sample_points(tree_rng, inside, lo, hi, 4096)
            if len(pts) < 16:
                continue
            hil_x = p.xv0 + side * 38
            roots = ((hil_x, p.tr[1] - 4, p.z_car - 22, 6.5), (hil_x + side * 2, p.tr[1] + 10, p.z_car - 45, 6.0))
            half = len(pts) // 2
            for (rx_, ry_, rz_, r0), part in zip(roots, (pts[:half], pts[half:])):
                sa, sb, sr = _grow_tree(tree_rng, (rx_, ry_, rz_), part, r0 * 1.1, 9, r_min=0.6, exponent=3.3)
                _raster_capsules(sub, vfrac, sa, sb, sr, soft=max(0.8, min(spacing)))
        # parenchyma: denser in the dependent (posterior) part, fine texture
        idx = np.nonzero(lung)
        tex = _field_on(seed, 60, x3, y3, z3, 4.0)[idx]
        _, ycc, bc = _cavity_params(p, z3.ravel()[idx[2]])
        dep = np.clip((ycc - y3.ravel()[idx[1]]) / bc, -1, 1)  # +1 posterior ... -1 anterior
        val = -850.0 + 25.0 * dep + 12.0 * tex
        f = vfrac[idx]
        hv = hu[s_]
        hv[idx] = val + f * (40.0 - val)
        lab[s_][idx] = _LUNG
        del idx, tex, dep, val, f
        # vessels continue into the mediastinal fat towards the hila
        vi = np.unravel_index(np.flatnonzero(vfrac), vfrac.shape)
        f = vfrac[vi]
        cur = hv[vi]
        ok = ~lung[vi] & cav[s_][vi] & above[s_][vi] & (cur < -50)
        hv[tuple(i[ok] for i in vi)] = (cur + f * (40.0 - cur))[ok]
        del lung, vfrac, vi

    # trachea and main bronchi (air with a thin wall)
    z_car = p.z_car
    bx = grid.box((p.tr[0] - 60, p.tr[1] - 40, z_car - 40), (p.tr[0] + 60, p.tr[1] + 20, 1e9))
    if bx is not None:
        s_, x3, y3, z3 = bx
        cov_o = np.zeros(np.broadcast_shapes(x3.shape, y3.shape, z3.shape), _F32)
        cov_i = np.zeros_like(cov_o)
        sub = _subgrid(grid, s_)
        top = np.array([p.tr[0], p.tr[1], 1e3])
        car = np.array([p.tr[0], p.tr[1], z_car])
        ends = [np.array([p.tr[0] + s * 36, p.tr[1] - 6, z_car - 26]) for s in (1, -1)]
        a = np.stack([car, car, car])
        b = np.stack([top, *ends])
        _raster_capsules(sub, cov_o, a, b, np.array([11.0, 8.0, 7.5]), soft=max(0.8, min(spacing)))
        _raster_capsules(sub, cov_i, a, b, np.array([9.0, 6.2, 5.8]), soft=max(0.8, min(spacing)))
        v = hu[s_]
        wall = (cov_o > 0.5) & (cov_i <= 0.5)
        v[wall] = 55.0
        v[cov_i > 0.5] = -1000.0
        lab[s_][(cov_o > 0.5)] = 0

    # ---- spine: vertebral bodies, discs, posterior elements; spinal canal ------------------
    y_lo = p.yc - p.b_post
    bx = grid.box((-75, y_lo, -1e9), (75, p.yv0 + 60, 1e9))
    if bx is not None:
        s_, x3, y3, z3 = bx
        xv, yv = _spine_x(p, z3), _spine_y(p, z3)
        rx, ry = _vb_radii(p, z3)
        pitch = 29.0 - 0.035 * z3
        k_ = 0.035
        svert = p.vb_phase - np.log1p(-k_ * z3 / 29.0) / k_  # vertebral level (pitch 29 - 0.035 z mm)
        fr = svert - np.floor(svert)  # 0..1 through one level (disc at the bottom)
        disc_f = 7.0 / pitch
        end_f = 1.6 / pitch
        dx, dy = x3 - xv, y3 - yv
        rv2 = (dx / rx) ** 2 + (dy / ry) ** 2
        body_m = rv2 < 1
        disc = body_m & (fr < disc_f)
        vb = body_m & ~disc
        cortex = vb & ((rv2 > (1 - 2.0 / rx) ** 2) | (fr < disc_f + end_f) | (fr > 1 - end_f))
        canal_y = yv - ry - 9.0
        rcan2 = (dx / 9.5) ** 2 + ((y3 - canal_y) / 8.0) ** 2
        canal = rcan2 < 1
        arch = (((dx / 16.0) ** 2 + ((y3 - canal_y) / 14.5) ** 2) < 1) & ~canal & (y3 < yv - ry + 3)
        arch &= (fr > 0.3) & (fr < 0.95)
        q = np.maximum(canal_y - 10 - y3, 0)  # distance behind the arch
        s_sp = p.vb_phase - np.log1p(-k_ * (z3 + 0.45 * q) / 29.0) / k_
        fr_sp = s_sp - np.floor(s_sp)
        tip = _F32(y_lo + p.f_post + 12)
        spinous = (np.abs(dx) < 3.8) & (y3 < canal_y - 8) & (y3 > tip) & (fr_sp > 0.4) & (fr_sp < 0.92)
        transverse = (np.abs(y3 - (canal_y + 1.5)) < 5.0) & (np.abs(dx) > 10) & (np.abs(dx) < 36) & (fr > 0.45) & (fr < 0.85)
        post = arch | spinous | transverse
        bone_tex = _field_on(seed, 70, x3, y3, z3, 2.0)
        v = hu[s_]
        lb = lab[s_]
        v[canal] = np.where((dx * dx + (y3 - canal_y) ** 2) < 30.0, 35.0, 10.0)[canal]
        lb[canal] = 0
        v[disc] = 95.0 + 8.0 * bone_tex[disc]
        lb[disc] = 0
        v[vb] = (440.0 + 70.0 * bone_tex)[vb]
        v[cortex] = (1050.0 + 60.0 * bone_tex)[cortex]
        v[post] = (800.0 + 90.0 * bone_tex)[post]
        lb[vb | post] = _BONE
        del v, lb

    # ---- ribs, costal cartilage, sternum ---------------------------------------------------
    shell = in_wall & (rc > 1) & (rc < 1.3)
    del in_wall
    idx = np.nonzero(shell)
    if len(idx[0]):
        xs, ys, zs = grid.axes[0][idx[0]], grid.axes[1][idx[1]], grid.axes[2][idx[2]]
        a_c, ycc, bc = _cavity_params(p, zs)
        rcs = np.sqrt(rc[idx])
        dxp, dyp = xs, ys - ycc
        rad = np.sqrt(dxp * dxp + dyp * dyp)
        dist = (rcs - 1) * rad / rcs  # mm outside the cavity wall, along the ray
        ang = np.arctan2(dyp / bc, np.abs(dxp) / a_c)  # -pi/2 posterior midline ... +pi/2 anterior
        vdir = ang * _F32(2 / math.pi)  # -1 posterior ... +1 anterior
        zeta = zs + p.rib_drop * ((vdir + 1) / 2) ** 0.7 - p.rib_low  # ribs descend towards the front
        kr = np.floor(zeta / p.rib_pitch)
        fz = zeta - kr * p.rib_pitch
        hh = p.rib_h / 2
        er2 = ((dist - 4.2) / 3.6) ** 2 + ((fz - hh) / hh) ** 2  # elliptic rib cross-section
        rib = (kr >= 0) & (er2 < 1)
        rib &= ~((kr == 0) & (vdir > -0.3)) & ~((kr == 1) & (vdir > 0.2))  # floating ribs 11, 12
        xv_s = _spine_x(p, zs)
        rib &= ~((vdir < 0) & (np.abs(xs - xv_s) < 22))
        rib &= ~((vdir > 0) & (np.abs(xs) < 17))
        z_cm = p.z_xiph - 0.55 * np.abs(xs)  # costal margin
        rib &= ~((vdir > 0.25) & (zs < z_cm))
        cart = rib & (vdir > 0.72)
        bone = rib & ~cart
        margin = 1 - np.sqrt(er2)
        rib_tex = _hash_gauss(seed, 80, idx[0], idx[1], idx[2]) * 25.0
        val = np.where(margin < 0.3, 1000.0, 380.0) + rib_tex
        val = np.where(cart, 140.0 + 0.3 * rib_tex, val)
        sel = tuple(i[rib] for i in idx)
        hu[sel] = val[rib]
        lab[tuple(i[bone] for i in idx)] = _BONE
        lab[tuple(i[cart] for i in idx)] = 0
    del rc

    # sternum
    bx = grid.box((-25, p.ycc0, p.z_xiph), (25, 1e9, 1e9))
    if bx is not None:
        s_, x3, y3, z3 = bx
        _, ycc, bc = _cavity_params(p, z3)
        yst = ycc + bc + 7.0
        r2 = (x3 / 15.0) ** 2 + ((y3 - yst) / 6.5) ** 2
        m = r2 < 1
        v = hu[s_]
        v[m] = 400.0
        v[m & (r2 > 0.55)] = 950.0
        lab[s_][m] = _BONE

    # ---- outside the body is air (the table stays) -----------------------------------------
    # (everything above was painted inside the body masks already)

    # ---- image formation: blur (scanner PSF) + correlated noise -----------------------------
    # Uniform random bytes are ~10x cheaper than Gaussian draws; the sum of two (triangular) turns
    # Gaussian enough after the in-plane blur that mixes 9 of them.
    noise = noise_rng.integers(0, 256, size=(2, *shape), dtype=np.uint8)
    noisy = noise[0].astype(np.int16)
    noisy += noise[1]
    del noise
    weights = []
    for s in spacing[:2]:  # 3-tap binomial-like kernel [w, 1-2w, w]: sigma = sqrt(2w) voxels
        sv = _PSF_SIGMA_MM / s
        weights.append(min(0.25, 0.5 * sv * sv) if sv >= 0.3 else 0.0)
    gain = math.prod(math.sqrt(2 * w * w + (1 - 2 * w) ** 2) for w in weights)
    scale = _F32(_NOISE_STD / (gain * math.sqrt(2 * (256**2 - 1) / 12.0)))
    hu += (noisy - np.int16(255)).astype(_F32) * scale
    del noisy
    for axis, w in enumerate(weights):
        if w:
            hu = _blur3(hu, axis, w)
    np.clip(hu, -1024, 3071, out=hu)
    np.rint(hu, out=hu)
    image = hu.astype(np.int16)
    return Phantom(image=image, label=lab, spacing=spacing, affine=_affine(shape, spacing))


# --------------------------------------------------------------------------------------------
# Writing NIfTI files
# --------------------------------------------------------------------------------------------


def _nifti_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    """Gzipped NIfTI-1 bytes of ``array`` with qform = sform = ``affine`` (scanner RAS, mm)."""
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units(xyz="mm")
    img.header.set_data_dtype(array.dtype)
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def _atomic_write(path: Path, data: bytes) -> None:
    """Writes ``data`` to a hidden temp file next to ``path``, then renames it over ``path``."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _read_manifest(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def write_phantoms(
    out_dir: str | Path,
    count: int,
    seed: int = 0,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
) -> list[Path]:
    """Writes ``count`` phantoms as ``out_dir/images/phantom_{seed+i:03d}.nii.gz`` and
    ``out_dir/labels/phantom_{seed+i:03d}.nii.gz`` for i in range(count); returns the image paths.

    Idempotent: a phantom whose two files exist and that ``out_dir/phantoms.json`` records with
    the same shape, spacing and generator version is not regenerated. When those parameters
    changed, the requested phantoms are regenerated and files of other seeds recorded under the
    old parameters are removed (so the folder never mixes grids). Every file is written
    atomically (hidden temp name in the same folder, then ``os.replace``), and the manifest is
    updated after each phantom, so an interrupted run leaves no truncated file behind.

    Args:
        out_dir: destination folder (created if missing).
        count: number of phantoms, >= 1.
        seed: seed of the first phantom (>= 0); phantom i uses ``seed + i``.
        shape: voxels along (X, Y, Z), each >= 16.
        spacing: voxel size in mm, each > 0.

    Raises:
        ValueError: on invalid arguments.
    """
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise ValueError(f"count must be an integer >= 1, got {count!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    shape, spacing = _check_shape_spacing(shape, spacing)
    out = Path(out_dir).expanduser()
    img_dir, lab_dir = out / "images", out / "labels"
    img_dir.mkdir(parents=True, exist_ok=True)
    lab_dir.mkdir(parents=True, exist_ok=True)
    for d in (img_dir, lab_dir):  # temp files of an interrupted earlier run
        for stale in d.glob(".phantom_*.tmp"):
            stale.unlink(missing_ok=True)

    manifest_path = out / _MANIFEST
    params = {"version": GENERATOR_VERSION, "shape": list(shape), "spacing": list(spacing)}
    manifest = _read_manifest(manifest_path)
    same = all(manifest.get(k) == v for k, v in params.items())
    done: set[int] = set(int(s) for s in manifest.get("seeds", [])) if same else set()
    if not same:
        for old in manifest.get("seeds", []) or []:
            if isinstance(old, int) and not (seed <= old < seed + count):
                for d in (img_dir, lab_dir):
                    (d / f"phantom_{old:03d}.nii.gz").unlink(missing_ok=True)

    def save_manifest() -> None:
        data = {**params, "seeds": sorted(done)}
        _atomic_write(manifest_path, (json.dumps(data, indent=2) + "\n").encode())

    if not same:
        save_manifest()
    paths = []
    for s in range(seed, seed + count):
        name = f"phantom_{s:03d}.nii.gz"
        img_path, lab_path = img_dir / name, lab_dir / name
        paths.append(img_path)
        if s in done and img_path.is_file() and lab_path.is_file():
            continue
        done.discard(s)
        ph = make_phantom(s, shape, spacing)
        _atomic_write(img_path, _nifti_bytes(ph.image, ph.affine))
        _atomic_write(lab_path, _nifti_bytes(ph.label, ph.affine))
        done.add(s)
        save_manifest()
    return paths
