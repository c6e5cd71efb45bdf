"""The lungs with their vessel trees, wrapped around the mediastinum, and the airway (trachea and
main bronchi)."""

from __future__ import annotations

import numpy as np

from maesil.phantoms.anatomy import cavity_params, cavity_rho2, rho2, spine_x, spine_y, vb_radii, z_diaphragm
from maesil.phantoms.canvas import Canvas
from maesil.phantoms.fields import field_on
from maesil.phantoms.heart import heart_rho2
from maesil.phantoms.labels import LUNG
from maesil.phantoms.trees import grow_tree, raster_capsules, sample_points
from maesil.phantoms.vessels import aorta_center, ascending_aorta

__all__ = ["mediastinum", "paint_airway", "paint_lungs"]


def mediastinum(p, x, y, z, with_heart=True):
    """Soft-tissue core of the chest that the lungs wrap around (heart, vessels, spine, airway)."""
    xv, yv = spine_x(p, z), spine_y(p, z)
    rx, ry = vb_radii(p, z)
    _, ycc, bc = cavity_params(p, z)
    t = np.clip((y - yv) / (ycc + bc - yv), 0, 1)
    hw = 10 + 14 * t
    med = np.abs(x - (xv - 4)) < hw
    med = med | (rho2(x - xv, y - yv, rx + 8, ry + 14) < 1)
    ax, ay, ar = aorta_center(p, z)
    med = med | (rho2(x - ax, y - ay, ar + 5, ar + 5) < 1)
    if with_heart:
        med = med | (heart_rho2(p, x, y, z) < 1.12**2)
    sx, sy, sz, sr = ascending_aorta(p)
    med = med | ((rho2(x - sx, y - sy, sr + 12, sr + 12) < 1) & (z > sz - 10))
    return med


def _inside_lung(p, x, y, z):
    """Lungs: chest cavity above the diaphragm minus the mediastinum (unperturbed geometry)."""
    inside = (cavity_rho2(p, x, y, z) < 0.97) & (z > z_diaphragm(p, x, y) + 1)
    return inside & ~mediastinum(p, x, y, z)


def paint_lungs(c: Canvas) -> None:
    """Parenchyma (denser posteriorly) with two vessel trees per lung from the hila (draws from
    ``c.tree_rng``); the vessels continue into the mediastinal fat."""
    p, grid, seed, hu, lab = c.patient, c.grid, c.seed, c.hu, c.label
    cav, above, rc = c.body.cavity, c.body.above_diaphragm, c.body.cavity_rho2
    z_lung_lo = p.z_dl - 1.3 * p.dome_c - 5
    bx = grid.box((-1e9, -1e9, z_lung_lo), (1e9, 1e9, 1e9))
    if bx is None:
        return
    s_, x3, y3, z3 = bx
    lung = mediastinum(p, x3, y3, z3, with_heart=False)
    hb = grid.around(p.h_c, (1.15 * max(p.h_ax),) * 3)
    if hb is not None:
        inter = [slice(max(h.start, o.start), min(h.stop, o.stop)) for h, o in zip(hb[0], s_)]
        if all(i.stop > i.start for i in inter):
            hx, hy, hz = (grid.axes[i][inter[i]] for i in range(3))
            local = tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(inter, s_))
            lung[local] |= heart_rho2(p, hx[:, None, None], hy[None, :, None], hz[None, None, :]) < 1.12**2
    np.logical_not(lung, out=lung)
    lung &= cav[s_]
    lung &= above[s_]
    lung &= rc[s_] < 0.97
    sub = grid.sub(s_)
    vfrac = np.zeros(sub.shape, np.float32)
    inside = lambda a, b, c_: _inside_lung(p, a, b, c_)  # noqa: E731
    for side in (1, -1):
        lo = (0.0 if side > 0 else -p.a_c0 * 1.1, p.ycc0 - 1.2 * p.bc0, z_lung_lo)
        hi = (p.a_c0 * 1.1 if side > 0 else 0.0, p.ycc0 + 1.2 * p.bc0, p.z_dr + 150)
        pts = sample_points(c.tree_rng, inside, lo, hi, 4096)
        if len(pts) < 16:
            continue
        hil_x = p.xv0 + side * 38
        roots = ((hil_x, p.tr[1] - 4, p.z_car - 22, 6.5), (hil_x + side * 2, p.tr[1] + 10, p.z_car - 45, 6.0))
        half = len(pts) // 2
        for (rx_, ry_, rz_, r0), part in zip(roots, (pts[:half], pts[half:])):
            sa, sb, sr = grow_tree(c.tree_rng, (rx_, ry_, rz_), part, r0 * 1.1, 9, r_min=0.6, exponent=3.3)
            raster_capsules(sub, vfrac, sa, sb, sr, soft=c.soft_edge)
    # parenchyma: denser in the dependent (posterior) part, fine texture
    idx = np.nonzero(lung)
    tex = field_on(seed, 60, x3, y3, z3, 4.0)[idx]
    _, ycc, bc = cavity_params(p, z3.ravel()[idx[2]])
    dep = np.clip((ycc - y3.ravel()[idx[1]]) / bc, -1, 1)  # +1 posterior ... -1 anterior
    val = -850.0 + 25.0 * dep + 12.0 * tex
    f = vfrac[idx]
    hv = hu[s_]
    hv[idx] = val + f * (40.0 - val)
    lab[s_][idx] = LUNG
    del idx, tex, dep, val, f
    # vessels continue into the mediastinal fat towards the hila
    vi = np.unravel_index(np.flatnonzero(vfrac), vfrac.shape)
    f = vfrac[vi]
    cur = hv[vi]
    ok = ~lung[vi] & cav[s_][vi] & above[s_][vi] & (cur < -50)
    hv[tuple(i[ok] for i in vi)] = (cur + f * (40.0 - cur))[ok]


def paint_airway(c: Canvas) -> None:
    """Trachea and main bronchi: air inside a thin soft-tissue wall, down to the carina."""
    p, grid, hu = c.patient, c.grid, c.hu
    z_car = p.z_car
    bx = grid.box((p.tr[0] - 60, p.tr[1] - 40, z_car - 40), (p.tr[0] + 60, p.tr[1] + 20, 1e9))
    if bx is None:
        return
    s_, x3, y3, z3 = bx
    cov_o = np.zeros(np.broadcast_shapes(x3.shape, y3.shape, z3.shape), np.float32)
    cov_i = np.zeros_like(cov_o)
    sub = grid.sub(s_)
    top = np.array([p.tr[0], p.tr[1], 1e3])
    car = np.array([p.tr[0], p.tr[1], z_car])
    ends = [np.array([p.tr[0] + s * 36, p.tr[1] - 6, z_car - 26]) for s in (1, -1)]
    a = np.stack([car, car, car])
    b = np.stack([top, *ends])
    raster_capsules(sub, cov_o, a, b, np.array([11.0, 8.0, 7.5]), soft=c.soft_edge)
    raster_capsules(sub, cov_i, a, b, np.array([9.0, 6.2, 5.8]), soft=c.soft_edge)
    v = hu[s_]
    wall = (cov_o > 0.5) & (cov_i <= 0.5)
    v[wall] = 55.0
    v[cov_i > 0.5] = -1000.0
    c.label[s_][(cov_o > 0.5)] = 0
