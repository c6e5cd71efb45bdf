"""Continued pretraining: ``pretrained:`` of a pretraining method loads an encoder (nnssl, MONAI or maesil's own)
into the network that method's checkpoints transfer from, at the start of ``fit`` only."""

from __future__ import annotations

from pathlib import Path

import torch
from monai.networks.nets import ViT

from maesil.checkpoints.nnunet_format import adaptation_plan
from maesil.cli import main
from maesil.methods import MAESIL, PGL
from maesil.models.unet import UNET_PRESETS
from tests.checkpoints.nnunet_reference import nnunet_network
from tests.checkpoints.tiny_runs import raw_state, tiny_checkpoint
from tests.methods.test_pgl import tiny_args


def nnssl_file(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    plan = adaptation_plan(UNET_PRESETS["tiny"], {}, None)
    network = nnunet_network(plan)
    path = tmp_path / "tiny_nnssl.pth"
    torch.save({"network_weights": network.state_dict(), "nnssl_adaptation_plan": plan}, path)
    return path, network


def test_pgl_continues_from_an_nnssl_checkpoint(tmp_path: Path) -> None:
    path, network = nnssl_file(tmp_path)
    module = PGL(unet_preset="tiny", num_scales=2, pretrained=str(path))
    report = module.load_pretrained_encoder(path)
    assert report.layout == "nnssl" and report.missing == [] and report.unexpected == []
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        theirs = network.encoder(x)
        for net in (module.backbone, module.target_backbone):  # the EMA target starts from the loaded weights
            difference = max(float((a - b).abs().max()) for a, b in zip(net.eval().encoder(x), theirs))
            assert difference < 1e-5


def test_maesil_continues_from_a_monai_vit(tmp_path: Path) -> None:
    vit = ViT(1, 32, 8, hidden_size=48, mlp_dim=192, num_layers=2, num_heads=2, qkv_bias=True).eval()
    path = tmp_path / "vit.pt"
    torch.save(vit.state_dict(), path)
    module = MAESIL(superpatch_size=32, embed_dim=48, depth=2, num_heads=2, decoder_embed_dim=48, decoder_depth=1,
                    decoder_num_heads=2)
    report = module.load_pretrained_encoder(path)
    assert report.layout == "monai" and not any(k.startswith("encoder.") for k in report.missing)
    assert torch.equal(module.net.encoder.blocks[1].attn.qkv.weight, vit.blocks[1].attn.qkv.weight)


def test_fit_loads_pretrained_once(tiny_ct_dir: Path, tmp_path: Path, capsys) -> None:
    """A run with ``pretrained`` prints the report at its start; resuming it with --ckpt_path does not reload."""
    source = tiny_checkpoint("pgl", tiny_ct_dir, tmp_path.parent / "tiny_checkpoints_continued")
    args = [*tiny_args("pgl", tiny_ct_dir, tmp_path / "run", max_steps=1), "--model.init_args.num_scales", "2",
            "--model.init_args.pretrained", str(source), "--trainer.limit_val_batches", "0"]
    main(["fit", *args])
    out = capsys.readouterr().out
    assert f"continued pretraining from {source}" in out and "layout 'pgl'" in out
    assert "pretrained decoder left out" not in out  # the pretext task continues with its own decoder
    state = raw_state(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert any(k.startswith("backbone.encoder.") for k in state)
    main(["fit", *[a if a != "1" else "2" for a in args], "--ckpt_path", "last"])
    assert "continued pretraining" not in capsys.readouterr().out
