"""The heart: a tilted ellipsoid of myocardium around contrast-filled chambers, on the diaphragm."""

from __future__ import annotations

import numpy as np

from maesil.phantoms.anatomy import rot_ellipsoid_rho2
from maesil.phantoms.canvas import Canvas

__all__ = ["heart_rho2", "paint_heart"]


def heart_rho2(p, x, y, z):
    """Squared normalised radius of the heart (<= 1 inside)."""
    return rot_ellipsoid_rho2(x, y, z, p.h_c, p.h_ax, p.heart_rot)[0]


def paint_heart(c: Canvas) -> None:
    """Myocardium (45 HU) and chambers (≈ 165 HU) split by the interventricular septum."""
    p = c.patient
    bx = c.grid.around(p.h_c, (max(p.h_ax) * 1.2,) * 3)
    if bx is None:
        return
    s_, x3, y3, z3 = bx
    r2, (hx, hy, hz) = rot_ellipsoid_rho2(x3, y3, z3, p.h_c, p.h_ax, p.heart_rot)
    m = (r2 < 1) & c.body.cavity[s_] & (z3 > c.body.diaphragm_z[s_[0], s_[1]] - 2)
    septum = np.abs(hx + 0.15 * p.h_ax[0] - 0.25 * hy) < 5  # interventricular septum
    chambers = m & (r2 < 0.7) & ~septum
    v = c.hu[s_]
    v[m] = 45.0
    v[chambers] = 165.0 + 6.0 * c.body.texture[s_][chambers]
    c.label[s_][m] = 0
