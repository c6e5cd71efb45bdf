"""The stomach: fluid with an anterior gas cap (the patient is supine), behind a wall."""

from __future__ import annotations

import numpy as np
from numpy import float32 as F32

from maesil.phantoms.anatomy import rot_ellipsoid_rho2
from maesil.phantoms.canvas import Canvas
from maesil.phantoms.fields import field_on

__all__ = ["paint_stomach"]


def paint_stomach(c: Canvas) -> None:
    """A tilted ellipsoid under the left diaphragm dome."""
    p = c.patient
    centre = (-0.45 * p.a_c0, p.ycc0 + 0.2 * p.bc0, p.z_dl - 42)
    ax = tuple(v * p.stom_s for v in (38, 34, 46))
    bx = c.grid.around(centre, (50, 50, 55))
    if bx is None:
        return
    s_, x3, y3, z3 = bx
    r2 = rot_ellipsoid_rho2(x3, y3, z3, centre, ax, -30, -25)[0]
    r2 = r2 + 0.1 * field_on(c.seed, 20, x3, y3, z3, 20.0)
    m = (r2 < 1) & c.body.cavity[s_] & c.body.below_diaphragm[s_]
    wall = m & (r2 > 0.8)
    yrel = np.broadcast_to(y3 - F32(centre[1]), m.shape)
    lumen = m & ~wall
    gas = lumen & (yrel > (1 - 2 * p.stom_gas) * ax[1])
    v = c.hu[s_]
    v[wall] = 48.0
    v[lumen] = 12.0 + 4.0 * c.body.texture[s_][lumen]
    v[gas] = -990.0
    c.label[s_][m] = 0
