"""The liver with its portal vessel tree, and the gall bladder below it."""

from __future__ import annotations

import numpy as np

from maesil.phantoms.anatomy import cavity_rho2, rot_ellipsoid_rho2, z_diaphragm
from maesil.phantoms.canvas import Canvas
from maesil.phantoms.fields import field_on
from maesil.phantoms.labels import LIVER
from maesil.phantoms.trees import grow_tree, raster_capsules, sample_points

__all__ = ["liver_rho2", "paint_gall_bladder", "paint_liver"]


def liver_rho2(p, x, y, z):
    """Squared normalised radius of the liver: a large right lobe and a smaller left lobe."""
    s = p.liver_s
    right = rot_ellipsoid_rho2(
        x, y, z,
        (0.42 * p.a_c0 + p.liver_dx, p.ycc0 - 0.02 * p.bc0, p.z_dr - 58 + p.liver_dz),
        (0.64 * p.a_c0 * s, 1.0 * p.bc0 * s, 78 * s),
    )[0]
    left = rot_ellipsoid_rho2(
        x, y, z,
        (-0.08 * p.a_c0 + p.liver_dx, p.ycc0 + 0.48 * p.bc0, p.z_dr - 34 + p.liver_dz),
        (0.42 * p.a_c0 * s, 0.42 * p.bc0 * s, 42 * s),
        rot_z_deg=-15,
    )[0]
    return np.minimum(right, left)


def _inside_liver(p, x, y, z):
    """The liver without perturbation, inside the cavity and under the diaphragm."""
    return (liver_rho2(p, x, y, z) < 1) & (cavity_rho2(p, x, y, z) < 0.96) & (z < z_diaphragm(p, x, y) - 5)


def paint_liver(c: Canvas) -> None:
    """Textured parenchyma with contrast-enhanced portal vessels (draws from ``c.tree_rng``)."""
    p, grid, seed = c.patient, c.grid, c.seed
    bx = grid.box((-0.6 * p.a_c0, p.ycc0 - 1.2 * p.bc0, p.z_dr - 150), (1.2 * p.a_c0, p.ycc0 + 1.2 * p.bc0, p.z_dr + 5))
    if bx is None:
        return
    s_, x3, y3, z3 = bx
    lr = liver_rho2(p, x3, y3, z3) + 0.05 * field_on(seed, 10, x3, y3, z3, 30.0)
    m = (lr < 1) & c.body.cavity[s_] & c.body.below_diaphragm[s_]
    del lr
    tex = 5.0 * field_on(seed, 11, x3, y3, z3, 7.0) + 2.5 * field_on(seed, 12, x3, y3, z3, 2.5)
    vfrac = np.zeros(m.shape, np.float32)
    inside = lambda a, b, c_: _inside_liver(p, a, b, c_)  # noqa: E731
    pts = sample_points(c.tree_rng, inside, (-0.5 * p.a_c0, p.ycc0 - p.bc0, p.z_dr - 140),
                        (p.a_c0, p.ycc0 + p.bc0, p.z_dr), 256)
    if len(pts) >= 8:
        root = (0.2 * p.a_c0, p.ycc0 + 0.05 * p.bc0, p.z_dr - 70)
        sa, sb, sr = grow_tree(c.tree_rng, root, pts, 6.0, 5, r_min=1.0)
        raster_capsules(grid.sub(s_), vfrac, sa, sb, sr, soft=c.soft_edge)
    val = 58.0 + tex
    val = val + vfrac * (150.0 - val)
    c.hu[s_][m] = val[m]
    c.label[s_][m] = LIVER


def paint_gall_bladder(c: Canvas) -> None:
    """A fluid-filled ellipsoid with a wall, under the liver (absent in some patients)."""
    p = c.patient
    if not p.gb:
        return
    centre = (0.28 * p.a_c0, p.ycc0 + 0.55 * p.bc0, p.z_dr - 95 + p.liver_dz)
    bx = c.grid.around(centre, (20, 20, 35))
    if bx is None:
        return
    s_, x3, y3, z3 = bx
    r2 = rot_ellipsoid_rho2(x3, y3, z3, centre, (14, 13, 30), 30, 20)[0]
    m = (r2 < 1) & c.body.cavity[s_]
    c.hu[s_][m & (r2 > 0.8)] = 40.0
    c.hu[s_][m & (r2 <= 0.8)] = 8.0
    c.label[s_][m] = 0
