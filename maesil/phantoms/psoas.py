"""The psoas muscles on both sides of the lumbar spine."""

from __future__ import annotations

import numpy as np

from maesil.phantoms.anatomy import rho2, spine_x, spine_y, vb_radii
from maesil.phantoms.canvas import Canvas

__all__ = ["paint_psoas"]


def paint_psoas(c: Canvas) -> None:
    """Two muscles widening downwards from the kidneys, beside the vertebral bodies."""
    p = c.patient
    z_psoas = p.kid_zl + 35
    bx = c.grid.box((-90, p.yv0 - 40, -1e9), (90, p.yv0 + 60, z_psoas))
    if bx is None:
        return
    s_, x3, y3, z3 = bx
    xv, yv = spine_x(p, z3), spine_y(p, z3)
    rx, ry = vb_radii(p, z3)
    w = 7 + 14 * np.clip((z_psoas - z3) / 110, 0, 1)
    m = np.zeros(np.broadcast_shapes(x3.shape, y3.shape, z3.shape), bool)
    for side in (-1, 1):
        m |= rho2(x3 - (xv + side * (rx + w * 0.8)), y3 - (yv + 4), w, 0.9 * w) < 1
    m &= c.body.cavity[s_]
    c.hu[s_][m] = 50.0 + 5.0 * c.body.texture[s_][m]
