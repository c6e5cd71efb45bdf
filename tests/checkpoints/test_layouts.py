"""Transfer layouts: declared by each method, found by class path or by the keys of old checkpoints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import maesil.checkpoints.layouts as layouts
from maesil.checkpoints import (
    CheckpointError,
    TransferLayout,
    check_preprocessing,
    export_encoder,
    identify_method,
    load_checkpoint_state,
    load_pretrained,
    registered_layouts,
)
from maesil.checkpoints.layouts import any_key_starts_with, method_layouts, transferable_layouts
from maesil.models.unet import resenc_unet
from tests.helpers import REPO_ROOT

def test_checkpoint_metadata_and_the_pgl_layout_registry(pgl_ckpt: Path) -> None:
    state, metadata = load_checkpoint_state(pgl_ckpt)
    assert metadata["hyper_parameters"]["_class_path"] == "maesil.methods.PGL"
    assert metadata["datamodule_hyper_parameters"]["target_spacing"] == 4.0
    assert identify_method(state, metadata) == "PGL"
    assert registered_layouts()["PGL"].prefixes == {"backbone.encoder.": "encoder.", "backbone.decoder.": "decoder."}
    assert check_preprocessing(metadata, modality="ct", target_spacing=4.0, superpatch_size=32) == []
    assert check_preprocessing(metadata, target_spacing=2.0) == ["pretrained at 4 mm spacing, fine-tuning at 2 mm"]



def test_every_method_declares_its_layout() -> None:
    found = {name: (dict(layout.prefixes), layout.network, dict(layout.untrained))
             for name, layout in method_layouts().items()}
    assert {name: found[name] for name in ("MAESIL", "PGL", "BYOL", "S3D", "AE", "VAE", "VQVAE")} == {
        "MAESIL": ({"net.encoder.": "encoder."}, "vit", {}),
        "PGL": ({"backbone.encoder.": "encoder.", "backbone.decoder.": "decoder."}, "resenc", {}),
        "BYOL": ({"backbone.encoder.": "encoder."}, "resenc", {"backbone.decoder.": "decoder."}),
        "S3D": ({"net.encoder.": "encoder.", "net.decoder.": "decoder."}, "resenc", {}),
        "AE": ({}, "none", {}),
        "VAE": ({}, "none", {}),
        "VQVAE": ({}, "none", {}),
    }
    assert "Segmentation" not in found  # fine-tuning checkpoints declare no layout
    assert set(transferable_layouts()) >= {"MAESIL", "PGL", "BYOL", "S3D"}
    assert not {"AE", "VAE", "VQVAE"} & set(transferable_layouts())


def _keys(*names: str, projector_ndim: int = 2) -> dict[str, torch.Tensor]:
    return {name: torch.zeros((1,) * (projector_ndim if name == "projector.0.weight" else 1)) for name in names}


@pytest.mark.parametrize(("state", "method"), [
    (_keys("net.encoder.patch_embed.proj.weight", "net.decoder_embed.weight"), "MAESIL"),
    (_keys("net.encoder.stem.conv.weight", "net.mask_tokens.0"), "S3D"),
    (_keys("net.encoder.stem.conv.weight", "net.densify.0.weight"), "S3D"),
    (_keys("backbone.encoder.stem.conv.weight", "projector.0.0.weight"), "PGL"),
    (_keys("backbone.encoder.stem.conv.weight", "projector.0.weight"), "BYOL"),
    (_keys("backbone.encoder.stem.conv.weight", "projector.0.weight", projector_ndim=5), None),
    (_keys("net.encoder.0.weight", "net.quantizer.embedding"), "VQVAE"),
    (_keys("net.encode.conv.weight", "net.mu.weight"), "VAE"),
    (_keys("net.encode.conv.weight", "net.decode.conv.weight"), "AE"),
    (_keys("model.layer.weight"), None),
], ids=["maesil", "s3d_tokens", "s3d_densify", "pgl", "byol", "conv_projector", "vqvae", "vae", "ae", "unknown"])
def test_checkpoints_without_class_path_are_recognised_by_their_keys(state, method) -> None:
    assert identify_method(state) == method
    assert identify_method(state, {"hyper_parameters": {}}) == method


def test_the_named_class_wins_over_the_keys() -> None:
    vit = _keys("net.encoder.patch_embed.proj.weight")
    assert identify_method(vit, {"hyper_parameters": {"_class_path": "maesil.methods.VQVAE"}}) == "VQVAE"
    assert identify_method(vit, {"method": "S3D", "format": "maesil-encoder"}) == "S3D"
    # A class without a layout (a fine-tuned UNETR, a user's method): the keys decide, else its name stays.
    assert identify_method(vit, {"hyper_parameters": {"_class_path": "maesil.methods.Segmentation"}}) == "MAESIL"
    unknown = _keys("model.layer.weight")
    assert identify_method(unknown, {"hyper_parameters": {"_class_path": "lab.MyMethod"}}) == "MyMethod"


def test_a_new_method_registers_its_layout_by_being_defined(tmp_path: Path, monkeypatch) -> None:
    """Defining the class is all it takes: loading and export find the layout through the class path."""
    from maesil.methods import MAESIL
    from maesil.methods.base import MethodModule

    monkeypatch.setattr(layouts, "_LAYOUTS", dict(layouts._LAYOUTS))  # forget the toy classes afterwards

    class ToyUNetMethod(MethodModule):
        transfer_layout = TransferLayout(prefixes={"toy.unet.encoder.": "encoder."}, network="resenc",
                                         recognise=lambda state: any_key_starts_with(state, "toy."))

    class WiderMAESIL(MAESIL):  # inherits MAESIL's layout
        pass

    class BroadMethod(MethodModule):  # recognises more than its own checkpoints
        transfer_layout = TransferLayout(prefixes={"net.encoder.": "encoder."}, network="resenc",
                                         recognise=lambda state: any_key_starts_with(state, "net."))

    assert registered_layouts()["ToyUNetMethod"] is ToyUNetMethod.transfer_layout
    assert registered_layouts()["WiderMAESIL"] is MAESIL.transfer_layout
    # Without a class path, the first class defined whose layout recognises the keys: maesil's own come first.
    assert identify_method(_keys("net.encoder.patch_embed.proj.weight")) == "MAESIL"
    assert identify_method(_keys("net.encoder.0.weight", "net.quantizer.embedding")) == "VQVAE"
    assert identify_method(_keys("net.encoder.stem.conv.weight")) == "BroadMethod"

    torch.manual_seed(0)
    encoder = {k: v for k, v in resenc_unet("tiny", out_channels=None).state_dict().items() if k.startswith("encoder.")}
    path = tmp_path / "toy.ckpt"
    torch.save({"state_dict": {"toy.unet." + k: v for k, v in encoder.items()},
                "hyper_parameters": {"_class_path": f"{__name__}.ToyUNetMethod"}}, path)
    model = resenc_unet("tiny", out_channels=2)
    report = load_pretrained(model, path)
    assert report.layout == "toyunetmethod" and sorted(report.loaded) == sorted(encoder)
    out = export_encoder(path, tmp_path / "toy.safetensors")
    exported, sidecar = load_checkpoint_state(out)
    assert sidecar["method"] == "ToyUNetMethod" and sidecar["layout"] == "toyunetmethod"
    assert sidecar["architecture"]["type"] == "ResEncUNet" and set(exported) == set(encoder)


def test_a_method_without_transferable_encoder_is_named_in_the_error(tmp_path: Path) -> None:
    path = tmp_path / "vae.ckpt"
    torch.save({"state_dict": _keys("net.encode.conv.weight", "net.mu.weight")}, path)
    with pytest.raises(CheckpointError, match="a VAE checkpoint has no known encoder to transfer") as info:
        load_pretrained(resenc_unet("tiny"), path)
    assert "'MAESIL'" in str(info.value) and "'PGL'" in str(info.value)  # the methods that do transfer
    with pytest.raises(CheckpointError, match="a VAE checkpoint has no known encoder"):
        export_encoder(path, tmp_path / "vae.safetensors")


def test_the_methods_register_themselves_when_only_the_checkpoints_are_imported() -> None:
    """``maesil.checkpoints`` does not import ``maesil.methods``; a lookup imports it (importlib) first."""
    script = (
        "import sys\n"
        "from maesil.checkpoints import identify_method\n"
        "assert 'maesil.methods' not in sys.modules, 'maesil.checkpoints imported the methods'\n"
        "print(identify_method({'backbone.encoder.x': None, 'projector.0.0.weight': None}))\n"
        "assert 'maesil.methods' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "PGL"
