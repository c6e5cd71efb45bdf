"""``python -m maesil`` end to end through the real LightningCLI and the demo YAML."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import torch
import yaml

from maesil.cli import main
from maesil.data.sources import DataError
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


def test_print_config_reproduces_the_run(tiny_ct_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *tiny_maesil_args(tiny_ct_dir, tmp_path / "run"), "--print_config"])
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["class_path"] == "maesil.methods.MAESIL"
    assert config["model"]["init_args"]["img_size"] == 32
    assert config["data"]["init_args"]["data_dir"] == str(tiny_ct_dir)
    assert config["trainer"]["use_distributed_sampler"] is False


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
