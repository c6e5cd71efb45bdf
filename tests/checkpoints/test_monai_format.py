"""MONAI hand-off against the real ``monai.networks.nets.ViT`` / ``UNETR``: maesil's ViT exports load strictly and
give the same tokens; MONAI state dicts load into maesil's encoder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.networks.nets import UNETR, ViT
from safetensors.torch import load_file, save_file

from maesil.checkpoints import CheckpointError, load_pretrained
from maesil.checkpoints.export_format import EXPORT_FORMAT, EXPORT_FORMAT_VERSION
from maesil.checkpoints.interop_export import export_monai, export_nnunet
from maesil.checkpoints.monai_format import POSITION_KEY, maesil_positions
from maesil.models.vit3d import ViTEncoder3D
from tests.checkpoints.tiny_runs import ViTSegmenter, raw_state


class EncoderHolder(torch.nn.Module):
    """A downstream network with the encoder at ``encoder`` (as UNETR holds it)."""

    def __init__(self, encoder: ViTEncoder3D) -> None:
        super().__init__()
        self.encoder = encoder

#: SelfMedMAE's layout (16³ tokens, 12 blocks: what MONAI's UNETR builds), narrow so that the test is fast.
SELFMEDMAE = dict(superpatch_size=32, token_size=16, embed_dim=48, depth=12, num_heads=4, mlp_ratio=4.0, in_channels=1)


def vit_export(tmp_path: Path, encoder: ViTEncoder3D, architecture: dict) -> Path:
    path = tmp_path / "selfmedmae.safetensors"
    save_file({"encoder." + k: v.contiguous() for k, v in encoder.state_dict().items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps({
        "format": EXPORT_FORMAT, "format_version": EXPORT_FORMAT_VERSION, "method": "MAESIL", "layout": "maesil",
        "architecture": {"type": "ViTEncoder3D", **architecture}, "preprocessing": {}}))  # fmt: skip
    return path


def token_difference(ours: ViTEncoder3D, theirs: ViT, x: torch.Tensor) -> tuple[float, float]:
    """Max abs difference of the final tokens and of the hidden states, relative to their scale."""
    with torch.no_grad():
        a, hidden_a = ours(x, return_hidden_states=True)
        b, hidden_b = theirs(x)
    hidden = max(float((p - q).abs().max() / p.abs().max()) for p, q in zip(hidden_a, hidden_b))
    return float((a - b).abs().max()), hidden


def test_maesil_export_loads_into_monai_vit_and_agrees(maesil_ckpt: Path, tmp_path: Path) -> None:
    path = export_monai(maesil_ckpt, tmp_path)
    assert path.name == "maesil_maesil_monai_vit.safetensors"
    info = json.loads(path.with_suffix(".json").read_text())
    kwargs = info["monai_vit_kwargs"]
    assert kwargs["pos_embed_type"] == "sincos" and kwargs["qkv_bias"] is True and info["monai_unetr_kwargs"] is None
    theirs = ViT(**kwargs).eval()
    theirs.load_state_dict(load_file(str(path)), strict=True)
    ours = ViTSegmenter(superpatch_size=32)
    online = {k.removeprefix("net."): v for k, v in raw_state(maesil_ckpt).items() if k.startswith("net.encoder.")}
    ours.load_state_dict(online, strict=False)
    torch.manual_seed(0)
    tokens, hidden = token_difference(ours.encoder.eval(), theirs, torch.randn(2, 1, 32, 32, 32))
    assert tokens < 1e-5 and hidden < 1e-5, (tokens, hidden)


def test_selfmedmae_export_loads_into_monai_unetr_vit(tmp_path: Path) -> None:
    torch.manual_seed(1)
    encoder = ViTEncoder3D(**SELFMEDMAE).eval()
    path = export_monai(vit_export(tmp_path, encoder, SELFMEDMAE), tmp_path / "out" / "vit.safetensors")
    info = json.loads(path.with_suffix(".json").read_text())
    unetr = UNETR(out_channels=3, feature_size=16, **info["monai_unetr_kwargs"]).eval()
    unetr.vit.load_state_dict(load_file(str(path)), strict=True)
    tokens, hidden = token_difference(encoder, unetr.vit, torch.randn(2, 1, 32, 32, 32))
    assert tokens < 1e-5 and hidden < 1e-5, (tokens, hidden)
    # MONAI's own sin-cos table orders the axis groups (y, x, z); the export carries maesil's (x, y, z).
    own = ViT(**info["monai_vit_kwargs"]).patch_embedding.position_embeddings
    assert float((own - maesil_positions(SELFMEDMAE)).abs().max()) > 0.5


def test_monai_state_dicts_load_into_maesil(tmp_path: Path) -> None:
    torch.manual_seed(2)
    unetr = UNETR(in_channels=1, out_channels=2, img_size=32, feature_size=16, hidden_size=48, mlp_dim=192,
                  num_heads=4, qkv_bias=True).eval()
    path = tmp_path / "unetr.pt"
    torch.save(unetr.state_dict(), path)
    ours = EncoderHolder(ViTEncoder3D(32, token_size=16, embed_dim=48, depth=12, num_heads=4).eval())
    report = load_pretrained(ours, path)
    assert report.layout == "monai" and report.missing == [] and report.unexpected == []
    assert "vit." + POSITION_KEY in report.ignored and any(k.startswith("decoder") for k in report.ignored)
    # the learnable MONAI table is not maesil's sin-cos one: the positions differ, everything else is the same
    with torch.no_grad():
        unetr.vit.patch_embedding.position_embeddings.copy_(maesil_positions(SELFMEDMAE))
    tokens, _ = token_difference(ours.encoder, unetr.vit, torch.randn(1, 1, 32, 32, 32))
    assert tokens < 1e-5, tokens


def test_monai_vit_of_another_size_stops(tmp_path: Path) -> None:
    vit = ViT(1, 32, 8, hidden_size=48, mlp_dim=192, num_layers=2, num_heads=2, qkv_bias=True)
    path = tmp_path / "vit.pt"
    torch.save(vit.state_dict(), path)
    wider = EncoderHolder(ViTEncoder3D(32, token_size=8, embed_dim=64, depth=2, num_heads=2))
    with pytest.raises(CheckpointError, match=r"vit.pt: .*monai weights.*first encoder.patch_embed.proj.weight: "
                                              r"checkpoint \(48, 1, 8, 8, 8\) vs model \(64, 1, 8, 8, 8\)"):
        load_pretrained(wider, path)


def test_vit_checkpoint_refuses_the_nnunet_format(maesil_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="--format nnunet takes a ResEncUNet encoder.*--format monai"):
        export_nnunet(maesil_ckpt, tmp_path)
