"""Deterministic per-volume preprocessing, shared by training, validation and (later) caching.

The pipeline built by :func:`build_preprocessing` is, in order:

1. :class:`LoadVolume` - read the files (errors become :class:`~maesil.data.records.DataError`
   naming the file), make intensity images float32, reject NaN/Inf voxels, and give label maps
   the exact affine of the image (``check_headers`` already verified they agree within tolerance;
   TorchIO's samplers require identical affines).
2. ``tio.ToCanonical`` - RAS+ orientation, so tensors are (C, X, Y, Z) with Z axial whatever
   the scanner wrote. Models may then assume a fixed axis meaning.
3. ``tio.Resample(target_spacing)`` - a common voxel size, so a patch covers the same physical
   extent in every volume. Label maps use nearest-neighbour interpolation (TorchIO does that
   for every ``LabelMap`` automatically), images linear.
4. Intensity: CT -> :class:`HUWindow` (clip to [-175, 250] HU then map linearly to [0, 1]);
   MRI -> ``tio.ZNormalization`` (zero mean, unit std over the foreground).
5. :class:`CropForeground` - crop to the bounding box of the body (plus a small margin), so
   superpatches are not wasted on the air around the patient (optional, on by default).
6. :class:`PadToMinShape` - pad (never crop) so that every axis is at least ``min_shape``, which
   the patch samplers require. Padding value: 0 for CT (= air after windowing, i.e. below
   -175 HU) and the volume minimum for MRI (the background after z-normalisation).

Each step is a named class or function so a later "prepare cache" command can run the same
steps offline (e.g. :func:`preprocessing_steps`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torchio as tio

from maesil.data.records import DataError
from maesil.shapes import as_triple

#: HU window of the MAESIL paper: soft-tissue abdominal window. Air, lung and dense bone
#: saturate; the contrast budget goes to organs, which is what the reconstruction targets.
MAESIL_HU_WINDOW: tuple[float, float] = (-175.0, 250.0)

Modality = Literal["ct", "mri"]


def _image_path(image: tio.Image) -> str:
    path = image.path
    if isinstance(path, (list, tuple)):
        return ", ".join(str(p) for p in path)
    return str(path) if path is not None else "<in-memory image>"


class LoadVolume(tio.Transform):
    """Load all images of a subject and check them; first step of the pipeline.

    * read errors (corrupt data that passed the header check) raise ``DataError`` naming the file;
    * intensity images become float32;
    * a NaN or Inf voxel in an intensity image raises ``DataError`` naming the file (a single NaN
      would poison the loss silently, and TorchIO transforms run with numpy errors raising).
      (NIfTI files must be read with :func:`maesil.data.io.read_volume`: ITK's NIfTI reader,
      TorchIO's default, replaces NaN/Inf by 0 and the check could not see them);
    * every other image (label maps) gets the affine of ``reference`` so that floating-point
      header noise cannot make TorchIO's consistency checks fail later.

    Args:
        reference: name of the intensity image in the subject.
    """

    def __init__(self, reference: str = "image", **kwargs) -> None:
        kwargs.setdefault("copy", False)
        super().__init__(**kwargs)
        self.reference = reference
        self.args_names = ["reference"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        for image in subject.get_images(intensity_only=False):
            try:
                image.load()
            except DataError:
                raise
            except Exception as error:  # noqa: BLE001 - readers raise anything
                raise DataError(
                    f"{_image_path(image)}: cannot be loaded ({type(error).__name__}: {error})"
                ) from error
            if isinstance(image, tio.ScalarImage) or image.type == tio.INTENSITY:
                data = image.data
                if not torch.is_floating_point(data) or data.dtype != torch.float32:
                    data = data.to(torch.float32)
                    image.set_data(data)
                finite = torch.isfinite(data)
                if not bool(finite.all()):
                    n_nan = int(torch.isnan(data).sum())
                    n_inf = int(torch.isinf(data).sum())
                    raise DataError(
                        f"{_image_path(image)}: contains {n_nan} NaN and {n_inf} Inf voxel(s);"
                        " fix or exclude this file"
                    )
        if self.reference in subject:
            reference = subject[self.reference]
            for image in subject.get_images(intensity_only=False):
                if image is not reference:
                    image.affine = reference.affine.copy()
        return subject


class HUWindow(tio.IntensityTransform):
    """Clip CT intensities to a Hounsfield window and map it linearly onto [0, 1].

    ``low`` maps to exactly 0 and ``high`` to exactly 1; values outside are clipped first
    (``tio.RescaleIntensity(in_min_max=...)`` does *not* clip, and computes percentiles over
    the whole volume, which is slow on large CT). The MAESIL paper uses [-175, 250] HU.

    Args:
        window: ``(low, high)`` in HU.
    """

    def __init__(self, window: tuple[float, float] = MAESIL_HU_WINDOW, **kwargs) -> None:
        kwargs.setdefault("copy", False)
        super().__init__(**kwargs)
        low, high = (float(v) for v in window)
        if not high > low:
            raise ValueError(f"hu_window must be (low, high) with high > low, got {window!r}")
        self.window = (low, high)
        self.args_names = ["window"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        low, high = self.window
        for image in self.get_images(subject):
            data = image.data.to(torch.float32).clamp(low, high)
            image.set_data((data - low) / (high - low))
        return subject


def foreground_mask(tensor: torch.Tensor) -> torch.Tensor:
    """Voxels brighter than the volume mean: a cheap MRI head/body mask (air is dark)."""
    return tensor > tensor.float().mean()


class CropForeground(tio.Transform):
    """Crop image and labels to the bounding box of the body plus a margin.

    CT volumes are mostly air around the patient; after :class:`HUWindow` air is exactly 0, so the
    body (and the table) is every voxel above 0. For MRI the foreground is :func:`foreground_mask`.
    Without this crop most uniformly sampled superpatches would be empty air, which wastes compute
    and makes reconstruction metrics reward predicting zeros. A volume with no foreground voxel is
    left as it is.

    Args:
        margin: voxels kept around the bounding box on every side.
        modality: ``"ct"`` (foreground > 0 after windowing) or ``"mri"``.
        reference: name of the intensity image that defines the foreground.
    """

    def __init__(self, margin: int = 4, modality: Modality = "ct", reference: str = "image", **kwargs) -> None:
        kwargs.setdefault("copy", False)
        super().__init__(**kwargs)
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.margin = int(margin)
        self.modality = modality
        self.reference = reference
        self.args_names = ["margin", "modality", "reference"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        data = subject[self.reference].data[0]
        foreground = data > 0 if self.modality == "ct" else foreground_mask(data)
        if not foreground.any():
            return subject
        cropping = []
        for axis in range(3):
            other = tuple(a for a in range(3) if a != axis)
            present = foreground.any(dim=other).nonzero().flatten()
            first = max(0, int(present[0]) - self.margin)
            last = min(data.shape[axis], int(present[-1]) + 1 + self.margin)
            cropping += [first, data.shape[axis] - last]
        if not any(cropping):
            return subject
        return tio.Crop(tuple(cropping), copy=False)(subject)


class PadToMinShape(tio.Transform):
    """Pad (never crop) every axis shorter than ``min_shape``, centred, to exactly ``min_shape``.

    Args:
        min_shape: minimum (X, Y, Z) size in voxels.
        padding_mode: a number, or ``"minimum"`` for the volume minimum (see ``tio.Pad``).
            Label maps are padded with 0 (background) for numeric modes, or their own minimum.
    """

    def __init__(self, min_shape: int | Sequence[int], padding_mode: float | str = 0.0, **kwargs) -> None:
        kwargs.setdefault("copy", False)
        super().__init__(**kwargs)
        self.min_shape = as_triple(min_shape, "min_shape")
        self.padding_mode = padding_mode
        self.args_names = ["min_shape", "padding_mode"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        shape = subject.spatial_shape
        padding = []
        for size, minimum in zip(shape, self.min_shape):
            missing = max(0, minimum - size)
            padding += [missing // 2, missing - missing // 2]
        if not any(padding):
            return subject
        images = subject.get_images_dict(intensity_only=False)
        labels = [name for name, im in images.items() if im.type == tio.LABEL]
        intensity = [name for name in images if name not in labels]
        if intensity:
            subject = tio.Pad(tuple(padding), padding_mode=self.padding_mode, include=intensity, copy=False)(subject)
        if labels:
            label_mode = 0 if not isinstance(self.padding_mode, str) else self.padding_mode
            subject = tio.Pad(tuple(padding), padding_mode=label_mode, include=labels, copy=False)(subject)
        return subject


def ct_intensity(hu_window: tuple[float, float] = MAESIL_HU_WINDOW) -> tio.Transform:
    """CT intensity step: :class:`HUWindow`."""
    return HUWindow(hu_window)


def mri_intensity(mask_background: bool = True) -> tio.Transform:
    """MRI intensity step: z-normalisation, statistics over :func:`foreground_mask` voxels
    (so the amount of air around the body does not change the scaling) or all voxels."""
    return tio.ZNormalization(masking_method=foreground_mask if mask_background else None, copy=False)


def padding_value(modality: Modality) -> float | str:
    """Value used to pad a preprocessed volume: 0 for CT (air after windowing), the volume
    minimum for MRI (the background after z-normalisation)."""
    return 0.0 if modality == "ct" else "minimum"


def preprocessing_steps(
    modality: Modality = "ct",
    target_spacing: float | tuple[float, float, float] | None = 1.5,
    hu_window: tuple[float, float] | None = MAESIL_HU_WINDOW,
    min_shape: int | tuple[int, int, int] | None = None,
    mri_mask_background: bool = True,
    reference: str = "image",
    crop_foreground: bool = True,
) -> list[tio.Transform]:
    """The steps of :func:`build_preprocessing` as a list (see the module docstring); ``hu_window`` is
    used for CT only (``None`` is allowed for MRI)."""
    if modality not in ("ct", "mri"):
        raise ValueError(f"modality must be 'ct' or 'mri', got {modality!r}")
    steps: list[tio.Transform] = [LoadVolume(reference), tio.ToCanonical(copy=False)]
    if target_spacing is not None:
        spacing = as_triple(target_spacing, "target_spacing", kind=float)
        steps.append(tio.Resample(spacing, copy=False))
    steps.append(ct_intensity(hu_window) if modality == "ct" else mri_intensity(mri_mask_background))
    if crop_foreground:
        steps.append(CropForeground(modality=modality, reference=reference))
    if min_shape is not None:
        steps.append(PadToMinShape(min_shape, padding_value(modality)))
    return steps


def build_preprocessing(
    modality: Modality = "ct",
    target_spacing: float | tuple[float, float, float] | None = 1.5,
    hu_window: tuple[float, float] = MAESIL_HU_WINDOW,
    min_shape: tuple[int, int, int] | None = None,
    mri_mask_background: bool = True,
    crop_foreground: bool = True,
) -> tio.Compose:
    """Build the deterministic preprocessing applied to every subject (see module docstring).

    Args:
        modality: ``"ct"`` (HU windowing to [0, 1]) or ``"mri"`` (z-normalisation).
        target_spacing: output voxel size in mm (one number = isotropic); ``None`` keeps the
            native spacing.
        hu_window: CT window in HU mapped to [0, 1]; default [-175, 250] from the MAESIL paper.
        min_shape: pad every axis to at least this many voxels (0 for CT, volume minimum for
            MRI); ``None`` = no padding. Use the patch size, since samplers need volume >= patch.
        mri_mask_background: MRI only: compute the z-normalisation statistics over voxels above
            the volume mean (foreground) rather than over the whole volume.
        crop_foreground: crop to the body's bounding box (:class:`CropForeground`) before padding.

    Returns:
        a ``tio.Compose`` taking a ``tio.Subject`` whose intensity image is named ``"image"``.
    """
    steps = preprocessing_steps(
        modality, target_spacing, hu_window, min_shape, mri_mask_background, crop_foreground=crop_foreground
    )
    return tio.Compose(steps)


@dataclass(frozen=True)
class PreprocessSettings:
    """The options that decide a preprocessed volume (shared by the DataModule, ``prepare`` and the
    cache index, which stores them so a cache made with other settings is never read by mistake).

    Padding to the superpatch size is not part of it: the cache keeps unpadded volumes and pads
    at read time, so one cache serves every superpatch size.

    ``hu_window`` only decides CT volumes: for MRI (z-normalised, no window) it is normalised to
    ``None``, so that MRI settings, and MRI caches, never differ over a window they do not use. CT
    needs a window: ``None`` is an error there rather than a silent default.
    """

    modality: Modality = "ct"
    target_spacing: tuple[float, float, float] | None = (1.5, 1.5, 1.5)
    hu_window: tuple[float, float] | None = MAESIL_HU_WINDOW
    crop_foreground: bool = True
    mri_mask_background: bool = True

    def __post_init__(self) -> None:
        if self.modality not in ("ct", "mri"):
            raise ValueError(f"modality must be 'ct' or 'mri', got {self.modality!r}")
        if self.target_spacing is not None:
            spacing = as_triple(self.target_spacing, "target_spacing", kind=float)
            object.__setattr__(self, "target_spacing", spacing)
        if self.modality == "mri":
            object.__setattr__(self, "hu_window", None)
        elif self.hu_window is None:
            raise ValueError("hu_window is None, but CT needs a window (HU mapped to [0, 1]), e.g. "
                             f"{list(MAESIL_HU_WINDOW)}; None is only meaningful for modality 'mri'")
        else:
            low, high = (float(v) for v in self.hu_window)
            if not high > low:
                raise ValueError(f"hu_window must be (low, high) with high > low, got {self.hu_window!r}")
            object.__setattr__(self, "hu_window", (low, high))
        object.__setattr__(self, "crop_foreground", bool(self.crop_foreground))
        object.__setattr__(self, "mri_mask_background", bool(self.mri_mask_background))

    def steps(self, min_shape: int | tuple[int, int, int] | None = None) -> list[tio.Transform]:
        """The transforms (:func:`preprocessing_steps`), optionally padded to ``min_shape``."""
        return preprocessing_steps(self.modality, self.target_spacing, self.hu_window, min_shape,
                                   self.mri_mask_background, crop_foreground=self.crop_foreground)

    def transform(self, min_shape: int | tuple[int, int, int] | None = None) -> tio.Compose:
        """:meth:`steps` as one ``tio.Compose``."""
        return tio.Compose(self.steps(min_shape))

    def to_dict(self) -> dict:
        """JSON-ready form (lists, not tuples), as stored in a cache index."""
        return {
            "modality": self.modality,
            "target_spacing": list(self.target_spacing) if self.target_spacing is not None else None,
            "hu_window": list(self.hu_window) if self.hu_window is not None else None,
            "crop_foreground": self.crop_foreground,
            "mri_mask_background": self.mri_mask_background,
        }

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessSettings:
        spacing = data.get("target_spacing")
        return cls(
            modality=data["modality"],
            target_spacing=tuple(spacing) if spacing is not None else None,
            hu_window=tuple(data["hu_window"]) if data.get("hu_window") is not None else None,
            crop_foreground=data["crop_foreground"],
            mri_mask_background=data.get("mri_mask_background", True),
        )
