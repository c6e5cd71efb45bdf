"""nnU-Net hand-off against the real ``dynamic_network_architectures.ResidualEncoderUNet``: the export loads
strictly and computes what maesil's network computes; nnssl checkpoints load into maesil the same way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from maesil.checkpoints import CheckpointError, load_pretrained
from maesil.checkpoints.export_format import EXPORT_FORMAT, EXPORT_FORMAT_VERSION
from maesil.checkpoints.interop_export import export_monai, export_nnunet
from maesil.checkpoints.nnunet_format import (
    KEY_TO_ENCODER,
    KEY_TO_STEM,
    KEYS_TO_IN_PROJ,
    adaptation_plan,
    from_nnunet_state,
    to_nnunet_state,
)
from maesil.models.unet import UNET_PRESETS, ResEncUNet, resenc_unet
from tests.checkpoints.nnunet_reference import load_like_nnssl, nnunet_network

#: A small input per preset: a multiple of the total stride with more than one voxel at the deepest stage.
INPUT = {"cpu": (1, 1, 32, 16, 16), "resenc_l": (1, 1, 64, 32, 32)}


def fake_export(tmp_path: Path, net: ResEncUNet, preset: str, with_decoder: bool, method: str = "PGL") -> Path:
    """A maesil export (safetensors + sidecar) of ``net``'s encoder (and decoder)."""
    prefixes = ("encoder.", "decoder.") if with_decoder else ("encoder.",)
    tensors = {k: v.contiguous() for k, v in net.state_dict().items() if k.startswith(prefixes)}
    path = tmp_path / f"{preset}_{method}.safetensors"
    sidecar = {"format": EXPORT_FORMAT, "format_version": EXPORT_FORMAT_VERSION, "method": method,
               "layout": method.lower(), "architecture": {"type": "ResEncUNet", "unet_preset": preset,
                                                          **UNET_PRESETS[preset], "in_channels": 1},
               "preprocessing": {"modality": "ct", "target_spacing": 1.5, "hu_window": [-175.0, 250.0],
                                 "superpatch_size": 64}}  # fmt: skip
    save_file(tensors, str(path))
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    return path


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("preset", ["cpu", "resenc_l"])
def test_export_loads_into_residual_encoder_unet_and_agrees(preset: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    ours = resenc_unet(preset, out_channels=2).eval()
    path = export_nnunet(fake_export(tmp_path, ours, preset, with_decoder=True), tmp_path / "out")
    assert path == tmp_path / "out" / "maesil_pgl_nnssl.pth"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # as nnU-Net reads it
    plan = checkpoint["nnssl_adaptation_plan"]
    assert plan["key_to_encoder"] == KEY_TO_ENCODER and plan["key_to_stem"] == KEY_TO_STEM
    assert plan["keys_to_in_proj"] == list(KEYS_TO_IN_PROJ) and plan["pretrain_num_input_channels"] == 1
    assert plan["pretrain_plan"]["configurations"]["3d_fullres"]["spacing"] == [1.5, 1.5, 1.5]
    assert plan["recommended_downstream_patchsize"] == [64, 64, 64]

    theirs = nnunet_network(plan)
    if preset == "resenc_l":
        assert sum(p.numel() for p in theirs.encoder.parameters()) == 90_296_576
    load_like_nnssl(theirs, checkpoint)
    result = theirs.load_state_dict(checkpoint["network_weights"], strict=False)  # encoder + decoder
    assert result.unexpected_keys == [] and all(".seg_layers." in k for k in result.missing_keys)
    x = torch.randn(INPUT[preset])
    with torch.no_grad():
        stages = max_diff(ours.encoder(x), theirs.encoder(x))
        assert stages < 1e-5, stages
        if preset == "cpu":  # the decoder's names and maths are the same code for every size: checked once
            theirs.decoder.seg_layers[-1].load_state_dict(ours.head.state_dict())  # the head is never exported
            logits = float((ours(x) - theirs(x)).abs().max())
            assert logits < 1e-5, logits


def test_encoder_only_export_and_nnunets_own_loader(tmp_path: Path) -> None:
    """``nnUNetv2_train -pretrained_weights`` (nnU-Net's own ``load_pretrained_weights``) takes encoder+decoder
    exports and refuses encoder-only ones; the nnssl path takes both."""
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    torch.manual_seed(1)
    ours = resenc_unet("cpu", out_channels=2).eval()
    full = export_nnunet(fake_export(tmp_path, ours, "cpu", with_decoder=True), tmp_path / "full.pth")
    encoder_only = export_nnunet(fake_export(tmp_path, ours, "cpu", with_decoder=False, method="BYOL"),
                                 tmp_path / "byol.pth")
    plan = torch.load(full, weights_only=True)["nnssl_adaptation_plan"]
    theirs = nnunet_network(plan)
    load_pretrained_weights(theirs, str(full))
    x = torch.randn(INPUT["cpu"])
    with torch.no_grad():
        theirs.decoder.seg_layers[-1].load_state_dict(ours.head.state_dict())
        assert float((ours(x) - theirs(x)).abs().max()) < 1e-5

    checkpoint = torch.load(encoder_only, weights_only=True)
    assert not any(k.startswith("decoder.") for k in checkpoint["network_weights"])
    assert json.loads(encoder_only.with_suffix(".json").read_text())["nnunet_pretrained_weights"] is False
    with pytest.raises(AssertionError, match="Key decoder"):
        load_pretrained_weights(nnunet_network(plan), str(encoder_only))
    other = nnunet_network(plan)
    load_like_nnssl(other, checkpoint)
    with torch.no_grad():
        assert max_diff(ours.encoder(x), other.encoder(x)) < 1e-5


@pytest.mark.parametrize("preset", ["cpu", "resenc_l"])
def test_nnssl_checkpoint_loads_into_maesil_and_agrees(preset: str, tmp_path: Path) -> None:
    torch.manual_seed(2)
    plan = adaptation_plan(UNET_PRESETS[preset], {"superpatch_size": 160, "target_spacing": 1.0}, "nnssl")
    theirs = nnunet_network(plan)
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": theirs.state_dict(), "nnssl_adaptation_plan": plan,
                "optimizer_state": {}, "current_epoch": 3}, path)  # fmt: skip
    ours = resenc_unet(preset, out_channels=2).eval()
    encoder_only = load_pretrained(resenc_unet(preset, out_channels=2), path)  # the default, as nnssl fine-tunes
    assert all(k.startswith(("decoder.", "head.")) for k in encoder_only.missing)
    assert encoder_only.decoder_left_out and all(k.startswith("decoder.") for k in encoder_only.decoder_left_out)
    report = load_pretrained(ours, path, decoder=True)
    assert report.layout == "nnssl" and report.missing == ["head.weight", "head.bias"]
    assert report.unexpected == [] and report.shape_mismatched == []
    assert any(".all_modules." in k for k in report.ignored) and any(".seg_layers." in k for k in report.ignored)
    x = torch.randn(INPUT[preset])
    with torch.no_grad():
        stages = max_diff(ours.encoder(x), theirs.encoder(x))
        assert stages < 1e-5, stages
        if preset == "cpu":
            ours.head.load_state_dict(theirs.decoder.seg_layers[-1].state_dict())
            logits = float((ours(x) - theirs(x)).abs().max())
            assert logits < 1e-5, logits


