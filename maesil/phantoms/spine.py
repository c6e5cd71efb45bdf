"""The spine: vertebral bodies (cortical shell, cancellous core), discs, posterior elements and
the spinal canal."""

from __future__ import annotations

import numpy as np
from numpy import float32 as F32

from maesil.phantoms.anatomy import spine_x, spine_y, vb_radii
from maesil.phantoms.canvas import Canvas
from maesil.phantoms.fields import field_on
from maesil.phantoms.labels import BONE

__all__ = ["paint_spine"]


def paint_spine(c: Canvas) -> None:
    """Vertebral levels of pitch ``29 - 0.035 z`` mm, each a disc at the bottom and a body above,
    with the arch, spinous and transverse processes behind."""
    p, seed = c.patient, c.seed
    y_lo = p.yc - p.b_post
    bx = c.grid.box((-75, y_lo, -1e9), (75, p.yv0 + 60, 1e9))
    if bx is None:
        return
    s_, x3, y3, z3 = bx
    xv, yv = spine_x(p, z3), spine_y(p, z3)
    rx, ry = vb_radii(p, z3)
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
    tip = F32(y_lo + p.f_post + 12)
    spinous = (np.abs(dx) < 3.8) & (y3 < canal_y - 8) & (y3 > tip) & (fr_sp > 0.4) & (fr_sp < 0.92)
    transverse = (np.abs(y3 - (canal_y + 1.5)) < 5.0) & (np.abs(dx) > 10) & (np.abs(dx) < 36) & (fr > 0.45) & (fr < 0.85)
    post = arch | spinous | transverse
    bone_tex = field_on(seed, 70, x3, y3, z3, 2.0)
    v = c.hu[s_]
    lb = c.label[s_]
    v[canal] = np.where((dx * dx + (y3 - canal_y) ** 2) < 30.0, 35.0, 10.0)[canal]
    lb[canal] = 0
    v[disc] = 95.0 + 8.0 * bone_tex[disc]
    lb[disc] = 0
    v[vb] = (440.0 + 70.0 * bone_tex)[vb]
    v[cortex] = (1050.0 + 60.0 * bone_tex)[cortex]
    v[post] = (800.0 + 90.0 * bone_tex)[post]
    lb[vb | post] = BONE
