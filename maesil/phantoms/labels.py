"""Organ label values of the phantoms' label maps."""

from __future__ import annotations

__all__ = ["AORTA", "BONE", "KIDNEY_LEFT", "KIDNEY_RIGHT", "LIVER", "LUNG", "ORGAN_LABELS", "SPLEEN"]

LIVER, SPLEEN, KIDNEY_LEFT, KIDNEY_RIGHT, AORTA, LUNG, BONE = 1, 2, 3, 4, 5, 6, 7

#: Organ label values of the label maps (``0`` is everything else, including air).
ORGAN_LABELS: dict[int, str] = {
    0: "background",
    LIVER: "liver",
    SPLEEN: "spleen",
    KIDNEY_LEFT: "kidney_left",
    KIDNEY_RIGHT: "kidney_right",
    AORTA: "aorta",
    LUNG: "lung",
    BONE: "bone",
}
