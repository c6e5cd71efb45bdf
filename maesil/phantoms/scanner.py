"""Image formation: the scanner's in-plane blur and correlated noise, then int16 HU."""

from __future__ import annotations

import math

import numpy as np
from numpy import float32 as F32

__all__ = ["NOISE_STD", "PSF_SIGMA_MM", "scan"]

NOISE_STD = 14.0  # HU, after the PSF blur
PSF_SIGMA_MM = 0.55  # in-plane blur of the scanner


def _blur3(a: np.ndarray, axis: int, w: float) -> np.ndarray:
    """Convolution with [w, 1 - 2w, w] along ``axis`` (edges replicated): a cheap small PSF."""
    out = a * F32(1 - 2 * w)
    lo = [slice(None)] * 3
    hi = [slice(None)] * 3
    lo[axis], hi[axis] = slice(0, -1), slice(1, None)
    lo, hi = tuple(lo), tuple(hi)
    out[hi] += F32(w) * a[lo]
    out[lo] += F32(w) * a[hi]
    edge0 = [slice(None)] * 3
    edge1 = [slice(None)] * 3
    edge0[axis], edge1[axis] = slice(0, 1), slice(-1, None)
    out[tuple(edge0)] += F32(w) * a[tuple(edge0)]
    out[tuple(edge1)] += F32(w) * a[tuple(edge1)]
    return out


def scan(hu: np.ndarray, spacing: tuple[float, float, float], rng: np.random.Generator) -> np.ndarray:
    """The int16 CT image of the painted float32 HU volume ``hu`` (modified in place).

    Adds noise of :data:`NOISE_STD` HU (after the blur), blurs in-plane with the scanner PSF,
    clips to [-1024, 3071] and rounds.
    """
    # Uniform random bytes are ~10x cheaper than Gaussian draws; the sum of two (triangular) turns
    # Gaussian enough after the in-plane blur that mixes 9 of them.
    noise = rng.integers(0, 256, size=(2, *hu.shape), dtype=np.uint8)
    noisy = noise[0].astype(np.int16)
    noisy += noise[1]
    del noise
    weights = []
    for s in spacing[:2]:  # 3-tap binomial-like kernel [w, 1-2w, w]: sigma = sqrt(2w) voxels
        sv = PSF_SIGMA_MM / s
        weights.append(min(0.25, 0.5 * sv * sv) if sv >= 0.3 else 0.0)
    gain = math.prod(math.sqrt(2 * w * w + (1 - 2 * w) ** 2) for w in weights)
    scale = F32(NOISE_STD / (gain * math.sqrt(2 * (256**2 - 1) / 12.0)))
    hu += (noisy - np.int16(255)).astype(F32) * scale
    del noisy
    for axis, w in enumerate(weights):
        if w:
            hu = _blur3(hu, axis, w)
    np.clip(hu, -1024, 3071, out=hu)
    np.rint(hu, out=hu)
    return hu.astype(np.int16)
