"""Checkpoints written by maesil 0.1 (tests/fixtures/old_checkpoints) still export, fine-tune and load.

The fixtures came out of ``python -m maesil fit`` before the checkpoints, methods and data were reorganised;
their hyperparameters use the old names (MAESIL's ``img_size`` and ``patch_size``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from maesil.checkpoints import export_encoder, load_checkpoint_state
from tests.helpers import REPO_ROOT, tiny_data_overrides

FIXTURES = REPO_ROOT / "tests" / "fixtures" / "old_checkpoints"
MAESIL_V0_1 = FIXTURES / "maesil_v0_1.ckpt"
PGL_V0_1 = FIXTURES / "pgl_v0_1.ckpt"
PREPROCESSING = {"modality": "ct", "target_spacing": 4.0, "hu_window": [-175.0, 250.0], "superpatch_size": 32,
                 "crop_foreground": True}


def fixture_state(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The fixture's tensors under ``prefix``, renamed as the downstream network names them."""
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {key.split(".", 1)[1]: value for key, value in state.items() if key.startswith(prefix)}


def test_the_fixtures_are_in_the_old_layout() -> None:
    _, maesil = load_checkpoint_state(MAESIL_V0_1)
    assert maesil["hyper_parameters"]["_class_path"] == "maesil.methods.MAESIL"
    assert {"img_size", "patch_size"} <= set(maesil["hyper_parameters"])
    _, pgl = load_checkpoint_state(PGL_V0_1)
    assert pgl["hyper_parameters"]["_class_path"] == "maesil.methods.PGL"


# ---------------------------------------------------------------------------------------------------- export


def test_old_maesil_checkpoint_exports_its_vit(tmp_path: Path) -> None:
    out = export_encoder(MAESIL_V0_1, tmp_path / "maesil.safetensors")
    exported = load_file(str(out))
    encoder = fixture_state(MAESIL_V0_1, "net.encoder.")
    assert len(exported) == len(encoder) == 28 and set(exported) == set(encoder)
    assert all(torch.equal(exported[key], value) for key, value in encoder.items())
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["method"] == "MAESIL" and sidecar["layout"] == "maesil" and sidecar["includes_decoder"] is False
    assert sidecar["architecture"] == {"type": "ViTEncoder3D", "superpatch_size": 32, "token_size": 8,
                                       "embed_dim": 24, "depth": 2, "num_heads": 2, "mlp_ratio": 4.0,
                                       "in_channels": 1}  # fmt: skip
    assert sidecar["tensors"] == {"encoder": 28, "decoder": 0, "total": 28} and sidecar["parameters"] == 26808
    assert sidecar["preprocessing"] == PREPROCESSING


def test_old_pgl_checkpoint_exports_encoder_and_decoder(tmp_path: Path) -> None:
    out = export_encoder(PGL_V0_1, tmp_path / "pgl.safetensors")
    exported = load_file(str(out))
    online = fixture_state(PGL_V0_1, "backbone.")
    assert set(exported) == set(online) and all(torch.equal(exported[k], v) for k, v in online.items())
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["method"] == "PGL" and sidecar["layout"] == "pgl" and sidecar["includes_decoder"] is True
    assert sidecar["architecture"] == {"type": "ResEncUNet", "unet_preset": "cpu", "features": [4, 8, 16, 16],
                                       "blocks_per_stage": [1, 2, 2, 2], "strides": [1, 2, 2, 2], "kernel_size": 3,
                                       "in_channels": 1}  # fmt: skip
    assert sidecar["tensors"] == {"encoder": 66, "decoder": 18, "total": 84}
    assert sidecar["parameters"] == 59584 + 21584
    assert sidecar["preprocessing"] == PREPROCESSING


# ------------------------------------------------------------------------------------------------- fine-tune


def fine_tune_one_step(config: str, checkpoint: Path, data_dir: Path, run_dir: Path, *overrides: str):
    """One training step of ``experiments/finetune/<config>`` shrunk to the tiny phantoms, from ``checkpoint``
    given as ``model.init_args.pretrained``; returns the trained Segmentation module."""
    from maesil.lightning_cli import MaesilCLI

    args = [
        "--config", str(REPO_ROOT / "experiments" / "finetune" / config),
        *tiny_data_overrides(data_dir),
        "--model.init_args.pretrained", str(checkpoint),
        "--trainer.max_steps", "1",
        "--trainer.limit_val_batches", "0",
        "--trainer.default_root_dir", str(run_dir),
        *overrides,
    ]  # fmt: skip
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        cli = MaesilCLI(args=args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 1
    return cli.model


def test_old_maesil_checkpoint_fine_tunes_a_unetr(tiny_ct_dir: Path, tmp_path: Path) -> None:
    model = fine_tune_one_step(
        "unetr_demo.yaml", MAESIL_V0_1, tiny_ct_dir, tmp_path / "unetr",
        "--model.init_args.network_args", json.dumps({"token_size": 8, "embed_dim": 24, "depth": 2, "num_heads": 2}),
    )
    report = model.pretrained_report
    encoder_keys = [key for key in model.net.state_dict() if key.startswith("encoder.")]
    assert report.layout == "maesil" and len(report.loaded) == 28
    assert sorted(report.loaded) == sorted(encoder_keys) == sorted(fixture_state(MAESIL_V0_1, "net.encoder."))
    assert report.unexpected == [] and report.shape_mismatched == []


def test_old_pgl_checkpoint_fine_tunes_a_resenc_unet(tiny_ct_dir: Path, tmp_path: Path) -> None:
    model = fine_tune_one_step(
        "unet_demo.yaml", PGL_V0_1, tiny_ct_dir, tmp_path / "unet",
        "--model.init_args.network_args", json.dumps({"features": [4, 8, 16, 16]}),
    )
    report = model.pretrained_report
    online = fixture_state(PGL_V0_1, "backbone.")
    assert report.layout == "pgl" and len(report.loaded) == 66 and len(report.decoder_left_out) == 18
    assert sorted(report.loaded) == sorted(k for k in online if k.startswith("encoder."))
    assert {key for key in model.net.state_dict() if key.startswith("encoder.")} == set(report.loaded)
    assert report.unexpected == [] and "head.weight" in report.missing


# ------------------------------------------------------------------------------------------------------ load


@pytest.mark.parametrize(("method", "path", "prefix"),
                         [("MAESIL", MAESIL_V0_1, "net."), ("PGL", PGL_V0_1, "backbone.")])
def test_old_checkpoints_load_from_checkpoint(method: str, path: Path, prefix: str) -> None:
    import maesil.methods

    cls = getattr(maesil.methods, method)
    model = cls.load_from_checkpoint(path, map_location="cpu")
    saved = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    restored = model.state_dict()
    assert set(restored) == set(saved)
    assert all(torch.equal(restored[key], value) for key, value in saved.items())
    assert any(key.startswith(prefix + "encoder.") for key in restored)
