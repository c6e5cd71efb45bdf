"""The great vessels as vertical tubes: descending, abdominal and ascending aorta, inferior and
superior vena cava; the oesophagus is painted the same way."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy import float32 as F32

from maesil.phantoms.anatomy import spine_x, spine_y, vb_radii
from maesil.phantoms.canvas import Canvas
from maesil.phantoms.labels import AORTA

__all__ = ["aorta_center", "ascending_aorta", "paint_vessels"]


def aorta_center(p, z):
    """Descending aorta: left-lateral of the vertebral body in the thorax, anterior-left below."""
    w = 1 / (1 + np.exp(-(z - F32(p.z_dl - 10)) / F32(25)))  # 1 in the thorax
    xv, yv = spine_x(p, z), spine_y(p, z)
    rx, ry = vb_radii(p, z)
    cx = xv - (8 + (rx + 6 - 8) * w)
    cy = yv + (ry + 11) * (1 - w) + 6 * w
    r = F32(p.aorta_r) * (1 + 0.12 * w)
    return cx, cy, r


def ascending_aorta(p):
    """Centre (x, y), lowest height and radius of the ascending aorta, above the heart (mm)."""
    return p.h_c[0] + 0.3 * p.h_ax[0], p.h_c[1] + 0.2 * p.h_ax[1], p.h_c[2] + 0.3 * p.h_ax[2], p.aorta_r * 1.3


def _paint_tube(c: Canvas, center_fn: Callable[[np.ndarray], tuple], z_lo: float, z_hi: float, value: float,
                label: int, pad: float = 20.0) -> None:
    """Paints ``value`` / ``label`` inside the tube of centre and radius ``center_fn(z)`` over [z_lo, z_hi]."""
    bx = c.grid.tube_box(center_fn, z_lo, z_hi, pad)
    if bx is None:
        return
    s_, x3, y3, z3 = bx
    cx, cy, r = center_fn(z3)[:3]
    r2 = ((x3 - cx) ** 2 + (y3 - cy) ** 2) / (r * r)
    m = r2 < 1
    v = c.hu[s_]
    v[m] = value
    c.label[s_][m] = label


def paint_vessels(c: Canvas) -> None:
    """Aorta (labelled), inferior and superior vena cava, oesophagus."""
    p = c.patient
    _paint_tube(c, lambda z: aorta_center(p, z), -1e9, 1e9, 200.0, AORTA, pad=30.0)
    sx, sy, sz, sr = ascending_aorta(p)
    _paint_tube(c, lambda z: (np.full_like(z, sx), np.full_like(z, sy), np.full_like(z, sr)), sz, 1e9, 200.0, AORTA)
    _paint_tube(c, lambda z: (spine_x(p, z) + 24, spine_y(p, z) + vb_radii(p, z)[1] + 12, np.full_like(z, 11.0)),
                -1e9, p.z_dr - 8, 115.0, 0)
    _paint_tube(c, lambda z: (np.full_like(z, sx + 30), np.full_like(z, sy - 4), np.full_like(z, 9.0)),
                p.h_top - 15, 1e9, 120.0, 0)
    _paint_tube(c, lambda z: (spine_x(p, z) - 5, spine_y(p, z) + vb_radii(p, z)[1] + 8, np.full_like(z, 7.0)),
                p.z_dl - 30, 1e9, 40.0, 0)
