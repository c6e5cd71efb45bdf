"""The kidneys: perirenal fat, cortex, medulla, sinus fat and pelvis, on both sides of the spine."""

from __future__ import annotations

import numpy as np

from maesil.phantoms.anatomy import rot_ellipsoid_rho2, spine_y, vb_radii
from maesil.phantoms.canvas import Canvas
from maesil.phantoms.fields import field_on
from maesil.phantoms.labels import KIDNEY_LEFT, KIDNEY_RIGHT, SPLEEN

__all__ = ["paint_kidneys"]


def paint_kidneys(c: Canvas) -> None:
    """Right then left kidney, each tilted with its hilum facing medially (after the spleen)."""
    p, seed, hu, lab = c.patient, c.seed, c.hu, c.label
    for side, lab_k, zk, fid in ((1, KIDNEY_RIGHT, p.kid_zr, 40), (-1, KIDNEY_LEFT, p.kid_zl, 50)):
        yv_k = float(spine_y(p, np.float32(zk)))
        rx_k = float(vb_radii(p, np.float32(zk))[0])
        centre = (side * (rx_k + 42 + p.kid_dx), yv_k + 6, zk)
        ax = tuple(v * p.kid_s for v in (27, 22, 52))
        bx = c.grid.around(centre, (60, 60, 75))
        if bx is None:
            continue
        s_, x3, y3, z3 = bx
        rot_z, rot_y = -side * 35.0, side * 14.0
        r2, (lx, ly, lz) = rot_ellipsoid_rho2(x3, y3, z3, centre, ax, rot_z, rot_y)
        r2 = r2 + 0.04 * field_on(seed, fid, x3, y3, z3, 25.0)
        region = c.body.cavity[s_] & c.body.below_diaphragm[s_]
        fat = (r2 + 0.15 * field_on(seed, fid + 2, x3, y3, z3, 12.0) < 1.25**2) & region & (lab[s_] != SPLEEN)
        hu[s_][fat] = -95.0 + 5.0 * c.body.texture[s_][fat]
        lab[s_][fat] = 0
        lat = side * lx  # > 0 laterally; the hilum faces medially
        kid = (r2 < 1) & region & ~((lat < -0.55 * ax[0]) & (np.abs(lz) < 0.4 * ax[2]))
        sinus = kid & (((lat + 0.45 * ax[0]) / (0.55 * ax[0])) ** 2 + (ly / (0.5 * ax[1])) ** 2
                       + (lz / (0.6 * ax[2])) ** 2 < 1)
        pelvis = sinus & (((lat + 0.5 * ax[0]) / (0.3 * ax[0])) ** 2 + (ly / (0.25 * ax[1])) ** 2
                          + (lz / (0.3 * ax[2])) ** 2 < 1)
        tex = field_on(seed, fid + 1, x3, y3, z3, 3.0)
        val = np.where(r2 > 0.62, 33.0 + 3.0 * tex, 22.0 + 4.0 * tex)
        val = np.where(sinus, -85.0, val)
        val = np.where(pelvis, 6.0, val)
        v = hu[s_]
        v[kid] = val[kid]
        lab[s_][kid] = lab_k
        lab[s_][sinus] = 0
