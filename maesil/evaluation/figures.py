"""Pictures of volumes: orthogonal slices of input, masked input and reconstruction side by side.

Slices follow the radiological convention: axial and coronal views show the patient's right on the
viewer's left, anterior is up in axial views, superior is up in coronal and sagittal views. Arrays are
(X, Y, Z) in RAS+ order, as TorchIO gives them after ``ToCanonical``.
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
) -> Figure:
    """One row per named (X, Y, Z) volume, one column per view.

    NaN voxels (e.g. masked patches) are drawn in a muted blue so that hidden regions stand out from
    dark anatomy.
    """
    cmap = plt.get_cmap("gray").with_extremes(bad=(0.25, 0.35, 0.55))
    fig, axes = plt.subplots(len(rows), len(VIEWS), figsize=(3.2 * len(VIEWS), 3.2 * len(rows)), squeeze=False)
    for row_index, (name, volume) in enumerate(rows.items()):
        slices = orthogonal_slices(np.asarray(volume, dtype=np.float32), center)
        for col_index, view in enumerate(VIEWS):
            ax = axes[row_index, col_index]
            ax.imshow(
                np.ma.masked_invalid(slices[view]),
                cmap=cmap,
                vmin=value_range[0],
                vmax=value_range[1],
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


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Writes ``fig`` as PNG (creating folders) and closes it to free memory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
