"""Export: the architecture description, re-exports, and checkpoints of no known method."""

from __future__ import annotations

from pathlib import Path

import torch

from maesil.checkpoints import describe_architecture, export_encoder, load_checkpoint_state
from maesil.checkpoints.layouts import method_layouts
from tests.checkpoints.test_old_format import PGL_V0_1

VIT = {"encoder.patch_embed.proj.weight": torch.zeros(24, 1, 8, 8, 8),
       **{f"encoder.blocks.{i}.norm1.weight": torch.zeros(24) for i in range(3)}}


def test_the_vit_description_takes_new_and_old_hyperparameter_names() -> None:
    layout = method_layouts()["MAESIL"]
    expected = {"type": "ViTEncoder3D", "superpatch_size": 64, "token_size": 16, "embed_dim": 24, "depth": 3,
                "num_heads": 2, "in_channels": 1}
    new = describe_architecture(layout, {"superpatch_size": 64, "token_size": 16, "num_heads": 2}, VIT)
    old = describe_architecture(layout, {"img_size": 64, "patch_size": 16, "num_heads": 2}, VIT)
    unset = describe_architecture(layout, {"superpatch_size": 64, "token_size": None, "patch_size": 16,
                                           "num_heads": 2}, VIT)  # fmt: skip
    assert new == old == unset == expected
    # Without hyperparameters the tensor shapes tell what they can: token edge, width, channels, depth.
    assert describe_architecture(layout, {}, VIT) == {"type": "ViTEncoder3D", "token_size": 8, "embed_dim": 24,
                                                      "depth": 3, "in_channels": 1}


def test_a_re_export_keeps_the_description(tmp_path: Path) -> None:
    first = export_encoder(PGL_V0_1, tmp_path / "pgl.safetensors")
    again = export_encoder(first, tmp_path / "again.safetensors")
    tensors, sidecar = load_checkpoint_state(again)
    original_tensors, original = load_checkpoint_state(first)
    assert set(tensors) == set(original_tensors) and len(tensors) == 84
    assert sidecar["method"] == "PGL" and sidecar["layout"] == "pgl"
    assert sidecar["architecture"] == original["architecture"] and sidecar["preprocessing"] == original["preprocessing"]
    assert sidecar["source_checkpoint"] == str(first.resolve())


def test_a_checkpoint_of_no_known_method_exports_with_the_layout_covering_most_keys(tmp_path: Path) -> None:
    path = tmp_path / "unknown.ckpt"
    torch.save({"state_dict": {"backbone.encoder.stem.conv.weight": torch.ones(4, 1, 3, 3, 3),
                               "backbone.decoder.stages.0.weight": torch.ones(2),
                               "projector.weight": torch.ones(2, 5, 1, 1, 1)}}, path)  # fmt: skip
    tensors, sidecar = load_checkpoint_state(export_encoder(path, tmp_path / "unknown.safetensors"))
    assert sidecar["method"] is None and sidecar["layout"] == "pgl"  # PGL's prefixes cover encoder and decoder
    assert set(tensors) == {"encoder.stem.conv.weight", "decoder.stages.0.weight"}
    assert sidecar["architecture"] == {"type": "ResEncUNet", "in_channels": 1}