def test_nnssl_stem_is_widened_to_the_models_channels(tmp_path: Path) -> None:
    plan = adaptation_plan(UNET_PRESETS["cpu"], {}, None)
    theirs = nnunet_network(plan)
    path = tmp_path / "pt.pth"
    torch.save({"network_weights": theirs.state_dict(), "nnssl_adaptation_plan": plan}, path)
    ours = resenc_unet("cpu", in_channels=3, out_channels=2)
    load_pretrained(ours, path)
    stem = theirs.encoder.stem.convs[0].conv.weight
    assert torch.allclose(ours.encoder.stem.conv.weight, stem.repeat(1, 3, 1, 1, 1) / 3)
    x = torch.randn(1, 1, 16, 16, 16)  # a constant image in every channel: the widened stem answers as before
    with torch.no_grad():
        assert torch.allclose(ours.encoder.stem.conv(x.repeat(1, 3, 1, 1, 1)), theirs.encoder.stem.convs[0].conv(x),
                              atol=1e-5)


def test_keys_round_trip_both_ways() -> None:
    net = resenc_unet("tiny", out_channels=None)
    state = net.state_dict()
    converted = to_nnunet_state(state)
    back, ignored = from_nnunet_state(converted)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert ignored and all(".all_modules." in k or k.startswith("decoder.encoder.") for k in ignored)
    with pytest.raises(KeyError, match="head.weight"):
        to_nnunet_state({"head.weight": torch.zeros(1, 4, 1, 1, 1)})


def test_another_size_stops_at_the_first_mismatch(tmp_path: Path) -> None:
    plan = adaptation_plan(UNET_PRESETS["cpu"], {}, None)
    path = tmp_path / "cpu.pth"
    torch.save({"network_weights": nnunet_network(plan).state_dict(), "nnssl_adaptation_plan": plan}, path)
    tiny = resenc_unet("tiny", out_channels=2)
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"cpu.pth: .*first encoder.stem.conv.weight: checkpoint "
                                              r"\(16, 1, 3, 3, 3\) vs model \(4, 1, 3, 3, 3\).*Nothing was loaded"):
        load_pretrained(tiny, path)
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())


def test_neither_format_names_the_file_and_the_formats(tmp_path: Path) -> None:
    path = tmp_path / "notes.pt"
    torch.save({"epoch": 3, "notes": "no weights"}, path)
    with pytest.raises(CheckpointError, match=r"notes.pt: .*Accepted: a maesil checkpoint .*nnssl.*MONAI ViT"):
        load_pretrained(resenc_unet("tiny"), path)


def test_format_must_fit_the_architecture(tmp_path: Path) -> None:
    export = fake_export(tmp_path, resenc_unet("tiny"), "tiny", with_decoder=False)
    with pytest.raises(CheckpointError, match="--format monai takes a ViTEncoder3D encoder.*--format nnunet"):
        export_monai(export, tmp_path / "vit.safetensors")
