"""Every shipped experiment YAML (pretrain, finetune) parses, alone and with each trainer overlay; bf16 runs on CPU."""

from __future__ import annotations

import pytest
import torch
import yaml

from maesil.cli import main
from tests.helpers import REPO_ROOT, tiny_maesil_args

METHOD_CONFIGS = sorted([*(REPO_ROOT / "experiments" / "pretrain").glob("*.yaml"),
                         *(REPO_ROOT / "experiments" / "finetune").glob("*.yaml")])
TRAINER_OVERLAYS = sorted((REPO_ROOT / "experiments" / "trainer").glob("*.yaml"))


@pytest.mark.parametrize("overlay", [None, *TRAINER_OVERLAYS], ids=lambda p: p.name if p else "alone")
@pytest.mark.parametrize("config", METHOD_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_experiment_configs_parse(config, overlay, capsys):
    args = ["fit", "--config", str(config)] + (["--config", str(overlay)] if overlay else []) + ["--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["model"]["class_path"].startswith("maesil.")
    assert resolved["trainer"]["use_distributed_sampler"] is False


def test_bf16_mixed_precision_trains_on_cpu(tiny_ct_dir, tmp_path):
    run_dir = tmp_path / "run"
    main(["fit", *tiny_maesil_args(tiny_ct_dir, run_dir, max_steps=2), "--trainer.precision", "bf16-mixed"])
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2
    assert all(value.dtype == torch.float32 for value in checkpoint["state_dict"].values() if value.is_floating_point())


def test_paper_sized_maesil_config_builds_the_paper_model():
    from maesil.methods import MAESIL

    config = yaml.safe_load((REPO_ROOT / "experiments/pretrain/maesil.yaml").read_text())
    init_args = {k: v for k, v in config["model"]["init_args"].items() if k not in ("optimizer", "scheduler")}
    with torch.device("meta"):
        module = MAESIL(**init_args)
    assert module.img_size == (128, 128, 128) and module.grid == (16, 16, 16)
    assert module.effective_mask_ratio == pytest.approx(0.75)
    encoder_params = sum(p.numel() for p in module.net.encoder.parameters())
    assert 42e6 < encoder_params < 44e6  # ViT embed 768, depth 6, plus the 8³ patch embedding
