"""Two augmented views of one superpatch and the spatial prior relating them (PGL, global BYOL).

A view is a crop of the superpatch, resized to ``view_size``, possibly flipped, with an intensity
jitter. The geometry of both crops is returned with the views, so a method can relate locations of
one view to the other (PGL pools both views' features over their common region with RoIAlign3D).

Coordinate convention (RoIAlign3D relies on it):

* a superpatch image is ``(C, X, Y, Z)``;
* a *box* is 6 floats ``(x0, y0, z0, x1, y1, z1)`` in continuous **voxel-edge coordinates of the
  superpatch**: voxel ``i`` covers ``[i, i + 1)``, so the whole superpatch is ``(0, 0, 0, X, Y, Z)``;
* output voxel ``j`` of a view of ``n`` voxels along an axis (before flipping) samples the position
  ``x0 + (j + 0.5) * (x1 - x0) / n``, trilinearly (a voxel centre ``p`` is array index ``p - 0.5``);
* a flip flag reverses the rendered view along that axis.

The task ``"two_view"`` (:class:`TwoViewTask`) adds to each batch ``view1``/``view2`` float32
``(B, 1, *view_size)``, ``box1``/``box2`` float32 ``(B, 6)``, ``flip1``/``flip2`` bool ``(B, 3)`` and
``overlap`` float32 ``(B,)`` (:func:`overlap_fraction` of the two boxes).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torchio as tio

from maesil.data.collate import collate_patches
from maesil.data.tasks import PatchTask, register_task
from maesil.shapes import as_triple

BoxLike = torch.Tensor | Sequence[float]


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass
class ViewSettings:
    """How the two views of a superpatch are drawn (a plain dataclass, usable from YAML).

    Attributes:
        scale: side of each crop as a fraction of the superpatch side, drawn uniformly from
            ``[lo, hi]`` independently per view and per axis (``0 < lo <= hi <= 1``).
        view_size: output size (X, Y, Z) of each view, one int for a cube; ``None`` = the
            superpatch size.
        flip_probability: probability of flipping each view along each axis.
        min_overlap: pairs whose :func:`overlap_fraction` is below this are redrawn.
        max_attempts: redraws before giving up with a ``RuntimeError`` (settings that can hardly be
            met, e.g. small crops with a large ``min_overlap``, never loop forever).
        brightness: ``b`` of the intensity jitter ``x * (1 + U(-c, c)) + U(-b, b)``.
        contrast: ``c`` of the same jitter (``<= 1``, so the factor stays non-negative).
        noise_std: standard deviation of the Gaussian noise added after the jitter.

    The jitter is applied to each rendered view, independently, after resampling.
    """

    scale: tuple[float, float] = (0.6, 1.0)
    view_size: int | tuple[int, int, int] | None = None
    flip_probability: float = 0.5
    min_overlap: float = 0.3
    max_attempts: int = 100
    brightness: float = 0.1
    contrast: float = 0.1
    noise_std: float = 0.01

    def __post_init__(self) -> None:
        try:
            lo, hi = (float(v) for v in self.scale)
        except (TypeError, ValueError):
            raise ValueError(f"scale must be two floats (lo, hi), got {self.scale!r}") from None
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {self.scale!r}")
        self.scale = (lo, hi)
        if self.view_size is not None:
            self.view_size = as_triple(self.view_size, "view_size")
        for name in ("flip_probability", "min_overlap"):
            value = float(getattr(self, name))
            if not 0.0 <= value <= 1.0:  # also rejects NaN; min_overlap 1 is attainable (identical crops)
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
            setattr(self, name, value)
        if isinstance(self.max_attempts, bool) or int(self.max_attempts) != self.max_attempts or self.max_attempts < 1:
            raise ValueError(f"max_attempts must be an integer >= 1, got {self.max_attempts!r}")
        self.max_attempts = int(self.max_attempts)
        for name in ("brightness", "contrast", "noise_std"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
            setattr(self, name, value)
        if self.contrast > 1.0:
            raise ValueError(f"contrast must be <= 1 (the factor 1 + U(-c, c) would flip signs), got {self.contrast}")

    def view_shape(self, superpatch_shape: Sequence[int]) -> tuple[int, int, int]:
        """The size of each view for a superpatch of ``superpatch_shape`` (X, Y, Z)."""
        if self.view_size is None:
            return as_triple(superpatch_shape, "superpatch_size")
        return as_triple(self.view_size, "view_size")


def as_view_settings(views: ViewSettings | Mapping[str, Any] | None) -> ViewSettings:
    """``None`` -> defaults, a mapping -> ``ViewSettings(**mapping)``, settings unchanged."""
    if views is None:
        return ViewSettings()
    if isinstance(views, ViewSettings):
        return views
    if isinstance(views, Mapping):
        return ViewSettings(**views)
    raise TypeError(f"views must be ViewSettings, a mapping or None, got {type(views).__name__}")


# --------------------------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------------------------


def _as_box(box: BoxLike) -> torch.Tensor:
    box = torch.as_tensor(box)
    if not box.is_floating_point():
        box = box.to(torch.float32)
    if box.shape[-1:] != (6,):
        raise ValueError(f"a box has 6 coordinates (x0, y0, z0, x1, y1, z1), got shape {tuple(box.shape)}")
    return box


def box_intersection(box_a: BoxLike, box_b: BoxLike) -> torch.Tensor:
    """The intersection of boxes ``(..., 6)``; disjoint boxes give a zero-size box (``x1 == x0``)."""
    a, b = torch.broadcast_tensors(*_promote(_as_box(box_a), _as_box(box_b)))
    lo = torch.maximum(a[..., :3], b[..., :3])
    hi = torch.maximum(torch.minimum(a[..., 3:], b[..., 3:]), lo)
    return torch.cat([lo, hi], dim=-1)


def box_volume(box: BoxLike) -> torch.Tensor:
    """Volume (voxels, continuous) of boxes ``(..., 6)``; inverted sides count as 0."""
    box = _as_box(box)
    return (box[..., 3:] - box[..., :3]).clamp(min=0).prod(dim=-1)


def overlap_fraction(box_a: BoxLike, box_b: BoxLike) -> torch.Tensor:
    """Intersection volume / ``min(volume a, volume b)``, in ``[0, 1]``.

    Normalising by the smaller box (rather than the union, as IoU does) measures how much of the
    smaller view is also seen by the other: a small crop inside a large one scores 1, which is what
    matters for matching features of the shared region. Degenerate (zero-volume) boxes score 0.
    """
    a, b = _promote(_as_box(box_a), _as_box(box_b))
    inter = box_volume(box_intersection(a, b))
    smaller = torch.minimum(box_volume(a), box_volume(b))
    return torch.where(smaller > 0, inter / smaller.clamp(min=torch.finfo(smaller.dtype).tiny), torch.zeros_like(inter))


def _promote(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def render_views(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor,
                 size: int | Sequence[int]) -> torch.Tensor:
    """Batched :func:`render_view`: ``images`` (B, C, X, Y, Z), ``boxes`` (B, 6), ``flips`` (B, 3)
    -> (B, C, *size) with one ``grid_sample`` call.

    A flip is applied by reversing the sample positions along that axis, which gives exactly the
    values of ``torch.flip`` of the unflipped view (each output voxel samples the same position).
    """
    if images.ndim != 5:
        raise ValueError(f"images must be (B, C, X, Y, Z), got shape {tuple(images.shape)}")
    size = as_triple(size, "view size")
    batch = images.shape[0]
    boxes = _as_box(boxes).to(torch.float64).reshape(batch, 6)
    flips = torch.as_tensor(flips, dtype=torch.bool).reshape(batch, 3)
    if not images.is_floating_point():
        images = images.to(torch.float32)
    normalised = []
    for axis in range(3):
        n, extent = size[axis], images.shape[2 + axis]
        lo, hi = boxes[:, axis:axis + 1], boxes[:, axis + 3:axis + 4]
        positions = lo + (torch.arange(n, dtype=torch.float64) + 0.5) * (hi - lo) / n  # (B, n), edge coords
        positions = torch.where(flips[:, axis:axis + 1], positions.flip(-1), positions)
        normalised.append(2.0 * positions / extent - 1.0)  # align_corners=False: -1/+1 = outer voxel edges
    ux = normalised[0].view(batch, size[0], 1, 1)
    uy = normalised[1].view(batch, 1, size[1], 1)
    uz = normalised[2].view(batch, 1, 1, size[2])
    # grid_sample sees (N, C, D=X, H=Y, W=Z); its grid's last dimension is ordered (W, H, D) = (z, y, x).
    grid = torch.stack(torch.broadcast_tensors(uz, uy, ux), dim=-1).to(images.dtype)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def render_view(image: torch.Tensor, box: BoxLike, flips: Sequence[bool] | torch.Tensor | None = None,
                size: int | Sequence[int] | None = None) -> torch.Tensor:
    """Crop ``box`` out of ``image`` (C, X, Y, Z), resize it to ``size`` trilinearly and flip it.

    Args:
        image: the superpatch (C, X, Y, Z).
        box: ``(x0, y0, z0, x1, y1, z1)`` in voxel-edge coordinates of ``image`` (module docstring).
        flips: per axis, whether to reverse the rendered view; ``None`` = no flip.
        size: output size (X, Y, Z), one int for a cube; ``None`` = the size of ``image``.

    Returns:
        The view (C, *size), in the dtype of ``image`` (float32 for integer images).
    """
    if image.ndim != 4:
        raise ValueError(f"image must be (C, X, Y, Z), got shape {tuple(image.shape)}")
    size = image.shape[1:] if size is None else size
    flips = (False, False, False) if flips is None else flips
    return render_views(image[None], _as_box(box)[None], torch.as_tensor(flips, dtype=torch.bool)[None], size)[0]


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def draw_view_geometry(superpatch_shape: Sequence[int], settings: ViewSettings | None = None,
                       generator: torch.Generator | None = None) -> dict[str, Any]:
    """The geometry of a pair of views: ``box1``, ``box2`` float32 (6,), ``flip1``, ``flip2`` bool (3,)
    and ``overlap`` (float).

    Each crop side is ``U(scale) * superpatch side`` per axis, its position uniform so that the box
    stays inside the superpatch; pairs overlapping less than ``min_overlap`` are redrawn, up to
    ``max_attempts`` times. Flips are drawn once the boxes are accepted.

    Raises:
        RuntimeError: no pair met ``min_overlap`` within ``max_attempts`` draws.
    """
    settings = as_view_settings(settings)
    extent = torch.tensor(as_triple(superpatch_shape, "superpatch_size"), dtype=torch.float64)
    lo, hi = settings.scale
    for _ in range(settings.max_attempts):
        sides = (lo + (hi - lo) * torch.rand(2, 3, generator=generator, dtype=torch.float64)) * extent
        starts = torch.rand(2, 3, generator=generator, dtype=torch.float64) * (extent - sides)
        # Boxes are handed out (and rendered) in float32; float32(x1) <= X holds as X is an exact float.
        boxes = torch.cat([starts, torch.minimum(starts + sides, extent)], dim=1).to(torch.float32)
        overlap = float(overlap_fraction(boxes[0].double(), boxes[1].double()))
        if overlap >= settings.min_overlap:
            break
    else:
        raise RuntimeError(
            f"no pair of views with overlap >= min_overlap={settings.min_overlap} in max_attempts="
            f"{settings.max_attempts} draws (scale={settings.scale}); lower min_overlap or raise scale"
        )
    flips = torch.rand(2, 3, generator=generator) < settings.flip_probability
    return {"box1": boxes[0], "box2": boxes[1], "flip1": flips[0], "flip2": flips[1], "overlap": overlap}


def jitter_intensity(view: torch.Tensor, settings: ViewSettings | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """``view * (1 + U(-c, c)) + U(-b, b) + N(0, noise_std)`` (one factor and shift per view)."""
    settings = as_view_settings(settings)
    factor, shift = (2.0 * torch.rand(2, generator=generator, dtype=torch.float64) - 1.0).tolist()
    out = view * (1.0 + settings.contrast * factor) + settings.brightness * shift
    if settings.noise_std > 0:
        out = out + settings.noise_std * torch.randn(view.shape, generator=generator, dtype=view.dtype)
    return out


def sample_view_pair(image: torch.Tensor, settings: ViewSettings | None = None,
                     generator: torch.Generator | None = None) -> dict[str, Any]:
    """Two augmented views of the superpatch ``image`` (C, X, Y, Z) and their geometry.

    Returns ``view1``, ``view2`` float32 (C, *view_size), ``box1``, ``box2`` float32 (6,), ``flip1``,
    ``flip2`` bool (3,) and ``overlap`` (float). All randomness comes from ``generator`` (``None``:
    torch's global RNG), so a seeded generator reproduces the pair.
    """
    if image.ndim != 4:
        raise ValueError(f"image must be (C, X, Y, Z), got shape {tuple(image.shape)}")
    settings = as_view_settings(settings)
    pair = draw_view_geometry(image.shape[1:], settings, generator)
    size = settings.view_shape(image.shape[1:])
    image = image.to(torch.float32)
    views = render_views(image[None].expand(2, *image.shape), torch.stack([pair["box1"], pair["box2"]]),
                         torch.stack([pair["flip1"], pair["flip2"]]), size)
    pair["view1"] = jitter_intensity(views[0], settings, generator)
    pair["view2"] = jitter_intensity(views[1], settings, generator)
    return pair


def validation_generator(subject_id: str, location: Sequence[int] | torch.Tensor) -> torch.Generator:
    """A generator seeded from ``crc32(f"{subject_id}:{location}")``: the same views of a validation
    patch at every validation and in every run."""
    location = [int(v) for v in torch.as_tensor(location).tolist()]
    return torch.Generator().manual_seed(zlib.crc32(f"{subject_id}:{location}".encode()))


# --------------------------------------------------------------------------------------------
# Task
# --------------------------------------------------------------------------------------------


@register_task
class TwoViewTask(PatchTask):
    """BYOL-style pretraining (PGL, global BYOL): uniformly placed superpatches, each turned into
    two augmented views plus their boxes and flips (see the module docstring for the batch keys).

    Training views use torch's global RNG (DataLoader workers are seeded distinctly); validation
    views are seeded by :func:`validation_generator`, so they are the same at every validation.

    Args:
        label_probabilities: unused (the patches are uniform); accepted like every task's.
        views: how the views are drawn; ``None`` = :class:`ViewSettings` defaults.
    """

    name = "two_view"
    requires_labels = False

    def __init__(self, label_probabilities: dict[int, float] | None = None,
                 views: ViewSettings | Mapping[str, Any] | None = None) -> None:
        super().__init__(label_probabilities)
        self.views = as_view_settings(views)

    def collate(self, patches: Sequence[tio.Subject | dict[str, Any]]) -> dict[str, Any]:
        return self.add_views(collate_patches(patches))

    def val_collate(self, patches: Sequence[tio.Subject | dict[str, Any]]) -> dict[str, Any]:
        batch = collate_patches(patches)
        generators = [validation_generator(sid, loc) for sid, loc in zip(batch["subject_id"], batch["location"])]
        return self.add_views(batch, generators)

    def add_views(self, batch: dict[str, Any], generators: Sequence[torch.Generator | None] | None = None
                  ) -> dict[str, Any]:
        """Add the two-view keys to a collated ``batch`` (one generator per sample; ``None``: global RNG).

        Per sample, the random draws are made in the order of :func:`sample_view_pair` (geometry,
        then view 1's jitter, then view 2's), so a seeded sample equals ``sample_view_pair`` with the
        same generator; the rendering is batched.
        """
        image: torch.Tensor = batch["image"]
        count, shape = image.shape[0], image.shape[2:]
        generators = [None] * count if generators is None else list(generators)
        if len(generators) != count:
            raise ValueError(f"{len(generators)} generators for a batch of {count}")
        pairs = [draw_view_geometry(shape, self.views, g) for g in generators]
        size = self.views.view_shape(shape)
        out = dict(batch)
        for key in ("box1", "box2", "flip1", "flip2"):
            out[key] = torch.stack([p[key] for p in pairs])
        out["overlap"] = torch.tensor([p["overlap"] for p in pairs], dtype=torch.float32)
        image = image.to(torch.float32)
        view1 = render_views(image, out["box1"], out["flip1"], size)
        view2 = render_views(image, out["box2"], out["flip2"], size)
        for i, g in enumerate(generators):
            view1[i] = jitter_intensity(view1[i], self.views, g)
            view2[i] = jitter_intensity(view2[i], self.views, g)
        out["view1"], out["view2"] = view1, view2
        return out
