"""What the painters share: the volume being painted, the patient, and the masks of the body."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from maesil.phantoms.anatomy import Patient
from maesil.phantoms.grid import Grid

__all__ = ["Body", "Canvas"]


@dataclass(eq=False)
class Body:
    """Masks of the body layers (full-grid arrays) that organs are confined to.

    Attributes:
        cavity: inside the muscle wall (abdominal and chest cavities).
        above_diaphragm: above the diaphragm surface (chest).
        below_diaphragm: more than 5 mm below it (abdomen).
        diaphragm_z: height of the diaphragm (mm) per (x, y) column, shape (X, Y, 1).
        muscle_wall: inside the muscle wall's outer surface (muscle wall and cavities).
        cavity_rho2: perturbed squared normalised radius of the cavity wall (<= 1 inside).
        texture: the shared soft-tissue texture field (≈ unit std).
    """

    cavity: np.ndarray
    above_diaphragm: np.ndarray
    below_diaphragm: np.ndarray
    diaphragm_z: np.ndarray
    muscle_wall: np.ndarray
    cavity_rho2: np.ndarray
    texture: np.ndarray


@dataclass(eq=False)
class Canvas:
    """The float32 HU volume and uint8 label map being painted, on ``grid``, for ``patient``.

    ``tree_rng`` draws the vessel trees; painters that use it must run in a fixed order.
    """

    grid: Grid
    patient: Patient
    seed: int
    hu: np.ndarray
    label: np.ndarray
    body: Body
    tree_rng: np.random.Generator

    @property
    def soft_edge(self) -> float:
        """Antialiasing width (mm) of rasterised capsules: at least 0.8 mm, else the finest spacing."""
        return max(0.8, min(self.grid.spacing))
