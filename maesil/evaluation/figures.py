"""Pictures of volumes: orthogonal slices of input, masked input and reconstruction side by side, the
reconstructions of several methods next to each other, the two views of a superpatch.

Slices follow the radiological convention: axial and coronal views show the patient's right on the
viewer's left, anterior is up in axial views, superior is up in coronal and sagittal views. Arrays are
(X, Y, Z) in RAS+ order, as TorchIO gives them after ``ToCanonical``.

Grey levels span :func:`display_range`: [0, 1] for CT windowed to [0, 1]; for z-normalised MRI, whose
range varies per volume, the input's 1st–99th percentile, so pictures are neither saturated nor washed
out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

VIEWS = ("axial", "coronal", "sagittal")

#: Percentiles of the input that bound MRI pictures (robust to a few very bright or dark voxels).
MRI_DISPLAY_PERCENTILES = (1.0, 99.0)


def display_range(image: np.ndarray, modality: str = "ct") -> tuple[float, float]:
    """Grey-level range (vmin, vmax) of pictures of ``image``.

    CT: (0, 1), the windowed range, identical for every volume so pictures compare. MRI: the
    :data:`MRI_DISPLAY_PERCENTILES` of the finite voxels of ``image``, since z-normalised intensities
    (about [−5, 6]) have no fixed range; widened to a span of 1 if the image is (nearly) constant.
    """
    if modality == "ct":
        return 0.0, 1.0
    values = np.asarray(image, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(values, MRI_DISPLAY_PERCENTILES))
    if high - low < 1e-6:
        low, high = low - 0.5, low + 0.5
    return low, high


def orthogonal_slices(volume: np.ndarray, center: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Axial, coronal and sagittal slices of an (X, Y, Z) volume, oriented for ``imshow(origin="lower")``."""
    if volume.ndim != 3:
        raise ValueError(f"expected an (X, Y, Z) volume, got shape {volume.shape}")
    x, y, z = (s // 2 for s in volume.shape) if center is None else center
    return {
        "axial": volume[::-1, :, z].T,
        "coronal": volume[::-1, y, :].T,
        "sagittal": volume[x, ::-1, :].T,
    }


def _aspect(view: str, spacing: Sequence[float]) -> float:
    sx, sy, sz = spacing
    return {"axial": sy / sx, "coronal": sz / sx, "sagittal": sz / sy}[view]


def volume_panels_figure(
    rows: Mapping[str, np.ndarray],
    title: str = "",
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    value_range: tuple[float, float] = (0.0, 1.0),
    center: Sequence[int] | None = None,
    row_ranges: Mapping[str, tuple[float, float]] | None = None,
) -> Figure:
    """One row per named (X, Y, Z) volume, one column per view.

    NaN voxels (e.g. masked patches) are drawn in a muted blue so that hidden regions stand out from
    dark anatomy. Rows span ``value_range`` (see :func:`display_range`) unless ``row_ranges`` gives
    their own, e.g. for a difference map.
    """
    cmap = plt.get_cmap("gray").with_extremes(bad=(0.25, 0.35, 0.55))
    fig, axes = plt.subplots(len(rows), len(VIEWS), figsize=(3.2 * len(VIEWS), 3.2 * len(rows)), squeeze=False)
    for row_index, (name, volume) in enumerate(rows.items()):
        slices = orthogonal_slices(np.asarray(volume, dtype=np.float32), center)
        vmin, vmax = (row_ranges or {}).get(name, value_range)
        for col_index, view in enumerate(VIEWS):
            ax = axes[row_index, col_index]
            ax.imshow(
                np.ma.masked_invalid(slices[view]),
                cmap=cmap,
                vmin=vmin,
                vmax=vmax,
                origin="lower",
                aspect=_aspect(view, spacing),
                interpolation="nearest",
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if row_index == 0:
                ax.set_title(view)
            if col_index == 0:
                ax.set_ylabel(name)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def comparison_figure(
    image: np.ndarray,
    reconstructions: Mapping[str, np.ndarray],
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    title: str = "",
    center: Sequence[int] | None = None,
    value_range: tuple[float, float] = (0.0, 1.0),
) -> Figure:
    """The same axial and coronal slice of the input and of every method's reconstruction, side by side.

    Columns: input, then one per method. Rows: axial, axial |recon − input|, coronal, coronal
    |recon − input|. Difference maps share one colour scale (0 to the 99.5th percentile over all
    methods, at least 0.05 of the value range), so that methods compare by eye.
    """
    image = np.asarray(image, dtype=np.float32)
    center = tuple(int(c) for c in center) if center is not None else tuple(s // 2 for s in image.shape)
    views = ("axial", "coronal")
    input_slices = orthogonal_slices(image, center)
    method_slices = {name: orthogonal_slices(np.asarray(r, dtype=np.float32), center)
                     for name, r in reconstructions.items()}
    diffs = {name: {v: np.abs(s[v] - input_slices[v]) for v in views} for name, s in method_slices.items()}
    span = value_range[1] - value_range[0]
    all_diffs = np.concatenate([d[v].ravel() for d in diffs.values() for v in views]) if diffs else np.zeros(1)
    diff_max = max(0.05 * span, float(np.percentile(all_diffs, 99.5)))

    columns = ["input", *reconstructions]
    fig, axes = plt.subplots(4, len(columns), figsize=(2.8 * len(columns) + 1.0, 2.8 * 4), squeeze=False,
                             layout="constrained")
    diff_image = None
    for col, name in enumerate(columns):
        for block, view in enumerate(views):
            ax_img, ax_diff = axes[2 * block, col], axes[2 * block + 1, col]
            picture = input_slices[view] if name == "input" else method_slices[name][view]
            ax_img.imshow(picture, cmap="gray", vmin=value_range[0], vmax=value_range[1], origin="lower",
                          aspect=_aspect(view, spacing), interpolation="nearest")
            if name == "input":
                ax_diff.axis("off")
            else:
                diff_image = ax_diff.imshow(diffs[name][view], cmap="magma", vmin=0.0, vmax=diff_max,
                                            origin="lower", aspect=_aspect(view, spacing), interpolation="nearest")
            for ax in (ax_img, ax_diff):
                ax.set_xticks([])
                ax.set_yticks([])
            if col == 0:
                ax_img.set_ylabel(view)
            elif col == 1:
                ax_diff.set_ylabel(f"{view} |recon − input|")
        axes[0, col].set_title(name)
    if diff_image is not None:
        fig.colorbar(diff_image, ax=axes[:, -1].tolist(), shrink=0.5, label="|recon − input|")
    if title:
        fig.suptitle(title)
    return fig


def masked_reconstruction_figure(image: np.ndarray, mask: np.ndarray, reconstruction: np.ndarray,
                                 title: str = "", value_range: tuple[float, float] = (0.0, 1.0)) -> Figure:
    """Input, masked input (hidden voxels in blue) and reconstruction of one (X, Y, Z) volume, three views,
    over ``value_range`` (:func:`display_range`): the picture of every masked method (MAESIL, S3D)."""
    masked = np.array(image, dtype=np.float32, copy=True)
    masked[np.asarray(mask, dtype=bool)] = np.nan
    return volume_panels_figure({"input": image, "masked input": masked, "reconstruction": reconstruction},
                                title=title, value_range=value_range)


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Writes ``fig`` as PNG (creating folders) and closes it to free memory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _box_rectangle(ax, box_xy: Sequence[float], width_x: int, color: str, label: str | None = None) -> None:
    """Draws an (x0, y0, x1, y1) voxel-edge box on an axial slice shown by :func:`orthogonal_slices`
    (x reversed along the columns, y up)."""
    from matplotlib.patches import Rectangle

    x0, y0, x1, y1 = (float(v) for v in box_xy)
    ax.add_patch(Rectangle((width_x - x1 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=color,
                           linewidth=1.5, label=label))


def _view_coordinates(box: np.ndarray, view_box: np.ndarray, flips: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """A superpatch box (x0, y0, z0, x1, y1, z1) in the voxel-edge coordinates of a view cut at
    ``view_box`` and flipped along ``flips``."""
    start = (box[:3] - view_box[:3]) / (view_box[3:] - view_box[:3]) * np.asarray(size)
    stop = (box[3:] - view_box[:3]) / (view_box[3:] - view_box[:3]) * np.asarray(size)
    flipped = np.asarray(flips, dtype=bool)
    start, stop = np.where(flipped, np.asarray(size) - stop, start), np.where(flipped, np.asarray(size) - start, stop)
    return np.concatenate([start, stop])


def two_view_figure(
    image: np.ndarray,
    views: Sequence[np.ndarray],
    boxes: Sequence[np.ndarray],
    flips: Sequence[np.ndarray],
    overlap: np.ndarray,
    title: str = "",
    value_range: tuple[float, float] = (0.0, 1.0),
) -> Figure:
    """Axial slices of a superpatch and of its two views through the centre of their overlap.

    The superpatch panel shows both crop boxes and the overlap; each view panel shows where the overlap
    lies in that view (after its resize and flips), which is the region PGL aligns.

    Args:
        image: (X, Y, Z) superpatch.
        views: two (X', Y', Z') views.
        boxes: two (6,) crop boxes in superpatch voxel-edge coordinates.
        flips: two (3,) bool flip flags.
        overlap: (6,) overlap box in superpatch coordinates.
    """
    colors = ("tab:blue", "tab:orange")
    overlap = np.asarray(overlap, dtype=np.float64)
    z_center = 0.5 * (overlap[2] + overlap[5])
    fig, axes = plt.subplots(1, 3, figsize=(9.6, 3.6))
    z_index = int(np.clip(np.floor(z_center), 0, image.shape[2] - 1))
    axes[0].imshow(orthogonal_slices(np.asarray(image, np.float32), (0, 0, z_index))["axial"], cmap="gray",
                   vmin=value_range[0], vmax=value_range[1], origin="lower", interpolation="nearest")
    for index, (box, color) in enumerate(zip(boxes, colors)):
        box = np.asarray(box, dtype=np.float64)
        _box_rectangle(axes[0], (box[0], box[1], box[3], box[4]), image.shape[0], color, f"view {index + 1}")
    _box_rectangle(axes[0], (overlap[0], overlap[1], overlap[3], overlap[4]), image.shape[0], "tab:green", "overlap")
    axes[0].set_title("superpatch")
    axes[0].legend(loc="lower left", fontsize=7, framealpha=0.6)
    for index, (view, box, flip, color) in enumerate(zip(views, boxes, flips, colors)):
        view = np.asarray(view, dtype=np.float32)
        in_view = _view_coordinates(overlap, np.asarray(box, np.float64), np.asarray(flip), view.shape)
        z_view = int(np.clip(np.floor(0.5 * (in_view[2] + in_view[5])), 0, view.shape[2] - 1))
        ax = axes[index + 1]
        ax.imshow(orthogonal_slices(view, (0, 0, z_view))["axial"], cmap="gray", vmin=value_range[0],
                  vmax=value_range[1], origin="lower", interpolation="nearest")
        _box_rectangle(ax, (in_view[0], in_view[1], in_view[3], in_view[4]), view.shape[0], "tab:green")
        flipped = "".join(axis for axis, f in zip("xyz", np.asarray(flip, bool)) if f) or "none"
        ax.set_title(f"view {index + 1} (flips: {flipped})", color=color)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
