"""Key mapping with a report, and the automatic layouts of real tiny checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from maesil.checkpoints import (CheckpointError, export_encoder, has_trained_decoder, identify_method,
                               load_checkpoint_state, load_pretrained)
from maesil.models.unet import ResEncUNet, resenc_unet
from maesil.models.vit3d import ViTEncoder3D
from tests.checkpoints.tiny_runs import ViTSegmenter, raw_state, with_prefix

# ------------------------------------------------------------------------------------------------ key mapping


def test_renamed_prefix_is_mapped_and_reported(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = resenc_unet("tiny", out_channels=None)
    encoder_state = {k: v for k, v in source.state_dict().items() if k.startswith("encoder.")}
    state = with_prefix({k.removeprefix("encoder."): v for k, v in encoder_state.items()}, "model.vit.")
    state["model.vit.extra.weight"] = torch.ones(3)  # renamed, but the model has no such key
    state["model.proj.weight"] = torch.ones(2, 2)  # outside the mapping: ignored
    path = tmp_path / "renamed.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": {}}, path)

    model = resenc_unet("tiny", out_channels=2)
    decoder_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    report = load_pretrained(model, path, mapping={"model.vit.": "encoder."})

    assert report.layout == "custom"
    assert len(report.loaded) == len(encoder_state) == sum(k.startswith("encoder.") for k in model.state_dict())
    assert sorted(report.missing) == sorted(decoder_before)  # decoder and head keep their initialisation
    assert any(k.startswith("decoder.") for k in report.missing) and "head.weight" in report.missing
    assert report.unexpected == ["encoder.extra.weight"]
    assert report.ignored == ["model.proj.weight"] and report.shape_mismatched == []
    loaded = model.state_dict()
    for key, value in encoder_state.items():
        assert torch.equal(loaded[key], value), key
    for key, value in decoder_before.items():
        assert torch.equal(loaded[key], value), key
    summary = report.summary()
    assert f"loaded:           {len(encoder_state)}" in summary and "unexpected:       1" in summary
    assert "encoder.extra.weight" in summary and str(path) in summary


def test_a_mapping_that_matches_nothing_raises_with_the_file_name(tmp_path: Path) -> None:
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": with_prefix(resenc_unet("tiny", out_channels=None).state_dict(), "model.vit.")}, path)
    model = resenc_unet("tiny", out_channels=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="no tensor matches") as info:
        load_pretrained(model, path, mapping={"net.encoder.": "encoder."})
    message = str(info.value)
    assert str(path) in message and "model.vit.encoder.stem.conv.weight" in message and "encoder.stem" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_shape_mismatch_is_skipped_and_reported_or_raises_when_strict(tmp_path: Path) -> None:
    path = tmp_path / "two_channels.ckpt"
    torch.save({"state_dict": with_prefix(resenc_unet("tiny", in_channels=2, out_channels=None).state_dict(),
                                          "backbone.")}, path)  # fmt: skip
    model = resenc_unet("tiny", in_channels=1, out_channels=3)
    stem_before = model.state_dict()["encoder.stem.conv.weight"].clone()
    report = load_pretrained(model, path, mapping={"backbone.": ""})
    assert report.shape_mismatched == [("encoder.stem.conv.weight", (4, 2, 3, 3, 3), (4, 1, 3, 3, 3))]
    assert "encoder.stem.conv.weight" in report.missing and "encoder.stem.conv.bias" in report.loaded
    assert torch.equal(model.state_dict()["encoder.stem.conv.weight"], stem_before)
    assert "shape mismatched: 1" in report.summary() and "(4, 2, 3, 3, 3)" in report.summary()

    strict_model = resenc_unet("tiny", in_channels=1, out_channels=3)
    bias_before = strict_model.state_dict()["encoder.stem.conv.bias"].clone()
    with pytest.raises(ValueError, match="encoder.stem.conv.weight") as info:
        load_pretrained(strict_model, path, mapping={"backbone.": ""}, strict_shapes=True)
    assert str(path) in str(info.value)
    assert torch.equal(strict_model.state_dict()["encoder.stem.conv.bias"], bias_before)  # nothing copied


# ---------------------------------------------------------------------------------- real tiny checkpoints


def test_auto_layout_on_a_maesil_checkpoint(maesil_ckpt: Path, caplog) -> None:
    state = raw_state(maesil_ckpt)
    encoder = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.encoder.")}
    model = ViTSegmenter()
    with caplog.at_level(logging.INFO, logger="maesil.checkpoints"):
        report = load_pretrained(model, maesil_ckpt)
    assert report.layout == "maesil"
    assert sorted(report.loaded) == sorted(encoder) and report.missing == ["head.weight", "head.bias"]
    assert report.unexpected == [] and report.shape_mismatched == []
    for key, value in encoder.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert "layout 'maesil'" in caplog.text and "missing:          2" in caplog.text

    bare = ViTEncoder3D(64, token_size=8, in_channels=1, embed_dim=48, depth=2, num_heads=2)  # another size
    report = load_pretrained(bare, maesil_ckpt)
    assert report.layout == "maesil (bare encoder)" and report.missing == []
    assert torch.equal(bare.patch_embed.proj.weight, state["net.encoder.patch_embed.proj.weight"])


def test_auto_layout_on_a_pgl_checkpoint_never_loads_the_ema_target(pgl_ckpt: Path) -> None:
    state = raw_state(pgl_ckpt)
    online = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    target = {k.removeprefix("target_backbone."): v for k, v in state.items() if k.startswith("target_backbone.")}
    assert any(not torch.equal(online[k], target[k]) for k in online), "target equals online: test is void"

    model = ResEncUNet(in_channels=1, out_channels=3, features=(4, 8, 16), blocks_per_stage=(1, 1, 1),
                       strides=(1, 2, 2))  # the "tiny" preset  # fmt: skip
    decoder_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("decoder.")}
    report = load_pretrained(model, pgl_ckpt)  # the default: the encoder only
    assert report.layout == "pgl"
    assert sorted(report.loaded) == sorted(k for k in online if k.startswith("encoder."))
    assert sorted(report.decoder_left_out) == sorted(k for k in state if k.startswith("backbone.decoder."))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in decoder_before.items())
    assert "pretrained decoder left out: " in report.summary()

    report = load_pretrained(model, pgl_ckpt, decoder=True)
    assert sorted(report.loaded) == sorted(online) and report.decoder_left_out == []
    assert any(k.startswith("decoder.") for k in report.loaded)
    assert report.missing == ["head.weight", "head.bias"] and report.unexpected == []
    for key, value in online.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert all(k in report.ignored for k in state if k.startswith("target_"))
    assert "EMA target_* keys, never loaded" in report.summary()


def test_auto_layout_on_a_byol_checkpoint_loads_the_encoder_only(byol_ckpt: Path) -> None:
    state = raw_state(byol_ckpt)
    assert identify_method(state) == "BYOL"  # from the projector's structure alone
    model = resenc_unet("tiny", out_channels=3)
    decoder_before = model.decoder.stages[0][0].conv.weight.clone()
    report = load_pretrained(model, byol_ckpt)
    assert report.layout == "byol"
    assert sorted(report.loaded) == sorted(k.removeprefix("backbone.") for k in state
                                           if k.startswith("backbone.encoder."))  # fmt: skip
    assert all(k.startswith(("decoder.", "head.")) for k in report.missing)
    assert torch.equal(model.decoder.stages[0][0].conv.weight, decoder_before)  # untrained decoder not loaded


def test_a_decoder_requested_from_a_checkpoint_without_a_trained_one_raises_and_loads_nothing(
        byol_ckpt: Path) -> None:
    model = resenc_unet("tiny", out_channels=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=rf"{byol_ckpt.name}: decoder=True .* no pretrained U-Net decoder"):
        load_pretrained(model, byol_ckpt, decoder=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_which_checkpoints_hold_a_trained_decoder(pgl_ckpt: Path, byol_ckpt: Path, maesil_ckpt: Path,
                                                   tmp_path: Path) -> None:
    def holds(path: Path) -> bool:
        return has_trained_decoder(*load_checkpoint_state(path))

    assert holds(pgl_ckpt) and not holds(byol_ckpt) and not holds(maesil_ckpt)
    assert holds(export_encoder(pgl_ckpt, tmp_path / "with.safetensors"))
    assert not holds(export_encoder(pgl_ckpt, tmp_path / "without.safetensors", with_decoder=False))


def test_s3d_checkpoint_transfers_its_decoder_on_request_and_exports_it(tmp_path: Path) -> None:
    from maesil.methods.s3d import S3D

    torch.manual_seed(0)
    module = S3D(unet_preset="tiny", img_size=32, mask_block_size=8)
    path = tmp_path / "s3d.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    model = resenc_unet("tiny", out_channels=3)
    encoder_only = load_pretrained(resenc_unet("tiny", out_channels=3), path)
    assert all(k.startswith(("decoder.", "head.")) for k in encoder_only.missing)
    assert encoder_only.decoder_left_out and all(k.startswith("net.decoder.") for k in encoder_only.decoder_left_out)
    report = load_pretrained(model, path, decoder=True)
    assert report.layout == "s3d"
    assert report.missing == ["head.weight", "head.bias"] and report.unexpected == []
    assert any(k.startswith("net.mask_tokens.") for k in report.ignored)
    assert any(k.startswith("net.densify.") for k in report.ignored)
    assert torch.equal(model.decoder.stages[-1][0].conv.weight, module.net.decoder.stages[-1][0].conv.weight)

    out = export_encoder(path, tmp_path / "s3d.safetensors")
    state, sidecar = load_checkpoint_state(out)
    assert sidecar["method"] == "S3D" and sidecar["includes_decoder"] is True
    assert {k.split(".")[0] for k in state} == {"encoder", "decoder"}
