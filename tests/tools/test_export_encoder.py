"""``python -m maesil export-encoder``: safetensors + JSON sidecar from real tiny checkpoints, clear failures."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from maesil.checkpoints import check_preprocessing, export_encoder, load_checkpoint_state, load_pretrained
from maesil.cli import main
from maesil.models.unet import resenc_unet
from tests.checkpoints.tiny_runs import ViTSegmenter, raw_state, tiny_checkpoint


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(["export-encoder", *argv])
    captured = capsys.readouterr()
    return int(info.value.code), captured.out, captured.err


@pytest.fixture
def checkpoint(tiny_ct_dir: Path, tmp_path_factory) -> Callable[[str], Path]:
    """``checkpoint("pgl")``: a one-step CLI run's last.ckpt, shared with tests/checkpoints."""
    root = tmp_path_factory.getbasetemp() / "tiny_checkpoints"
    return lambda method: tiny_checkpoint(method, tiny_ct_dir, root)


@pytest.fixture
def pgl_ckpt(checkpoint) -> Path:
    return checkpoint("pgl")


def test_pgl_export_end_to_end(pgl_ckpt: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "enc.safetensors"
    code, stdout, _ = _run(capsys, str(pgl_ckpt), "--out", str(out))
    assert code == 0
    state = raw_state(pgl_ckpt)
    online = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    exported = load_file(str(out))
    assert set(exported) == set(online)  # encoder + decoder; no target_, projector, predictor
    assert {k.split(".")[0] for k in exported} == {"encoder", "decoder"}
    parameters = sum(v.numel() for v in exported.values())
    sidecar = tmp_path / "enc.json"
    assert f"{len(exported)} tensors" in stdout and f"{parameters:,} parameters" in stdout
    assert f"sidecar: {sidecar}" in stdout

    model = resenc_unet("tiny", out_channels=3)
    report = load_pretrained(model, out, decoder=True)
    assert report.layout == "exported" and report.missing == ["head.weight", "head.bias"]
    for key, value in online.items():
        assert torch.equal(model.state_dict()[key], value), key

    info = json.loads(sidecar.read_text())
    assert info["format"] == "maesil-encoder" and info["format_version"] == 1
    assert info["method"] == "PGL" and info["source_checkpoint"] == str(pgl_ckpt.resolve())
    assert info["architecture"] == {"type": "ResEncUNet", "unet_preset": "tiny", "features": [4, 8, 16],
                                    "blocks_per_stage": [1, 1, 1], "strides": [1, 2, 2], "kernel_size": 3,
                                    "in_channels": 1}  # fmt: skip
    assert info["preprocessing"] == {"modality": "ct", "target_spacing": 4.0, "hu_window": [-175.0, 250.0],
                                     "superpatch_size": 32, "crop_foreground": True}  # fmt: skip
    assert info["tensors"] == {"encoder": sum(k.startswith("encoder.") for k in online),
                               "decoder": sum(k.startswith("decoder.") for k in online), "total": len(online)}
    assert info["parameters"] == parameters
    with safe_open(str(out), framework="pt") as handle:  # the description travels inside the file too
        assert json.loads(handle.metadata()["maesil"]) == info
    _, metadata = load_checkpoint_state(out)
    assert check_preprocessing(metadata, target_spacing=2.0) == ["pretrained at 4 mm spacing, fine-tuning at 2 mm"]


def test_no_decoder_flag_drops_the_decoder(pgl_ckpt: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "enc_only.safetensors"
    code, stdout, _ = _run(capsys, str(pgl_ckpt), "--out", str(out), "--no-decoder")
    exported = load_file(str(out))
    assert code == 0 and exported and all(k.startswith("encoder.") for k in exported)
    assert f"{len(exported)} tensors (encoder {len(exported)})," in stdout  # no decoder count printed
    assert json.loads((tmp_path / "enc_only.json").read_text())["includes_decoder"] is False


def test_byol_exports_no_decoder_by_default(checkpoint, tmp_path: Path, caplog) -> None:
    ckpt = checkpoint("byol")
    exported = load_file(str(export_encoder(ckpt, tmp_path / "byol.safetensors")))
    assert exported and all(k.startswith("encoder.") for k in exported)
    with caplog.at_level(logging.WARNING, logger="maesil.checkpoints"):
        forced = load_file(str(export_encoder(ckpt, tmp_path / "byol_all.safetensors", with_decoder=True)))
    assert any(k.startswith("decoder.") for k in forced) and "random initialisation" in caplog.text


def test_maesil_export_describes_the_vit(checkpoint, tmp_path: Path) -> None:
    ckpt = checkpoint("maesil")
    out = export_encoder(ckpt, tmp_path / "vit.safetensors")
    exported = load_file(str(out))
    state = raw_state(ckpt)
    assert set(exported) == {k.removeprefix("net.") for k in state if k.startswith("net.encoder.")}
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["architecture"] == {"type": "ViTEncoder3D", "superpatch_size": 32, "token_size": 8, "embed_dim": 48,
                                    "depth": 2, "num_heads": 2, "mlp_ratio": 4.0, "in_channels": 1}  # fmt: skip
    model = ViTSegmenter()
    load_pretrained(model, out)
    assert torch.equal(model.encoder.blocks[1].mlp.fc1.weight, state["net.encoder.blocks.1.mlp.fc1.weight"])
    with pytest.raises(ValueError, match="no U-Net decoder"):
        export_encoder(ckpt, tmp_path / "vit2.safetensors", with_decoder=True)


def test_bad_inputs_exit_1_with_the_file_named(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nope.ckpt"
    code, _, err = _run(capsys, str(missing), "--out", str(tmp_path / "e.safetensors"))
    assert code == 1 and str(missing) in err and "Traceback" not in err

    text = tmp_path / "notes.ckpt"
    text.write_text("hello\n")
    code, _, err = _run(capsys, str(text), "--out", str(tmp_path / "e.safetensors"))
    assert code == 1 and str(text) in err and "neither a PyTorch checkpoint" in err

    baseline = tmp_path / "vqvae.ckpt"
    torch.save({"state_dict": {"net.encoder.0.weight": torch.ones(2), "net.quantizer.embedding": torch.ones(2)},
                "hyper_parameters": {"_class_path": "maesil.methods.VQVAE"}}, baseline)  # fmt: skip
    code, _, err = _run(capsys, str(baseline), "--out", str(tmp_path / "e.safetensors"))
    assert code == 1 and str(baseline) in err and "VQVAE checkpoint has no known encoder" in err

    unknown = tmp_path / "unknown.ckpt"
    torch.save({"state_dict": {"model.layer.weight": torch.ones(2)}}, unknown)
    code, _, err = _run(capsys, str(unknown), "--out", str(tmp_path / "e.safetensors"))
    assert code == 1 and str(unknown) in err and "no known encoder" in err

    code, _, err = _run(capsys, str(text), "--out", str(tmp_path / "e.pt"))
    assert code == 1 and "must end in .safetensors" in err
    assert not list(tmp_path.glob("e.*"))


@pytest.mark.parametrize("method", ["pgl", "byol"])
def test_nnunet_format_from_the_command_line(method: str, checkpoint, tmp_path: Path, capsys) -> None:
    """PGL's export carries its decoder, BYOL's only the encoder; both load strictly into the real
    ResidualEncoderUNet nnU-Net builds from the plan."""
    from tests.checkpoints.nnunet_reference import load_like_nnssl, nnunet_network

    ckpt = checkpoint(method)
    code, stdout, _ = _run(capsys, str(ckpt), "--format", "nnunet", "--out", str(tmp_path))
    out = tmp_path / f"maesil_{method}_nnssl.pth"
    assert code == 0 and f"{out}: nnssl checkpoint" in stdout
    content = torch.load(out, weights_only=True)
    weights = content["network_weights"]
    assert any(k.startswith("decoder.transpconvs.") for k in weights) == (method == "pgl")
    network = nnunet_network(content["nnssl_adaptation_plan"])
    load_like_nnssl(network, content)
    ours = resenc_unet("tiny", out_channels=None).eval()
    online = {k.removeprefix("backbone."): v for k, v in raw_state(ckpt).items() if k.startswith("backbone.")}
    ours.load_state_dict(online)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        difference = max(float((a - b).abs().max()) for a, b in zip(ours.encoder(x), network.encoder(x)))
    assert difference < 1e-5


def test_monai_format_from_the_command_line(checkpoint, tmp_path: Path, capsys) -> None:
    out = tmp_path / "vit.safetensors"
    code, stdout, _ = _run(capsys, str(checkpoint("maesil")), "--format", "monai", "--out", str(out))
    assert code == 0 and f"{out}: MONAI ViT state dict" in stdout
    assert json.loads(out.with_suffix(".json").read_text())["monai_vit_kwargs"]["num_layers"] == 2
    code, _, stderr = _run(capsys, str(checkpoint("pgl")), "--format", "monai", "--out", str(out))
    assert code == 1 and "--format monai takes a ViTEncoder3D encoder" in stderr
