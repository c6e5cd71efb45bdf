"""The spleen: a crescent against the posterolateral left wall of the abdomen."""

from __future__ import annotations

import math

import numpy as np

from maesil.phantoms.anatomy import rot_ellipsoid_rho2
from maesil.phantoms.canvas import Canvas
from maesil.phantoms.fields import field_on
from maesil.phantoms.labels import SPLEEN

__all__ = ["paint_spleen"]


def paint_spleen(c: Canvas) -> None:
    """An ellipsoid along the cavity wall, hollowed on its medial side."""
    p, seed = c.patient, c.seed
    phi = math.radians(p.spleen_phi)
    bpt = np.array([p.a_c0 * math.cos(phi), p.ycc0 + p.bc0 * math.sin(phi)])
    nrm = np.array([math.cos(phi) / p.a_c0, math.sin(phi) / p.bc0])
    nrm /= np.linalg.norm(nrm)
    sc = (*(bpt - 22 * p.spleen_s * nrm), p.z_dl - 48)
    tang = math.degrees(math.atan2(nrm[1], nrm[0]))
    sax = tuple(v * p.spleen_s for v in (22, 55, 52))
    bx = c.grid.around(sc, (70, 70, 60))
    if bx is None:
        return
    s_, x3, y3, z3 = bx
    r2 = rot_ellipsoid_rho2(x3, y3, z3, sc, sax, tang, 10)[0]
    cut_c = (sc[0] - 30 * nrm[0], sc[1] - 30 * nrm[1], sc[2])
    r2c = rot_ellipsoid_rho2(x3, y3, z3, cut_c, (26, 40, 40), tang)[0]
    r2 = r2 + 0.06 * field_on(seed, 30, x3, y3, z3, 20.0)
    m = (r2 < 1) & (r2c > 1) & c.body.cavity[s_] & c.body.below_diaphragm[s_]
    tex = 4.0 * field_on(seed, 31, x3, y3, z3, 4.0)
    c.hu[s_][m] = (50.0 + tex)[m]
    c.label[s_][m] = SPLEEN
