"""Deterministic synthetic torso CT phantoms: the built-in data of the demo and of the tests.

No CT data set can be downloaded here, so :func:`make_phantom` draws a plausible thorax-abdomen
CT from a seed: an elliptical body with skin, subcutaneous fat and a muscle wall, lungs with
branching vessel trees above a two-domed diaphragm, heart and mediastinum, liver (with portal
vessels), spleen, stomach, gall bladder, two kidneys (cortex, medulla, sinus fat), a
contrast-enhanced aorta, inferior vena cava, vertebrae (cortical shell, cancellous core, discs,
posterior elements), ribs, sternum, a table, smooth organ textures and correlated noise.

All anatomy is defined in millimetres around the centre of the volume, so another ``shape`` or
``spacing`` samples the same patient (only the voxel grid, the fine textures and the noise
differ). Arrays are in (X, Y, Z) = (left→right, posterior→anterior, inferior→superior) voxel
order, i.e. RAS+ as read by NIfTI / TorchIO; ``x > 0`` is the patient's right (liver side).
:func:`write_phantoms` stores image (int16 HU) and organ labels (uint8) as NIfTI.

Modules: :mod:`~maesil.phantoms.anatomy` (the patient's parameters and trunk geometry),
one painter module per structure (``body``, ``psoas``, ``liver``, ``stomach``, ``spleen``,
``kidneys``, ``heart``, ``vessels``, ``lungs``, ``spine``, ``ribs``), :mod:`~maesil.phantoms.phantom`
(the order they paint in), :mod:`~maesil.phantoms.fields` (textures), :mod:`~maesil.phantoms.trees`
(vessel trees), :mod:`~maesil.phantoms.scanner` (blur and noise) and :mod:`~maesil.phantoms.writer`.
"""

from maesil.phantoms.labels import ORGAN_LABELS
from maesil.phantoms.phantom import DEFAULT_SHAPE, DEFAULT_SPACING, GENERATOR_VERSION, Phantom, make_phantom
from maesil.phantoms.writer import default_workers, write_phantoms

__all__ = [
    "DEFAULT_SHAPE",
    "DEFAULT_SPACING",
    "GENERATOR_VERSION",
    "ORGAN_LABELS",
    "Phantom",
    "default_workers",
    "make_phantom",
    "write_phantoms",
]
