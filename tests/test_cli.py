"""``python -m maesil`` end to end through the real LightningCLI and the demo YAML."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch
import yaml

from maesil.cli import main
from maesil.data.records import DataError
from tests.helpers import REPO_ROOT, tiny_maesil_args


def read_metrics(run_dir) -> list[dict[str, str]]:
    [metrics_file] = sorted(run_dir.glob("logs/version_*/metrics.csv"))[-1:]
    with open(metrics_file) as handle:
        return list(csv.DictReader(handle))


def test_fit_runs_through_cli_and_writes_outputs(tiny_ct_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    main(["fit", *tiny_maesil_args(tiny_ct_dir, run_dir, max_steps=4)])

    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 4
    rows = read_metrics(run_dir)
    psnr = [float(r["val/psnr_masked"]) for r in rows if r.get("val/psnr_masked")]
    assert len(psnr) == 2 and all(0 < value < 100 for value in psnr)
    assert any(r.get("train/loss") for r in rows)
    pictures = sorted((run_dir / "logs").glob("version_*/reconstructions/step_*.png"))
    assert [p.name for p in pictures] == ["step_0000002.png", "step_0000004.png"]
    saved = yaml.safe_load((run_dir / "logs" / "version_0" / "config.yaml").read_text())
    assert saved["model"]["init_args"]["masking"] == "dual"
    summary = capsys.readouterr().out
    assert "== run summary ==" in summary and "val/psnr_masked" in summary and "last.ckpt" in summary
    # The reference fills on the same masks, beside the model, and the training time.
    blur = [float(r["val/psnr_masked_blur_fill"]) for r in rows if r.get("val/psnr_masked_blur_fill")]
    assert len(blur) == 2 and blur[0] == blur[1]
    assert f"blur fill on the same masks: {blur[-1]:.4f} (model {psnr[-1] - blur[-1]:+.4f})" in summary
    assert "mean fill on the same masks:" in summary and "training time:" in summary
    record = json.loads((run_dir / "summary.json").read_text())
    assert [step for step, _ in record["history"]["time/training_seconds"]] == [2, 4]


def test_resume_from_last_continues_global_step(tiny_ct_dir, tmp_path):
    run_dir = tmp_path / "run"
    main(["fit", *tiny_maesil_args(tiny_ct_dir, run_dir, max_steps=2)])
    first = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert first["global_step"] == 2

    main(["fit", *tiny_maesil_args(tiny_ct_dir, run_dir, max_steps=4), "--ckpt_path", "last"])
    resumed = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["global_step"] == 4
    # The second run logged only steps after the first run's last step.
    steps = {int(r["step"]) for r in read_metrics(run_dir) if r.get("train/loss")}
    assert steps and min(steps) >= 2


def print_config(args: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_print_config_reproduces_the_run(tiny_ct_dir, tmp_path, capsys):
    config = print_config(tiny_maesil_args(tiny_ct_dir, tmp_path / "run"), capsys)
    assert config["model"]["class_path"] == "maesil.methods.MAESIL"
    assert config["data"]["init_args"]["superpatch_size"] == 32
    assert "superpatch_size" not in config["model"]["init_args"]  # stated once: the model follows the data
    assert config["data"]["init_args"]["data_dir"] == str(tiny_ct_dir)
    assert config["trainer"]["use_distributed_sampler"] is False
    printed = tmp_path / "printed.yaml"
    printed.write_text(yaml.safe_dump(config))
    assert print_config(["--config", str(printed)], capsys) == config


@pytest.mark.parametrize("problem", ["missing", "empty", "non_image", "image_2d"])
def test_bad_data_folder_stops_before_training(tmp_path, problem):
    import numpy as np
    import SimpleITK as sitk

    data_dir = tmp_path / "data"
    if problem != "missing":
        data_dir.mkdir()
    if problem == "non_image":
        bad = data_dir / "scan_notes.docx"
        bad.write_bytes(b"PK\x03\x04 not an image")
    if problem == "image_2d":
        bad = data_dir / "slice.nii.gz"
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((32, 32), np.int16)), str(bad))
    run_dir = tmp_path / "run"
    with pytest.raises(DataError) as error:
        main(["fit", *tiny_maesil_args(data_dir, run_dir)])
    message = str(error.value)
    expected_path = {"missing": data_dir, "empty": data_dir}.get(problem) or bad
    assert str(expected_path) in message
    assert not (run_dir / "checkpoints").exists()


def test_mismatched_superpatch_and_model_size_is_explained(tiny_ct_dir, tmp_path):
    args = tiny_maesil_args(tiny_ct_dir, tmp_path / "run") + ["--model.init_args.img_size", "64"]
    with pytest.raises(ValueError, match="superpatch"):
        main(["fit", *args])


def test_phantoms_tool_writes_nifti(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "maesil", "phantoms", "--out", str(tmp_path), "--count", "1",
         "--shape", "32", "32", "16", "--spacing", "6", "6", "12"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "images" / "phantom_000.nii.gz").exists()
    assert (tmp_path / "labels" / "phantom_000.nii.gz").exists()


def test_test_subcommand_scores_a_checkpoint_on_held_out_volumes(tiny_ct_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    main(["fit", *tiny_maesil_args(tiny_ct_dir, run_dir, max_steps=2)])
    capsys.readouterr()
    main(["test", *tiny_maesil_args(tiny_ct_dir, run_dir), "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")])
    out = capsys.readouterr().out
    assert "test/psnr_masked" in out and "test/ssim" in out


def test_run_summary_json_holds_final_metrics_and_history(tiny_ct_dir, tmp_path):
    import json

    run_dir = tmp_path / "run"
    main(["fit", *tiny_maesil_args(tiny_ct_dir, run_dir, max_steps=4)])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["global_step"] == 4
    assert summary["effective_mask_ratio"] == 0.75  # dual 0.5 then 0.5 on the 4³ token grid
    rows = [r for r in read_metrics(run_dir) if r.get("val/psnr_masked")]
    for key in ("val/psnr_masked", "val/ssim_masked", "val/psnr", "val/ssim", "val/loss"):
        assert [value for _, value in summary["history"][key]] == pytest.approx([float(r[key]) for r in rows])
        assert summary["metrics"][key] == pytest.approx(float(rows[-1][key]))
    assert [step for step, _ in summary["history"]["val/psnr_masked"]] == [2, 4]
    assert "train/loss" in summary["metrics"]
    # The CSV logger's folder already holds config.yaml; its hparams.yaml keeps only the module's hparams.
    hparams = yaml.safe_load((run_dir / "logs" / "version_0" / "hparams.yaml").read_text())
    assert hparams["mask_ratio"] == 0.5 and not any("." in key for key in hparams)


def test_run_summary_json_records_a_failed_fit(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(DataError):
        main(["fit", *tiny_maesil_args(tmp_path / "missing", run_dir)])
    import json

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["global_step"] == 0
    assert summary["error"].startswith("DataError") and str(tmp_path / "missing") in summary["error"]


def test_help_lists_the_tools(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "sweep-local" in capsys.readouterr().out


def test_help_lists_every_registered_tool_with_its_description(capsys):
    from maesil.tools import TOOLS

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    for name, tool in TOOLS.items():
        assert any(line.split() == [name, *tool.description.split()] for line in lines), name


@pytest.mark.parametrize("name", ["phantoms", "check-data", "prepare", "benchmark-recon", "export-encoder",
                                  "embed", "compare-init", "sweep-local"])
def test_each_tool_has_its_own_help(name, capsys):
    from maesil.tools import TOOLS

    assert callable(TOOLS[name].load())
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m maesil {name}")


def test_an_unknown_tool_name_is_reported_by_the_lightning_cli(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["no-such-tool", "--help"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "no-such-tool" in error and "fit" in error


def test_the_tool_registry_imports_no_tool_until_one_runs():
    code = ("import sys, maesil.tools; "
            "print(sorted(m for m in sys.modules if m.startswith('maesil.') and m != 'maesil.tools'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


class _StopBeforeInstantiation(Exception):
    pass


def test_resume_hooks_run_in_the_order_lightning_cli_documents(tmp_path, monkeypatch):
    """MaesilCLI checks a ``--ckpt_path`` file in ``parse_arguments``, before LightningCLI reads the checkpoint's
    hyperparameters into the model config, and restores the model's ``runtime_hparams`` in
    ``before_instantiate_classes``, after that. Fails if a Lightning release moves that step."""
    from maesil.lightning_cli import MaesilCLI
    from maesil.methods import MAESIL

    checkpoint = tmp_path / "hparams.ckpt"
    torch.save({"hyper_parameters": {"_class_path": "maesil.methods.MAESIL", "mask_ratio": 0.6,
                                     "val_mask_seed": 3}}, checkpoint)
    monkeypatch.setattr(MAESIL, "runtime_hparams", ("mask_ratio",), raising=False)
    seen = []

    class RecordingCLI(MaesilCLI):
        def parse_arguments(self, parser, args):
            super().parse_arguments(parser, args)
            seen.append(("parsed", self.config.fit.model.init_args.mask_ratio))

        def before_instantiate_classes(self):
            init_args = self.config.fit.model.init_args
            seen.append(("checkpoint read", init_args.mask_ratio, init_args.val_mask_seed))
            super().before_instantiate_classes()
            seen.append(("runtime hparams restored", init_args.mask_ratio, init_args.val_mask_seed))
            raise _StopBeforeInstantiation

    args = ["fit", *tiny_maesil_args(tmp_path / "data", tmp_path / "run"), "--ckpt_path", str(checkpoint)]
    with pytest.raises(_StopBeforeInstantiation):
        RecordingCLI(args=args)
    assert seen == [("parsed", 0.5), ("checkpoint read", 0.6, 3), ("runtime hparams restored", 0.5, 3)]


def test_a_corrupt_ckpt_path_is_named_before_lightning_reads_it(tmp_path, monkeypatch):
    from maesil.checkpoints import CorruptCheckpointError

    checkpoint = tmp_path / "cut.ckpt"
    torch.save({"hyper_parameters": {"mask_ratio": 0.6}}, checkpoint)
    checkpoint.write_bytes(checkpoint.read_bytes()[:-100])

    def no_load(*args, **kwargs):
        raise AssertionError("torch.load ran before the checkpoint was checked")

    monkeypatch.setattr(torch, "load", no_load)
    with pytest.raises(CorruptCheckpointError, match="cut.ckpt"):
        main(["fit", *tiny_maesil_args(tmp_path / "data", tmp_path / "run"), "--ckpt_path", str(checkpoint)])


def build(args: list[str]):
    """MaesilCLI without a subcommand: the parsed and instantiated model, data and trainer."""
    from maesil.lightning_cli import MaesilCLI

    return MaesilCLI(args=args, run=False)


def test_the_model_follows_the_superpatch_size_of_the_data(tmp_path):
    cli = build(tiny_maesil_args(tmp_path / "data", tmp_path / "run"))
    assert cli.datamodule.hparams.superpatch_size == 32
    assert cli.model.superpatch_size == (32, 32, 32) and cli.model.grid == (4, 4, 4)
    assert cli.model.hparams.superpatch_size == 32  # what a checkpoint stores to rebuild the model


def test_a_yaml_that_states_the_superpatch_twice_with_the_old_names_builds_the_same_model(tmp_path):
    demo = REPO_ROOT / "experiments/pretrain/maesil_demo.yaml"
    config = yaml.safe_load(demo.read_text())
    model_args = config["model"]["init_args"]
    model_args["img_size"] = config["data"]["init_args"]["superpatch_size"]
    model_args["patch_size"] = model_args.pop("token_size")
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump(config))
    assert "img_size: 64" in old.read_text() and "patch_size: 8" in old.read_text()

    with pytest.warns(FutureWarning, match="superpatch_size"):
        old_cli = build(["--config", str(old), "--trainer.default_root_dir", str(tmp_path / "old")])
    new_cli = build(["--config", str(demo), "--trainer.default_root_dir", str(tmp_path / "new")])
    assert old_cli.model.superpatch_size == new_cli.model.superpatch_size == (64, 64, 64)
    assert old_cli.model.token_size == new_cli.model.token_size == 8
    # The hyperparameters a checkpoint stores, which rebuild the model on --ckpt_path, hold the new names.
    assert (old_cli.model.hparams.superpatch_size, old_cli.model.hparams.token_size) == (64, 8)
    assert dict(old_cli.model.hparams) == dict(new_cli.model.hparams)
    old_state, new_state = old_cli.model.state_dict(), new_cli.model.state_dict()
    assert {k: v.shape for k, v in old_state.items()} == {k: v.shape for k, v in new_state.items()}
