"""What a method may know about its data: the one typed view of the DataModule that methods read.

Methods never drive the DataModule and never read its attributes by name; they read
``VolumeDataModule.spec`` (a :class:`DataSpec`), which says what the batches hold (the ``task``) and how
the volumes were preprocessed. Data flows one way: the DataModule publishes this, methods consume it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DataSpec"]


@dataclass(frozen=True)
class DataSpec:
    """The data settings a method depends on.

    Attributes:
        task: what a batch holds (``"reconstruct"``, ``"segment"``, ``"two_view"``; see
            :mod:`maesil.data.tasks`).
        modality: ``"ct"`` (windowed to [0, 1]) or ``"mri"`` (z-normalised).
        superpatch_size: the training/validation superpatch in voxels (X, Y, Z).
        target_spacing: voxel size in mm after resampling, or None (native spacing).
        hu_window: the CT window mapped to [0, 1], or None (MRI).
        num_classes: label values are in ``0..num_classes-1``; None when not declared.
        batch_size: training superpatches per batch and device.
    """

    task: str
    modality: str
    superpatch_size: tuple[int, int, int]
    target_spacing: float | tuple[float, float, float] | None
    hu_window: tuple[float, float] | None
    num_classes: int | None
    batch_size: int
