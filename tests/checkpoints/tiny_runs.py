"""Tiny real checkpoints (one-step CLI runs, made once per session) and the networks they load into."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from maesil.cli import main
from maesil.models.vit3d import ViTEncoder3D
from tests.helpers import tiny_maesil_args
from tests.methods.test_pgl import tiny_args

_CHECKPOINTS: dict[str, Path] = {}


def tiny_checkpoint(method: str, data_dir: Path, root: Path) -> Path:
    """``last.ckpt`` of a one-step CLI run of ``method`` (maesil, pgl, byol), made once per test session."""
    if method not in _CHECKPOINTS:
        run_dir = root / method
        if method == "maesil":
            args = tiny_maesil_args(data_dir, run_dir, max_steps=1)
        else:
            args = tiny_args(method, data_dir, run_dir, max_steps=1)
            args += ["--model.init_args.num_scales", "2"] if method == "pgl" else []
        main(["fit", *args, "--trainer.limit_val_batches", "0"])
        _CHECKPOINTS[method] = run_dir / "checkpoints" / "last.ckpt"
    return _CHECKPOINTS[method]


class ViTSegmenter(nn.Module):
    """A downstream network holding a ViTEncoder3D at ``encoder`` (as UNETR does), sized like tiny_maesil_args."""

    def __init__(self, superpatch_size: int = 32) -> None:
        super().__init__()
        self.encoder = ViTEncoder3D(superpatch_size, token_size=8, in_channels=1, embed_dim=48, depth=2, num_heads=2)
        self.head = nn.Linear(48, 3)


def raw_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def with_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + key: value for key, value in state.items()}
