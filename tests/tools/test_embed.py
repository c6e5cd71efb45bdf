"""``python -m maesil embed``: per-subject embeddings from tiny real checkpoints; independent of the batching."""

from __future__ import annotations

import copy
import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch

from maesil.checkpoints.export import collect_export
from maesil.cli import main
from maesil.data.preprocess import padding_value
from maesil.tools.benchmark_recon import data_settings, load_subjects
from maesil.tools.embed import build_encoder, embed_subjects
from tests.checkpoints.tiny_runs import tiny_checkpoint


@pytest.fixture
def checkpoint(tiny_ct_dir: Path, tmp_path_factory) -> Callable[[str], Path]:
    root = tmp_path_factory.getbasetemp() / "tiny_checkpoints"
    return lambda method: tiny_checkpoint(method, tiny_ct_dir, root)


def _embedder(path: Path, data: Path) -> tuple[Any, list[tuple[str, Callable[[], Any]]], tuple, Any]:
    """The encoder, the preprocessed subjects (read once, copied for each run) and the grid settings."""
    tensors, description = collect_export(path, with_decoder=False)
    embedder = build_encoder(tensors, description["architecture"])
    settings, superpatch = data_settings(description["preprocessing"])
    loaded = [(sid, load()) for sid, load in load_subjects(data, settings, superpatch, workers=0)]
    subjects = [(sid, lambda subject=subject: copy.deepcopy(subject)) for sid, subject in loaded]
    return embedder, subjects, superpatch, padding_value(settings.modality)


def _pooled(embedder: Any, subjects: list, superpatch: tuple, padding: Any, batch_size: int) -> dict[str, torch.Tensor]:
    return {v.subject_id: v.pooled for v in embed_subjects(embedder, subjects, superpatch, padding, batch_size)}


@pytest.mark.parametrize("method", ["maesil", "pgl"])
def test_embedding_does_not_depend_on_the_batch(method: str, checkpoint, tiny_ct_dir: Path) -> None:
    """One superpatch per batch, the whole run in one batch, and other subjects around it: the same numbers."""
    embedder, subjects, superpatch, padding = _embedder(checkpoint(method), tiny_ct_dir / "images")
    alone = _pooled(embedder, subjects, superpatch, padding, batch_size=1)
    together = _pooled(embedder, subjects, superpatch, padding, batch_size=16)
    reordered = _pooled(embedder, [subjects[2], subjects[0]], superpatch, padding, batch_size=3)
    assert sorted(alone) == sorted(together) == ["phantom_000", "phantom_001", "phantom_002"]
    differences = [float((alone[s] - other[s]).abs().max()) for other in (together, reordered) for s in other]
    assert max(differences) < 1e-5, differences
    assert float((alone["phantom_000"] - alone["phantom_001"]).abs().max()) > 1e-3  # subjects do differ


def test_embed_command_writes_the_table_and_feature_maps(checkpoint, tiny_ct_dir: Path, tmp_path: Path,
                                                         capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["embed", str(checkpoint("maesil")), "--data", str(tiny_ct_dir / "images"), "--out", str(tmp_path),
              "--feature-maps", "--no-progress"])
    assert info.value.code == 0
    assert "3 subjects × 48 features" in capsys.readouterr().out
    with open(tmp_path / "embeddings.csv") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["subject_id", *(f"f{i}" for i in range(48))] and [r[0] for r in rows[1:]] == [
        "phantom_000", "phantom_001", "phantom_002"]
    feature_map = nib.load(tmp_path / "feature_maps" / "phantom_000.nii.gz")
    data = np.asarray(feature_map.dataobj)
    assert data.shape == (8, 8, 8, 48)  # 4 mm voxels, padded to 64³, 8³ voxels per token
    # every feature voxel whose block centre lies in the preprocessed volume, found through world coordinates
    tensors, description = collect_export(checkpoint("maesil"), with_decoder=False)
    settings, superpatch = data_settings(description["preprocessing"])
    subject = load_subjects(tiny_ct_dir / "images", settings, superpatch, workers=0)[0][1]()
    image = next(iter(subject.get_images(intensity_only=True)))
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in data.shape[:3]), indexing="ij"), axis=-1).reshape(-1, 3)
    world = feature_map.affine @ np.c_[grid, np.ones(len(grid))].T
    voxel = (np.linalg.inv(image.affine) @ world)[:3].T
    inside = np.all((voxel > -0.5) & (voxel < np.array(image.spatial_shape) - 0.5), axis=1)
    assert 0 < inside.sum() < len(grid)  # the grid pads the volume
    pooled = data.reshape(-1, 48)[inside].mean(axis=0)
    assert np.allclose(pooled, np.array(rows[1][1:], dtype=np.float64), atol=1e-5)


def test_embed_command_names_a_bad_checkpoint(tiny_ct_dir: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.ckpt"
    bad.write_text("not a checkpoint")
    with pytest.raises(SystemExit) as info:
        main(["embed", str(bad), "--data", str(tiny_ct_dir / "images"), "--out", str(tmp_path / "out")])
    assert info.value.code == 1 and f"{bad}: neither a PyTorch checkpoint" in capsys.readouterr().err
