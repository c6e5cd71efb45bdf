"""Every shipped experiment YAML (pretrain, finetune) parses, alone and with each trainer overlay; bf16 runs on CPU."""

from __future__ import annotations

import pytest
import torch
import yaml

from maesil.cli import main
from maesil.models.parameters import count_parameters
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


def model_init_args(config: dict) -> dict:
    """A YAML's model arguments as the CLI passes them: the superpatch edge from ``data.init_args``, without the
    optimizer and scheduler."""
    init_args = {k: v for k, v in config["model"]["init_args"].items() if k not in ("optimizer", "scheduler")}
    return {**init_args, "superpatch_size": config["data"]["init_args"]["superpatch_size"]}


def test_paper_sized_maesil_config_builds_the_paper_model():
    from maesil.methods import MAESIL

    config = yaml.safe_load((REPO_ROOT / "experiments/pretrain/maesil.yaml").read_text())
    with torch.device("meta"):
        module = MAESIL(**model_init_args(config))
    assert module.superpatch_size == (128, 128, 128) and module.grid == (16, 16, 16)
    assert module.effective_mask_ratio == pytest.approx(0.75)
    assert 42e6 < count_parameters(module.net.encoder) < 44e6  # ViT embed 768, depth 6, plus the 8³ token embedding


# ----------------------------------------------------------------------------------------- the catalogue
def _experiment_dirs():
    return [REPO_ROOT / "experiments" / "pretrain", REPO_ROOT / "experiments" / "finetune"]


def _callbacks(config: dict) -> list[dict]:
    return config.get("trainer", {}).get("callbacks", [])


@pytest.mark.parametrize("folder", _experiment_dirs(), ids=lambda p: p.name)
def test_every_experiment_has_a_paper_sized_yaml_and_a_cpu_demo(folder):
    stems = {path.stem for path in folder.glob("*.yaml")}
    paper = {stem for stem in stems if not stem.endswith("_demo")}
    demos = {stem.removesuffix("_demo") for stem in stems if stem.endswith("_demo")}
    assert paper == demos, f"unpaired in {folder}: {sorted(paper ^ demos)}"


def test_the_catalogue_holds_selfmedmae_and_mri():
    names = {path.stem for path in METHOD_CONFIGS}
    assert {"selfmedmae", "selfmedmae_demo", "maesil_mri", "maesil_mri_demo"} <= names


@pytest.mark.parametrize("config", METHOD_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_experiment_is_seeded_checkpoints_periodically_and_resumes(config):
    raw = yaml.safe_load(config.read_text())
    assert isinstance(raw.get("seed_everything"), int)
    checkpoints = [c for c in _callbacks(raw) if c["class_path"].endswith("ModelCheckpoint")]
    assert len(checkpoints) == 1
    args = checkpoints[0].get("init_args", {})
    assert isinstance(args.get("every_n_train_steps"), int) and args["every_n_train_steps"] > 0
    assert args.get("save_last") is True  # `--ckpt_path last` finds it
    assert raw["trainer"]["default_root_dir"].startswith("runs/")


def test_run_folders_are_distinct():
    folders = [yaml.safe_load(path.read_text())["trainer"]["default_root_dir"] for path in METHOD_CONFIGS]
    assert len(folders) == len(set(folders)), sorted(folders)


def test_selfmedmae_config_is_the_paper_mae_and_matches_its_unetr_finetuning():
    from maesil.methods import MAESIL
    from maesil.models.unetr import UNETR_PRESETS

    config = yaml.safe_load((REPO_ROOT / "experiments/pretrain/selfmedmae.yaml").read_text())
    init_args = model_init_args(config)
    with torch.device("meta"):
        module = MAESIL(**init_args)
    assert module.superpatch_size == (96, 96, 96) and module.grid == (6, 6, 6)
    assert module.masking == "random" and module.effective_mask_ratio == pytest.approx(0.75)
    assert module.net.norm_pix_loss
    assert 85e6 < count_parameters(module.net.encoder) < 90e6  # ViT-B: 12 blocks of 7.1 M plus the 16³ token embedding

    scaling = [c for c in _callbacks(config) if c["class_path"] == "maesil.callbacks.LinearLRScaling"]
    assert scaling and scaling[0]["init_args"]["base_batch_size"] == 256
    lr = config["model"]["init_args"]["optimizer"]["init_args"]["lr"]
    assert lr * config["data"]["init_args"]["batch_size"] / 256 == pytest.approx(1.5e-4)  # SelfMedMAE's 1-GPU rate

    finetune = yaml.safe_load((REPO_ROOT / "experiments/finetune/unetr.yaml").read_text())
    preset = UNETR_PRESETS[finetune["model"]["init_args"]["preset"]]
    for key in ("superpatch_size", "token_size", "embed_dim", "depth", "num_heads"):
        assert preset[key] == init_args[key], key
    assert tuple(preset["skip_layers"]) == (3, 6, 9)
    for key in ("superpatch_size", "target_spacing", "hu_window", "modality"):
        assert finetune["data"]["init_args"][key] == config["data"]["init_args"][key], key


@pytest.mark.parametrize("name", ["maesil_mri", "maesil_mri_demo"])
def test_mri_configs_z_normalise_and_score_beyond_the_unit_range(name):
    config = yaml.safe_load((REPO_ROOT / f"experiments/pretrain/{name}.yaml").read_text())
    data = config["data"]["init_args"]
    assert data["modality"] == "mri" and "hu_window" not in data
    assert config["model"]["init_args"]["metric_data_range"] > 1.0


def _tiny_args(config_name: str, data_dir, run_dir) -> list[str]:
    """tiny_maesil_args (a seconds-long run) with another demo YAML underneath."""
    args = tiny_maesil_args(data_dir, run_dir, max_steps=2)
    assert args[0] == "--config"
    args[1] = str(REPO_ROOT / "experiments" / "pretrain" / f"{config_name}.yaml")
    return args


def _first_group(run_dir) -> tuple[dict, dict]:
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return checkpoint, checkpoint["optimizer_states"][0]["param_groups"][0]


def test_selfmedmae_demo_runs_with_the_linear_scaling_rule(tiny_ct_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    main(["fit", *_tiny_args("selfmedmae_demo", tiny_ct_dir, run_dir)])
    assert "lr scaled by 2/256 = 0.00781 (linear scaling rule, base batch 256" in capsys.readouterr().out
    checkpoint, group = _first_group(run_dir)
    assert checkpoint["global_step"] == 2
    assert checkpoint["hyper_parameters"]["masking"] == "random"
    assert group["initial_lr"] == pytest.approx(6.4e-2 * 2 / 256)  # the YAML's base lr × batch 2 / 256


def test_maesil_mri_demo_runs_z_normalised(tiny_ct_dir, tmp_path):
    run_dir = tmp_path / "run"
    main(["fit", *_tiny_args("maesil_mri_demo", tiny_ct_dir, run_dir)])
    checkpoint, group = _first_group(run_dir)
    assert checkpoint["global_step"] == 2
    assert checkpoint["datamodule_hyper_parameters"]["modality"] == "mri"
    assert group["initial_lr"] == pytest.approx(1.0e-3)  # no LinearLRScaling: the YAML's lr as it is
