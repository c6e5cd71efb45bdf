"""Vessel trees: growing branching trees in mm and rasterising their segments as soft capsules."""

from __future__ import annotations

import numpy as np
from numpy import float32 as F32

from maesil.phantoms.grid import Grid

__all__ = ["grow_tree", "raster_capsules", "sample_points"]


def grow_tree(rng, root, points, r_root, max_depth, r_min=0.7, exponent=2.7):
    """Space-filling branching tree, built level by level (vectorised over all branches).

    Each branch heads for the centroid of its share of ``points`` (partway, except at the
    root), then the share is split across its principal axis between two children; radii
    shrink with the share (Murray-like law). Returns segment starts, ends and radii (mm).
    """
    pts = np.asarray(points, np.float64)
    n_all = len(pts)
    node = np.zeros(n_all, np.int64)
    start = np.asarray(root, np.float64)[None, :]
    out_a, out_b, out_r = [], [], []
    for depth in range(max_depth + 1):
        n_nodes = len(start)
        cnt = np.bincount(node, minlength=n_nodes).astype(np.float64)
        safe = np.maximum(cnt, 1)[:, None]
        cen = np.stack([np.bincount(node, weights=pts[:, k], minlength=n_nodes) for k in range(3)], 1) / safe
        radius = np.maximum(r_min, r_root * (cnt / n_all) ** (1 / exponent))
        terminal = (cnt < 4) | (depth == max_depth)
        frac = np.ones(n_nodes) if depth == 0 else rng.uniform(0.45, 0.8, n_nodes)
        end = start + frac[:, None] * (cen - start) + rng.normal(0, 1.0, (n_nodes, 3))
        end[terminal] = cen[terminal] + rng.normal(0, 2.0, (int(terminal.sum()), 3))
        alive = cnt > 0
        out_a.append(start[alive]), out_b.append(end[alive]), out_r.append(radius[alive])
        if depth == max_depth:
            break
        keep = ~terminal[node]
        pts, node = pts[keep], node[keep]
        if len(pts) == 0:
            break
        d = pts - cen[node]
        cov = np.empty((n_nodes, 3, 3))
        for i in range(3):
            for j in range(i, 3):
                cov[:, i, j] = cov[:, j, i] = np.bincount(node, weights=d[:, i] * d[:, j], minlength=n_nodes)
        cov += np.eye(3) * 1e-6
        axis = np.linalg.eigh(cov)[1][:, :, -1]
        proj = (d * axis[node]).sum(1)
        order = np.lexsort((proj, node))
        sorted_node = node[order]
        first = np.searchsorted(sorted_node, np.arange(n_nodes))
        rank = np.empty(len(order), np.int64)
        rank[order] = np.arange(len(order)) - first[sorted_node]
        q = rng.uniform(0.35, 0.65, n_nodes)
        node = 2 * node + (rank >= np.floor(q[node] * cnt[node])).astype(np.int64)
        start = np.repeat(end, 2, axis=0)
    return np.concatenate(out_a), np.concatenate(out_b), np.concatenate(out_r)


def sample_points(rng, inside_fn, lo, hi, n):
    """``n`` points drawn uniformly from the region where ``inside_fn`` is true inside [lo, hi]."""
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    got = []
    total = 0
    for _ in range(20):
        cand = rng.uniform(lo, hi, size=(max(4 * n, 2000), 3)).astype(F32)
        keep = cand[inside_fn(cand[:, 0], cand[:, 1], cand[:, 2])]
        got.append(keep)
        total += len(keep)
        if total >= n:
            break
    pts = np.concatenate(got)[:n]
    return pts.astype(np.float64)


def raster_capsules(grid: Grid, out: np.ndarray, a: np.ndarray, b: np.ndarray, r: np.ndarray, soft: float) -> None:
    """Coverage (0..1, antialiased over ``soft`` mm) of capsules a→b of radius r, max-merged into ``out``.

    Segments are cut into short pieces; every piece gets its own tight voxel box, and all boxes
    are enumerated at once as one ragged list of voxels (vectorised: no Python loop per piece).
    """
    if len(a) == 0:
        return
    seg = b - a
    length = np.linalg.norm(seg, axis=1)
    n_piece = np.maximum(1, np.ceil(length / np.maximum(3.0, 1.5 * r))).astype(np.int64)
    idx = np.repeat(np.arange(len(a)), n_piece)
    k = np.arange(len(idx)) - np.repeat(np.cumsum(n_piece) - n_piece, n_piece)
    t0 = (k / n_piece[idx])[:, None]
    t1 = ((k + 1) / n_piece[idx])[:, None]
    pa = a[idx] + t0 * seg[idx]
    pd = (t1 - t0) * seg[idx]
    pr = r[idx]
    spacing = np.asarray(grid.spacing)
    origin = np.asarray(grid.origin)
    shape = np.asarray(grid.shape)
    ext = (pr + soft)[:, None]
    i0 = np.clip(np.ceil((np.minimum(pa, pa + pd) - ext - origin) / spacing), 0, shape).astype(np.int64)
    i1 = np.clip(np.floor((np.maximum(pa, pa + pd) + ext - origin) / spacing) + 1, 0, shape).astype(np.int64)
    dims = np.maximum(i1 - i0, 0)
    cnt = dims.prod(axis=1)
    keep = cnt > 0
    pa, pd, pr, i0, dims, cnt = pa[keep], pd[keep], pr[keep], i0[keep], dims[keep], cnt[keep]
    if len(cnt) == 0:
        return
    csum = np.cumsum(cnt)
    flat_out = out.reshape(-1)
    sp32 = spacing.astype(F32)
    or32 = origin.astype(F32)
    budget = 1_500_000
    first = 0
    while first < len(cnt):
        base = csum[first] - cnt[first]
        last = max(first + 1, int(np.searchsorted(csum, base + budget, side="right")))
        sl = slice(first, last)
        c = cnt[sl]
        pid = np.repeat(np.arange(last - first), c)
        local = np.arange(int(c.sum())) - np.repeat(np.cumsum(c) - c, c)
        d = dims[sl][pid]
        iz = local % d[:, 2]
        rest = local // d[:, 2]
        iy = rest % d[:, 1]
        ix = rest // d[:, 1]
        vox = i0[sl][pid] + np.stack([ix, iy, iz], axis=1)
        w = vox.astype(F32) * sp32 + or32 - pa[sl].astype(F32)[pid]
        dv = pd[sl].astype(F32)[pid]
        dd = np.maximum((dv * dv).sum(1), F32(1e-6))
        t = np.clip((w * dv).sum(1) / dd, 0, 1)
        w -= t[:, None] * dv
        dist = np.sqrt((w * w).sum(1))
        cov = np.clip((pr[sl].astype(F32)[pid] - dist) / F32(soft) + F32(0.5), 0, 1)
        m = cov > 0
        flat = (vox[m, 0] * shape[1] + vox[m, 1]) * shape[2] + vox[m, 2]
        np.maximum.at(flat_out, flat, cov[m])
        first = last
