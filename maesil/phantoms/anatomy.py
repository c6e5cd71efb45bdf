"""The patient: shape parameters drawn from the seed, and the geometry of the trunk they define.

Everything is in mm around the volume centre and never depends on the voxel grid. The geometry
functions broadcast, so they work on grid boxes and on point clouds alike.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
from numpy import float32 as F32

__all__ = [
    "Patient",
    "body_rho2",
    "cavity_params",
    "cavity_rho2",
    "patient",
    "rho2",
    "rot_ellipsoid_rho2",
    "spine_x",
    "spine_y",
    "vb_radii",
    "z_diaphragm",
]

#: The per-patient parameters (attributes in mm, degrees or fractions), see :func:`patient`.
Patient = SimpleNamespace


def patient(seed: int) -> Patient:
    """The parameters of the patient of ``seed``: drawn sizes and positions plus derived landmarks."""
    p = _sample(seed)
    _derive(p)
    return p


def _sample(seed: int) -> Patient:
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


def _derive(p: Patient) -> None:
    """Quantities shared by several structures (mid-thorax cavity size, heart, carina, ...)."""
    zr = p.z_dr
    a_c, ycc, bc = cavity_params(p, np.float32(zr))
    p.a_c0, p.ycc0, p.bc0 = float(a_c), float(ycc), float(bc)
    p.yv0 = float(spine_y(p, np.float32(zr)))
    p.xv0 = float(spine_x(p, np.float32(zr)))
    # Heart: anterior-left, resting on the diaphragm.
    p.h_c = (p.xv0 - 0.14 * p.a_c0, p.ycc0 + 0.22 * p.bc0, 0.0)
    p.h_ax = (0.48 * p.a_c0 * p.heart_s, 0.52 * p.bc0 * p.heart_s, 50.0 * p.heart_s)
    z_floor = float(z_diaphragm(p, np.float32(p.h_c[0]), np.float32(p.h_c[1])))
    p.h_c = (p.h_c[0], p.h_c[1], z_floor + 0.62 * p.h_ax[2])
    p.h_top = p.h_c[2] + p.h_ax[2]
    p.z_car = p.h_top + 8.0
    p.tr = (p.xv0 + 2.0, p.yv0 + p.vb_ry + 20.0)  # trachea centre (x, y)
    p.z_xiph = p.z_dr - p.z_xiph_off


def _zn(z):
    return z * F32(1 / 120)


def _body_params(p, z):
    zn = _zn(z)
    a = p.a * (1 + p.ka * zn)
    b_ant = p.b_ant * (1 - p.kb * zn)
    return a, b_ant


def spine_y(p, z):
    """AP position (mm) of the vertebral body centres at height ``z``."""
    zn = _zn(z)
    return F32(p.yc - p.b_post + p.vb_depth) + F32(p.sp_cl) * zn + F32(p.sp_cq) * zn * zn


def spine_x(p, z):
    """LR position (mm) of the vertebral body centres at height ``z`` (a slight scoliosis)."""
    return F32(p.sp_x) * _zn(z)


def vb_radii(p, z):
    """LR and AP semi-axes (mm) of the vertebral bodies at height ``z``."""
    t = np.clip(_zn(z) * 0.5 + 0.5, 0, 1)  # 0 at the bottom (lumbar), 1 at the top (thoracic)
    return F32(p.vb_rx) * (1 - 0.22 * t), F32(p.vb_ry) * (1 - 0.12 * t)


def cavity_params(p, z):
    """Inner wall of the trunk (pleura / peritoneum): LR semi-axis, AP centre and semi-axis."""
    a, b_ant = _body_params(p, z)
    a_c = a - p.f_lat - p.m_lat
    ant = p.yc + b_ant - p.f_ant - p.m_ant
    post = spine_y(p, z) - p.cav_gap
    return a_c, (ant + post) / 2, (ant - post) / 2


def rho2(dx, dy, ax, by, beta=0.0):
    """Squared normalised radius of a (boxy for beta > 0) ellipse; <= 1 inside."""
    u2 = (dx / ax) ** 2
    v2 = (dy / by) ** 2
    if beta:
        return u2 * (1 - F32(beta) * v2) + v2
    return u2 + v2


def body_rho2(p, x, y, z, shrink_lat=0.0, shrink_ant=0.0, shrink_post=0.0):
    """:func:`rho2` of the body outline, optionally shrunk by layer thicknesses (mm)."""
    a, b_ant = _body_params(p, z)
    dy = y - F32(p.yc)
    by = np.where(dy > 0, b_ant - shrink_ant, F32(p.b_post - shrink_post)).astype(F32)
    return rho2(x, dy, a - shrink_lat, by, p.beta)


def cavity_rho2(p, x, y, z):
    """:func:`rho2` of the trunk cavity (flat at the back, round at the front)."""
    a_c, ycc, bc = cavity_params(p, z)
    dy = y - ycc
    v2 = (dy / bc) ** 2
    beta = np.where(dy < 0, F32(0.6), F32(0.5 * p.beta)).astype(F32)  # flat back, round front
    return (x / a_c) ** 2 * (1 - beta * v2) + v2


def z_diaphragm(p, x, y):
    """Height of the diaphragm: two domes (right higher), lowest posteriorly and laterally."""
    yd = F32(p.ycc0 + 0.15 * p.bc0)
    wx, wy = F32(0.62 * p.a_c0), F32(1.1 * p.bc0)
    xr = F32(0.45 * p.a_c0)
    ey = ((y - yd) / wy) ** 2
    right = F32(p.z_dr) - F32(p.dome_c) * np.minimum(((x - xr) / wx) ** 2 + ey, F32(1.3))
    left = F32(p.z_dl) - F32(p.dome_c) * np.minimum(((x + xr) / wx) ** 2 + ey, F32(1.3))
    return np.maximum(right, left)  # the posterior recesses reach at most 1.3 dome depths down


def rot_ellipsoid_rho2(x, y, z, c, axes, rot_z_deg=0.0, rot_y_deg=0.0):
    """Squared normalised radius of an ellipsoid rotated about z (axial) then y (coronal tilt)."""
    dx, dy, dz = x - F32(c[0]), y - F32(c[1]), z - F32(c[2])
    if rot_y_deg:
        t = math.radians(rot_y_deg)
        ct, st = F32(math.cos(t)), F32(math.sin(t))
        dx, dz = ct * dx + st * dz, -st * dx + ct * dz
    if rot_z_deg:
        t = math.radians(rot_z_deg)
        ct, st = F32(math.cos(t)), F32(math.sin(t))
        dx, dy = ct * dx + st * dy, -st * dx + ct * dy
    return (dx / F32(axes[0])) ** 2 + (dy / F32(axes[1])) ** 2 + (dz / F32(axes[2])) ** 2, (dx, dy, dz)
