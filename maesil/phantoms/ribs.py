"""The rib cage: ribs (cortical rim, marrow), costal cartilage and the sternum."""

from __future__ import annotations

import math

import numpy as np
from numpy import float32 as F32

from maesil.phantoms.anatomy import cavity_params, spine_x
from maesil.phantoms.canvas import Canvas
from maesil.phantoms.fields import hash_gauss
from maesil.phantoms.labels import BONE

__all__ = ["paint_ribs", "paint_sternum"]


def paint_ribs(c: Canvas) -> None:
    """Ribs in the muscle wall just outside the cavity, descending towards the front; floating ribs
    11 and 12, cartilage at the front, none at the spine, the sternum or below the costal margin."""
    p, grid, seed = c.patient, c.grid, c.seed
    rc = c.body.cavity_rho2
    shell = c.body.muscle_wall & (rc > 1) & (rc < 1.3)
    idx = np.nonzero(shell)
    if not len(idx[0]):
        return
    xs, ys, zs = grid.axes[0][idx[0]], grid.axes[1][idx[1]], grid.axes[2][idx[2]]
    a_c, ycc, bc = cavity_params(p, zs)
    rcs = np.sqrt(rc[idx])
    dxp, dyp = xs, ys - ycc
    rad = np.sqrt(dxp * dxp + dyp * dyp)
    dist = (rcs - 1) * rad / rcs  # mm outside the cavity wall, along the ray
    ang = np.arctan2(dyp / bc, np.abs(dxp) / a_c)  # -pi/2 posterior midline ... +pi/2 anterior
    vdir = ang * F32(2 / math.pi)  # -1 posterior ... +1 anterior
    zeta = zs + p.rib_drop * ((vdir + 1) / 2) ** 0.7 - p.rib_low  # ribs descend towards the front
    kr = np.floor(zeta / p.rib_pitch)
    fz = zeta - kr * p.rib_pitch
    hh = p.rib_h / 2
    er2 = ((dist - 4.2) / 3.6) ** 2 + ((fz - hh) / hh) ** 2  # elliptic rib cross-section
    rib = (kr >= 0) & (er2 < 1)
    rib &= ~((kr == 0) & (vdir > -0.3)) & ~((kr == 1) & (vdir > 0.2))  # floating ribs 11, 12
    xv_s = spine_x(p, zs)
    rib &= ~((vdir < 0) & (np.abs(xs - xv_s) < 22))
    rib &= ~((vdir > 0) & (np.abs(xs) < 17))
    z_cm = p.z_xiph - 0.55 * np.abs(xs)  # costal margin
    rib &= ~((vdir > 0.25) & (zs < z_cm))
    cart = rib & (vdir > 0.72)
    bone = rib & ~cart
    margin = 1 - np.sqrt(er2)
    rib_tex = hash_gauss(seed, 80, idx[0], idx[1], idx[2]) * 25.0
    val = np.where(margin < 0.3, 1000.0, 380.0) + rib_tex
    val = np.where(cart, 140.0 + 0.3 * rib_tex, val)
    sel = tuple(i[rib] for i in idx)
    c.hu[sel] = val[rib]
    c.label[tuple(i[bone] for i in idx)] = BONE
    c.label[tuple(i[cart] for i in idx)] = 0


def paint_sternum(c: Canvas) -> None:
    """A flat bone (marrow inside a cortical rim) in front of the chest cavity, above the xiphoid."""
    p = c.patient
    bx = c.grid.box((-25, p.ycc0, p.z_xiph), (25, 1e9, 1e9))
    if bx is None:
        return
    s_, x3, y3, z3 = bx
    _, ycc, bc = cavity_params(p, z3)
    yst = ycc + bc + 7.0
    r2 = (x3 / 15.0) ** 2 + ((y3 - yst) / 6.5) ** 2
    m = r2 < 1
    v = c.hu[s_]
    v[m] = 400.0
    v[m & (r2 > 0.55)] = 950.0
    c.label[s_][m] = BONE
