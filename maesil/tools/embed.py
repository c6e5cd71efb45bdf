"""``python -m maesil embed CKPT --data DIR --out OUT``: a pretrained encoder as a feature extractor.

Every subject of ``--data`` is preprocessed as the encoder was pretrained (modality, spacing, HU window,
foreground crop: the checkpoint's or export's record) and cut into the non-overlapping superpatch grid of
evaluation (:func:`~maesil.data.grid.pad_to_multiple`, ``tio.GridSampler``). The encoder maps each superpatch to
a feature grid: a ViT's tokens laid out on the token grid, a ResEnc encoder's deepest stage. The superpatches
of all subjects go through in batches of ``--batch-size``; in eval mode nothing depends on which patches share
a batch (LayerNorm and InstanceNorm are per sample), so a subject's features do not depend on the others.

Outputs in ``--out``:

* ``embeddings.csv``: one row per subject, ``subject_id`` then ``f0 … f{C-1}``, the mean of the feature voxels
  whose block lies in the volume (the padding of the grid is left out);
* with ``--feature-maps``: ``feature_maps/<subject_id>.nii.gz``, the ``(x, y, z, C)`` feature grid of the whole
  padded volume, in the preprocessed volume's world geometry (each feature voxel placed at the centre of the
  block of voxels it encodes).
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchio as tio
from torch import Tensor, nn

from maesil.models.unetr import tokens_to_volume
from maesil.models.vit3d import token_grid


__all__ = ["EmbeddedVolume", "Embedder", "build_encoder", "embed_command", "embed_subjects", "write_feature_map"]


class EmbedError(Exception):
    """A problem with the inputs; the message says what to fix."""


class Embedder(nn.Module):
    """An encoder that maps ``(B, C, X, Y, Z)`` superpatches to feature grids ``(B, D, x, y, z)``.

    Attributes:
        stride: voxels per feature voxel along each axis.
    """

    def __init__(self, encoder: nn.Module, stride: int, grid_of_tokens: bool) -> None:
        super().__init__()
        self.encoder = encoder
        self.stride = stride
        self.grid_of_tokens = grid_of_tokens

    def forward(self, images: Tensor) -> Tensor:
        if self.grid_of_tokens:
            return tokens_to_volume(self.encoder(images), token_grid(images.shape[2:], self.stride))
        return self.encoder(images)[-1]


def build_encoder(tensors: dict[str, Tensor], architecture: dict[str, Any]) -> Embedder:
    """The encoder an export describes (``ViTEncoder3D`` or ``ResEncUNet``'s encoder), loaded strictly."""
    from maesil.models.unet import LayerFactory, ResEncoder
    from maesil.models.vit3d import ViTEncoder3D

    own = {k.removeprefix("encoder."): v for k, v in tensors.items() if k.startswith("encoder.")}
    kind = architecture.get("type")
    if kind == "ViTEncoder3D":
        encoder: nn.Module = ViTEncoder3D(
            architecture["superpatch_size"], token_size=int(architecture["token_size"]),
            in_channels=int(architecture.get("in_channels", 1)), embed_dim=int(architecture["embed_dim"]),
            depth=int(architecture["depth"]), num_heads=int(architecture["num_heads"]),
            mlp_ratio=float(architecture.get("mlp_ratio", 4.0)),
            qkv_bias=any(k.endswith("attn.qkv.bias") for k in own),
        )  # fmt: skip
        embedder = Embedder(encoder, int(architecture["token_size"]), grid_of_tokens=True)
    elif kind == "ResEncUNet":
        strides = [int(s) for s in architecture["strides"]]
        encoder = ResEncoder(LayerFactory(), int(architecture.get("in_channels", 1)), architecture["features"],
                             architecture["blocks_per_stage"], strides, int(architecture.get("kernel_size", 3)))
        embedder = Embedder(encoder, int(np.prod(strides)), grid_of_tokens=False)
    else:
        raise EmbedError(f"no encoder to build for architecture {kind!r} (a ViTEncoder3D or a ResEncUNet).")
    encoder.load_state_dict(own, strict=True)
    return embedder.eval()


@dataclass
class EmbeddedVolume:
    """One subject's features.

    Attributes:
        subject_id: the subject.
        grid: the feature grid of the padded volume ``(gx, gy, gz)``.
        inside: the feature voxels whose block centre lies in the (unpadded) volume.
        affine: the feature grid's voxel-to-world matrix (the preprocessed volume's, scaled by the stride).
        remaining: superpatches not yet encoded.
        features: ``(D, gx, gy, gz)``, filled superpatch by superpatch.
        pooled: ``(D,)``, the mean over ``inside`` once every superpatch is encoded.
    """

    subject_id: str
    grid: tuple[int, int, int]
    inside: tuple[slice, slice, slice]
    affine: np.ndarray
    remaining: int
    features: Tensor | None = field(default=None)
    pooled: Tensor | None = field(default=None)


def _feature_geometry(shape: np.ndarray, padded_shape: np.ndarray, affine: np.ndarray,
                      stride: int) -> tuple[tuple[slice, slice, slice], np.ndarray]:
    """The feature voxels inside the unpadded volume (the padding is centred) and the feature grid's affine."""
    before = (padded_shape - shape) // 2
    centre = (stride - 1) / 2  # a feature voxel i sits at voxel i * stride + centre of the padded volume
    first = np.ceil((before - centre) / stride).astype(int)
    last = np.floor((before + shape - 1 - centre) / stride).astype(int) + 1
    inside = tuple(slice(int(max(a, 0)), int(max(b, a + 1))) for a, b in zip(first, last))
    scaled = affine @ np.diag([stride, stride, stride, 1.0])
    scaled[:3, 3] += affine[:3, :3] @ np.full(3, centre)
    return inside, scaled  # type: ignore[return-value]


def _patches(subjects: Sequence[tuple[str, Any]], superpatch: tuple[int, int, int], padding: float | str,
             stride: int) -> Iterator[tuple[EmbeddedVolume | None, int, Tensor, Tensor]]:
    """``(volume when it starts, volume index, location, image)`` of every superpatch, subject after subject."""
    from maesil.data.grid import pad_to_multiple

    for index, (subject_id, load) in enumerate(subjects):
        subject: tio.Subject = load()
        shape = np.array(subject.spatial_shape)  # before padding, which may pad the subject in place
        padded = pad_to_multiple(subject, superpatch, padding)
        image = next(iter(padded.get_images(intensity_only=True)))
        inside, affine = _feature_geometry(shape, np.array(padded.spatial_shape),
                                           np.array(image.affine, dtype=np.float64), stride)
        sampler = tio.GridSampler(padded, patch_size=superpatch, patch_overlap=0)
        grid = tuple(int(g) // stride for g in padded.spatial_shape)
        volume = EmbeddedVolume(subject_id, grid, inside, affine, remaining=len(sampler))  # type: ignore[arg-type]
        for number, patch in enumerate(sampler):
            tensor = next(iter(patch.get_images(intensity_only=True))).data
            yield (volume if number == 0 else None), index, torch.as_tensor(patch[tio.LOCATION]), tensor


def embed_subjects(embedder: Embedder, subjects: Sequence[tuple[str, Any]], superpatch: Sequence[int],
                   padding: float | str = 0.0, batch_size: int = 2, device: str | torch.device = "cpu",
                   progress: bool = False) -> Iterator[EmbeddedVolume]:
    """Yields every subject's filled feature grid and pooled embedding, in order.

    Args:
        embedder: :func:`build_encoder`'s network.
        subjects: ``[(subject_id, load)]``, ``load()`` giving the preprocessed ``tio.Subject``.
        superpatch: the superpatch the grid is cut into (the pretraining superpatch).
        padding: the value the grid pads with (0 for windowed CT, ``"minimum"`` for MRI).
        batch_size: superpatches per forward pass, across subject boundaries.
        progress: a tqdm bar over the subjects.
    """
    superpatch = tuple(int(s) for s in superpatch)
    embedder = embedder.to(device).eval()
    volumes: dict[int, EmbeddedVolume] = {}
    batch: list[tuple[int, Tensor, Tensor]] = []
    bar = _progress(len(subjects)) if progress else None

    def run() -> Iterator[EmbeddedVolume]:
        images = torch.stack([image for _, _, image in batch]).to(device=device, dtype=torch.float32)
        with torch.inference_mode():
            features = embedder(images).float().cpu()
        for (index, location, _), feature in zip(batch, features):
            volume = volumes[index]
            if volume.features is None:
                volume.features = torch.zeros(feature.shape[0], *volume.grid)
            start = (location[:3] // embedder.stride).tolist()
            size = feature.shape[1:]
            volume.features[:, start[0]:start[0] + size[0], start[1]:start[1] + size[1],
                            start[2]:start[2] + size[2]] = feature
            volume.remaining -= 1
        batch.clear()
        for index in sorted(volumes):
            volume = volumes[index]
            if volume.remaining:
                break  # subjects are finished in order
            del volumes[index]
            volume.pooled = volume.features[(slice(None), *volume.inside)].mean(dim=(1, 2, 3))
            if bar is not None:
                bar.update(1)
            yield volume

    for started, index, location, image in _patches(subjects, superpatch, padding, embedder.stride):
        if started is not None:
            volumes[index] = started
        batch.append((index, location, image))
        if len(batch) == batch_size:
            yield from run()
    if batch:
        yield from run()
    if bar is not None:
        bar.close()


def _progress(total: int) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with lightning; without it there is just no bar
        return None
    return tqdm(total=total, desc="embed", unit="subject", dynamic_ncols=True, file=sys.stderr)


def write_feature_map(volume: EmbeddedVolume, path: Path) -> Path:
    """The ``(x, y, z, C)`` feature grid as NIfTI, in the volume's world geometry."""
    import nibabel as nib

    from maesil.files import atomic_write_bytes

    data = volume.features.permute(1, 2, 3, 0).numpy().astype(np.float32)
    image = nib.Nifti1Image(data, volume.affine)
    atomic_write_bytes(path, image.to_bytes() if path.suffix != ".gz" else _gzip(image.to_bytes()))
    return path


def _gzip(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data, compresslevel=1, mtime=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m maesil embed",
        description="Pretrained encoder as a feature extractor: per subject, the mean feature vector over the "
        "volume (embeddings.csv) and optionally the feature grid as NIfTI in the volume's geometry. Volumes are "
        "preprocessed as in pretraining and cut into the superpatch grid of evaluation.",
    )
    parser.add_argument("checkpoint", type=Path, help="a maesil checkpoint (.ckpt) or export (.safetensors)")
    parser.add_argument("--data", required=True, help="images: a folder, manifest, DICOM tree or prepared cache")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--feature-maps", action="store_true", help="also write feature_maps/<subject>.nii.gz")
    parser.add_argument("--batch-size", type=int, default=2, help="superpatches per forward pass (default 2)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--workers", type=int, default=0, help="data-loading processes for checking the data")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def embed_command(argv: Sequence[str]) -> int:
    from maesil.checkpoints import CheckpointError
    from maesil.checkpoints.export import collect_export
    from maesil.data.preprocess import padding_value
    from maesil.data.records import DataError
    from maesil.tools.benchmark_recon import data_settings, load_subjects

    args = build_parser().parse_args(list(argv))
    if args.batch_size < 1:
        print("error: --batch-size must be at least 1", file=sys.stderr)
        return 2
    try:
        tensors, description = collect_export(args.checkpoint, with_decoder=False)
        embedder = build_encoder(tensors, description["architecture"])
        settings, superpatch = data_settings(description.get("preprocessing") or {})
        subjects = load_subjects(args.data, settings, superpatch, workers=args.workers)
    except (CheckpointError, EmbedError, DataError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    maps = args.out / "feature_maps"
    if args.feature_maps:
        maps.mkdir(exist_ok=True)
    rows = []
    for volume in embed_subjects(embedder, subjects, superpatch, padding_value(settings.modality), args.batch_size,
                                 args.device, progress=not args.no_progress):
        rows.append([volume.subject_id, *(float(v) for v in volume.pooled)])
        if args.feature_maps:
            write_feature_map(volume, maps / f"{volume.subject_id}.nii.gz")
    table = args.out / "embeddings.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        width = len(rows[0]) - 1 if rows else 0
        writer.writerow(["subject_id", *(f"f{i}" for i in range(width))])
        writer.writerows(rows)
    print(f"{table}: {len(rows)} subjects × {width} features ({description.get('method') or 'encoder'} from "
          f"{args.checkpoint}, superpatch {list(superpatch)})" + (f"; feature maps in {maps}" if args.feature_maps
                                                                 else ""))
    return 0
