"""The body and what it lies on: the table, skin, subcutaneous fat, muscle wall, the cavities with
the diaphragm, and the bowel loops in the mesenteric fat of the abdomen."""

from __future__ import annotations

import numpy as np
from numpy import float32 as F32

from maesil.phantoms.anatomy import Patient, body_rho2, cavity_rho2, z_diaphragm
from maesil.phantoms.canvas import Body
from maesil.phantoms.fields import field_on
from maesil.phantoms.grid import Grid

__all__ = ["paint_body"]

# HU base value and texture gain of each layer class: 0 air, 1 skin, 2 subcutaneous fat,
# 3 muscle wall, 4 abdominal cavity, 5 diaphragm sheet, 6 chest cavity (mediastinal fat).
_LAYER_HU = np.array([-1000, 25, -100, 52, 0, 48, -90], F32)
_LAYER_GAIN = np.array([0, 0, 6, 5, 0, 0, 6], F32)


def paint_body(grid: Grid, p: Patient, seed: int) -> tuple[np.ndarray, Body]:
    """The float32 HU volume of the table and body layers, and the body's masks."""
    _, X, Y, Z = grid.full()

    # table (carbon-fibre shell, foam core) under the patient
    y_table = F32(p.yc - p.b_post - 4.0)
    xx = X[:, :, 0]
    yy = Y[:, :, 0]
    top = y_table + 0.0012 * xx * xx
    depth = top - yy
    plate = (depth >= 0) & (depth < 9) & (np.abs(xx) < 200)
    table_val = np.where((depth < 1.6) | (depth > 7.4), F32(150), F32(-450))

    # Nested layers become one class map; HU = per-class base + per-class texture gain (a table
    # lookup is far cheaper than one masked assignment per layer on ~14 M voxels).
    tex = field_on(seed, 4, X, Y, Z, 5.0)  # shared soft-tissue texture
    rb = body_rho2(p, X, Y, Z)
    rb += 0.03 * field_on(seed, 1, X, Y, Z, 45.0)
    cls = (rb <= 1).view(np.uint8)  # 1: skin
    cls += rb <= (1 - 2.2 / p.b_post) ** 2  # 2: subcutaneous fat
    del rb
    pert_in = field_on(seed, 3, X, Y, Z, 40.0)
    rm = body_rho2(p, X, Y, Z, shrink_lat=p.f_lat, shrink_ant=p.f_ant, shrink_post=p.f_post)
    rm += 0.05 * pert_in
    rm = rm <= 1
    rm &= cls == 2
    cls += rm  # 3: muscle wall
    rc = cavity_rho2(p, X, Y, Z)
    rc += 0.03 * pert_in
    del pert_in
    cav = rm & (rc <= 1)
    cls += cav  # 4: abdominal cavity
    zd = z_diaphragm(p, X, Y)  # (X, Y, 1)
    above = Z > zd
    below_dia = Z < zd - 5
    cls += cav & ~below_dia  # 5: diaphragm sheet
    cls += cav & above  # 6: chest cavity (mediastinal fat; lungs come later)
    hu = _LAYER_HU[cls]
    hu += _LAYER_GAIN[cls] * tex
    hu[plate] = table_val[plate][:, None]

    # abdomen: mesenteric fat with bowel loops (wall, fluid content, a little gas)
    bowel_f = field_on(seed, 5, X, Y, Z, 14.0)
    th = F32(p.bowel_th)
    val = np.where(bowel_f > th + 0.25, 22.0 + 6.0 * tex, 45.0 + 4 * tex)
    val = np.where(bowel_f > th, val, -95.0 + 6.0 * tex)
    val[(bowel_f > th + 1.5) & (Y > F32(p.ycc0))] = -900.0
    np.copyto(hu, val, where=cls == 4)
    del val, bowel_f, cls
    body = Body(cavity=cav, above_diaphragm=above, below_diaphragm=below_dia, diaphragm_z=zd,
                muscle_wall=rm, cavity_rho2=rc, texture=tex)
    return hu, body
