"""One phantom: the structures painted in order onto the voxel grid, then imaged by the scanner."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from maesil.phantoms.anatomy import patient
from maesil.phantoms.body import paint_body
from maesil.phantoms.canvas import Canvas
from maesil.phantoms.grid import Grid, affine, check_shape_spacing
from maesil.phantoms.heart import paint_heart
from maesil.phantoms.kidneys import paint_kidneys
from maesil.phantoms.liver import paint_gall_bladder, paint_liver
from maesil.phantoms.lungs import paint_airway, paint_lungs
from maesil.phantoms.psoas import paint_psoas
from maesil.phantoms.ribs import paint_ribs, paint_sternum
from maesil.phantoms.scanner import scan
from maesil.phantoms.spine import paint_spine
from maesil.phantoms.spleen import paint_spleen
from maesil.phantoms.stomach import paint_stomach
from maesil.phantoms.vessels import paint_vessels

__all__ = ["DEFAULT_SHAPE", "DEFAULT_SPACING", "GENERATOR_VERSION", "PAINTERS", "Phantom", "make_phantom"]

#: Default grid: 384 × 384 × 96 voxels of 0.8 × 0.8 × 2.5 mm ≈ 307 × 307 × 240 mm (thorax-abdomen).
DEFAULT_SHAPE: tuple[int, int, int] = (384, 384, 96)
DEFAULT_SPACING: tuple[float, float, float] = (0.8, 0.8, 2.5)

#: Bumped whenever the generated anatomy changes, so :func:`~maesil.phantoms.write_phantoms`
#: regenerates old files.
GENERATOR_VERSION = 1

#: The structures painted after the body, in order: a later one overwrites an earlier one where they
#: overlap, and the liver and lungs draw their vessel trees from the same random stream.
PAINTERS = (
    paint_psoas,
    paint_liver,
    paint_gall_bladder,
    paint_stomach,
    paint_spleen,
    paint_kidneys,
    paint_heart,
    paint_vessels,
    paint_lungs,
    paint_airway,
    paint_spine,
    paint_ribs,
    paint_sternum,
)


@dataclass(frozen=True, eq=False)
class Phantom:
    """One synthetic CT volume with its organ label map, on a RAS+ voxel grid.

    Attributes:
        image: int16 Hounsfield units, shape (X, Y, Z).
        label: uint8 organ labels (see :data:`~maesil.phantoms.ORGAN_LABELS`), same shape.
        spacing: voxel size in mm along X, Y, Z.
        affine: 4x4 float64 voxel-to-world (RAS+, mm) matrix, diagonal, volume centred on 0.
    """

    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray


def make_phantom(
    seed: int,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
) -> Phantom:
    """Generates one synthetic torso CT phantom, deterministically from ``seed``.

    The anatomy is defined in mm around the volume centre, so ``shape`` and ``spacing`` only
    choose how it is sampled (the default covers ≈ 307 × 307 × 240 mm, lungs at the top, liver,
    spleen and kidneys below).

    Args:
        seed: non-negative integer; the same seed always gives the same arrays.
        shape: voxels along (X, Y, Z), each >= 16.
        spacing: voxel size in mm along (X, Y, Z), each > 0.

    Returns:
        A :class:`Phantom` (int16 HU image, uint8 label map, spacing, RAS+ affine).

    Raises:
        ValueError: on a negative / non-integer seed or an invalid shape / spacing.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    shape, spacing = check_shape_spacing(shape, spacing)
    hu, label = _paint(Grid(shape, spacing), seed)
    image = scan(hu, spacing, np.random.default_rng([seed, 0x2015E]))
    return Phantom(image=image, label=label, spacing=spacing, affine=affine(shape, spacing))


def _paint(grid: Grid, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The float32 HU volume and uint8 label map of the patient of ``seed`` (before imaging).

    Outside the body is air, except the table.
    """
    p = patient(seed)
    hu, body = paint_body(grid, p, seed)
    canvas = Canvas(grid=grid, patient=p, seed=seed, hu=hu, label=np.zeros(grid.shape, np.uint8), body=body,
                    tree_rng=np.random.default_rng([seed, 0x7EE]))
    for paint in PAINTERS:
        paint(canvas)
    return canvas.hu, canvas.label
