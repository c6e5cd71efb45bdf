"""sweep-local and the mask-ratio sweep file: every generated command trains; grids run as subprocesses."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from maesil.cli import main
from maesil.models.masking import expected_mask_ratio
from maesil.tools.sweep_local import (
    RunResult,
    SweepError,
    build_command,
    expand_grid,
    format_table,
    load_sweep,
    mask_ratio_from_config,
    plan_runs,
    plot_sweep,
    report,
    sweep_figure,
    sweep_local_command,
    write_results_csv,
)
from tests.helpers import REPO_ROOT, tiny_maesil_overrides

MASK_RATIO_SWEEP = REPO_ROOT / "experiments/sweeps/mask_ratio.yaml"
DEMO_YAML = REPO_ROOT / "experiments/pretrain/maesil_demo.yaml"


def tiny_overrides(data_dir: Path) -> list[str]:
    """Appended to a sweep command: the demo shrunk to a 32³ superpatch, 2 steps and one validation batch."""
    return [
        *tiny_maesil_overrides(data_dir),
        "--trainer.max_steps", "2",
        "--trainer.val_check_interval", "2",
        "--trainer.limit_val_batches", "1",
        "--trainer.log_every_n_steps", "1",
        "--trainer.enable_model_summary", "false",
    ]


def tiny_probe_overrides(data_dir: Path) -> list[str]:
    """Appended after a command that adds the LinearProbe last: it probes the tiny phantoms, 1 superpatch each."""
    return [
        "--trainer.callbacks.data", str(data_dir),
        "--trainer.callbacks.train_volumes", "2",
        "--trainer.callbacks.test_volumes", "1",
        "--trainer.callbacks.superpatches_per_volume", "1",
        "--trainer.callbacks.fit_iterations", "5",
        "--trainer.callbacks.at_start", "false",
    ]


@pytest.fixture
def fresh_wandb():
    """wandb reads WANDB_MODE once per process; a teardown makes the test's value count."""
    import wandb

    wandb.teardown()
    yield
    wandb.teardown()


def write_sweep(path: Path, parameters: dict, command: list[str] | None = None, **extra) -> Path:
    config = {"method": "grid", "metric": {"name": "val/psnr_masked", "goal": "maximize"},
              "parameters": parameters, **extra}
    if command is not None:
        config["command"] = command
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_mask_ratio_sweep_file_is_the_grid_we_document():
    sweep = load_sweep(MASK_RATIO_SWEEP)
    assert sweep.metric == {"name": "val/psnr_masked", "goal": "maximize"}
    assert sweep.parameters == {"model.init_args.mask_ratio": [0.25, 0.5, 0.6, 0.75, 0.85, 0.9],
                                "model.init_args.masking": ["random", "tube", "dual"]}
    grid = expand_grid(sweep)
    assert len(grid) == 18 and len({tuple(p.values()) for p in grid}) == 18
    probe = sweep.command.index("--trainer.callbacks+=maesil.probing.LinearProbe")
    assert sweep.command[probe + 1:probe + 3] == ["--trainer.callbacks.every_n_steps=300",
                                                  "--trainer.callbacks.at_start=false"]
    assert sweep.command[-1] == "${args}"
    # Every combination is a valid mask on the demo's 8³ token grid (64³ superpatch, 8³ patches).
    demo = yaml.safe_load(DEMO_YAML.read_text())["model"]["init_args"]
    for params in grid:
        masking, ratio = params["model.init_args.masking"], params["model.init_args.mask_ratio"]
        axial = demo["axial_mask_ratio"] if masking == "dual" else None
        fraction = expected_mask_ratio(masking, (8, 8, 8), ratio, axial)
        assert ratio - 0.01 <= fraction < 1.0
        if masking == "dual":
            assert fraction == pytest.approx(1 - (1 - ratio) * (1 - axial), abs=0.02)


def test_every_command_of_the_mask_ratio_sweep_trains(tiny_ct_dir, tmp_path, monkeypatch, fresh_wandb):
    """The 18 commands as the agent builds them run in-process (their --config paths are relative to the
    repository root, like the agent's working folder), each shrunk to 2 steps and one validation."""
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    sweep = load_sweep(MASK_RATIO_SWEEP)
    runs = plan_runs(sweep, tmp_path, extra=[*tiny_overrides(tiny_ct_dir), *tiny_probe_overrides(tiny_ct_dir)])
    assert len(runs) == 18
    for run in runs:
        assert run.command[:3] == [sys.executable, "-m", "maesil"]
        assert "--config" in run.command and "experiments/trainer/wandb.yaml" in run.command
        main(run.command[3:])

        summary = json.loads((run.run_dir / "summary.json").read_text())
        masking, ratio = run.params["model.init_args.masking"], run.params["model.init_args.mask_ratio"]
        assert summary["status"] == "finished" and summary["global_step"] == 2, run.name
        expected = expected_mask_ratio(masking, (4, 4, 4), ratio, 0.5 if masking == "dual" else None)
        assert summary["effective_mask_ratio"] == pytest.approx(expected), run.name
        assert math.isfinite(summary["metrics"]["val/psnr_masked"]) and 0 < summary["metrics"]["val/ssim"] < 1
        assert 0 <= summary["metrics"]["probe/dice"] <= 1, run.name  # the probe after the last step
        saved = yaml.safe_load((run.run_dir / "config.yaml").read_text())["model"]["init_args"]
        assert (saved["masking"], saved["mask_ratio"]) == (masking, ratio)
        assert mask_ratio_from_config(run.run_dir) == pytest.approx(expected)


def test_sweep_local_runs_a_grid_as_subprocesses(tiny_ct_dir, tmp_path, capsys):
    sweep_file = write_sweep(
        tmp_path / "tiny.yaml",
        {"model.init_args.mask_ratio": {"values": [0.5, 0.75]},
         "model.init_args.masking": {"values": ["random", "tube"]},
         "model.init_args.decoder_depth": {"value": 1}},
        command=["${env}", "${interpreter}", "-m", "maesil", "fit", "--config", str(DEMO_YAML),
                 "--trainer.callbacks+=maesil.probing.LinearProbe", "${args}"],
    )
    out = tmp_path / "out"
    code = sweep_local_command([str(sweep_file), "--out", str(out), "--quiet", "--", *tiny_overrides(tiny_ct_dir),
                                *tiny_probe_overrides(tiny_ct_dir)])
    printed = capsys.readouterr().out
    assert code == 0, printed

    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [row["run"] for row in rows] == [
        "run_000_mask_ratio-0.5_masking-random", "run_001_mask_ratio-0.5_masking-tube",
        "run_002_mask_ratio-0.75_masking-random", "run_003_mask_ratio-0.75_masking-tube",
    ]
    for row in rows:
        assert row["status"] == "finished" and row["returncode"] == "0" and row["global_step"] == "2"
        assert row["model.init_args.decoder_depth"] == "1"
        for key in ("val/psnr_masked", "val/ssim_masked", "val/psnr", "val/ssim", "probe/dice"):
            assert math.isfinite(float(row[key])), (row["run"], key)
        assert 0 < float(row["val/ssim"]) < 1 and float(row["wall_s"]) > 0
        summary = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
        assert float(row["val/psnr_masked"]) == summary["metrics"]["val/psnr_masked"]
        assert (Path(row["run_dir"]) / "output.log").read_text().startswith("$ ")
    assert [float(row["effective_mask_ratio"]) for row in rows] == [0.5, 0.5, 0.75, 0.75]
    assert (out / "sweep.png").stat().st_size > 10_000
    assert "4 run(s) in" in printed and "best val/psnr_masked (maximize): run_00" in printed
    assert "best probe/dice (maximize): run_00" in printed
    header = list(rows[0])
    assert header[header.index("val/ssim") + 1] == "probe/dice"  # next to the reconstruction metrics
    table_header = next(line for line in printed.splitlines() if line.startswith("run  "))
    assert table_header.split()[-5:] == ["psnr_masked", "ssim_masked", "psnr", "ssim", "probe/dice"]
    assert printed.count("finished in") == 4


def test_sweep_local_records_a_failed_run_goes_on_and_caps_runs(tiny_ct_dir, tmp_path, capsys, monkeypatch):
    # mask_ratio 1.0 keeps no token: that run fails at model construction. --max-runs 2 skips the third.
    # WANDB_MODE unset: sweep-local runs the W&B logger offline, into the run folder.
    monkeypatch.setenv("WANDB_MODE", "x")
    monkeypatch.delenv("WANDB_MODE")
    sweep_file = write_sweep(
        tmp_path / "failing.yaml",
        {"model.init_args.mask_ratio": {"values": [1.0, 0.5, 0.75]}},
        command=["${env}", "python", "-m", "maesil", "fit", "--config", str(DEMO_YAML),
                 "--config", str(REPO_ROOT / "experiments/trainer/wandb.yaml"), "${args}"],
    )
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep-local", str(sweep_file), "--out", str(out), "--max-runs", "2", "--quiet", "--",
              *tiny_overrides(tiny_ct_dir)])
    assert exit_info.value.code == 1  # a run failed
    printed = capsys.readouterr().out
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(row["run"], row["status"]) for row in rows] == [
        ("run_000_mask_ratio-1.0", "failed"), ("run_001_mask_ratio-0.5", "finished")]
    assert rows[0]["returncode"] == "1" and rows[0]["val/psnr_masked"] == ""
    assert "no summary.json" in rows[0]["note"]
    assert "must be in [0, 1), got 1.0" in printed  # the end of the failed run's log is shown
    assert math.isfinite(float(rows[1]["val/psnr_masked"])) and rows[1]["effective_mask_ratio"] == "0.75"
    assert not (out / "run_002_mask_ratio-0.75").exists()
    assert list((out / "run_001_mask_ratio-0.5").glob("wandb/offline-run-*/run-*.wandb"))
    assert "2 run(s) in" in printed and "1 run(s) did not finish: run_000_mask_ratio-1.0" in printed


def test_commands_expand_the_agent_macros(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_ROOT", "/data/ct")
    sweep = load_sweep(write_sweep(
        tmp_path / "macros.yaml", {"a.b": {"values": [1, 2]}, "flag": {"value": True}, "off": {"value": False}},
        command=["${env}", "${interpreter}", "${program}", "${args_no_hyphens}", "--data=${envvar:DATA_ROOT}",
                 "${args_no_boolean_flags}", "${args_json}"],
        program="train.py",
    ))
    params = expand_grid(sweep)[1]
    assert params == {"a.b": 2, "flag": True, "off": False}
    command = build_command(sweep, params, tmp_path / "run", ["--extra", "1"])
    assert command == [sys.executable, "train.py", "a.b=2", "flag=True", "off=False", "--data=/data/ct",
                       "--a.b=2", "--flag", '{"a.b": 2, "flag": true, "off": false}',
                       "--trainer.default_root_dir", str(tmp_path / "run"), "--extra", "1"]
    real = load_sweep(MASK_RATIO_SWEEP)
    command = build_command(real, expand_grid(real)[0], tmp_path / "r")
    args = command.index("--model.init_args.mask_ratio=0.25")
    assert command[args + 1] == "--model.init_args.masking=random"
    # the run folder comes after the sweep's own default_root_dir, so it wins
    own = command.index("--trainer.default_root_dir=runs/sweeps/mask_ratio")
    assert command.index("--trainer.default_root_dir") > own


@pytest.mark.parametrize("problem, message", [
    ("missing", "sweep file not found"),
    ("bad_yaml", "not a readable YAML sweep file"),
    ("random", "sweep-local runs grids only"),
    ("distribution", "is a distribution"),
    ("no_command", "no `command` list"),
    ("no_parameters", "no `parameters` mapping"),
    ("bad_value", "needs `values: [...]`"),
    ("missing_config", "does not exist in"),
])
def test_bad_sweep_files_are_refused_naming_the_file(tmp_path, capsys, problem, message):
    path = tmp_path / f"{problem}.yaml"
    command = ["python", "-m", "maesil", "fit", "--config", str(DEMO_YAML), "${args}"]
    grid = {"model.init_args.mask_ratio": {"values": [0.5]}}
    if problem == "bad_yaml":
        path.write_text("parameters: [unclosed\n")
    elif problem == "random":
        write_sweep(path, grid, command, method="random")
    elif problem == "distribution":
        write_sweep(path, {"model.init_args.mask_ratio": {"distribution": "uniform", "min": 0.5, "max": 0.9}},
                    command)
    elif problem == "no_command":
        write_sweep(path, grid)
    elif problem == "no_parameters":
        write_sweep(path, {}, command)
    elif problem == "bad_value":
        write_sweep(path, {"model.init_args.mask_ratio": [0.5, 0.75]}, command)
    elif problem == "missing_config":
        write_sweep(path, grid, ["python", "-m", "maesil", "fit", "--config", "no/such.yaml", "${args}"])
    assert sweep_local_command([str(path), "--out", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert str(path) in error and message in error
    assert not (tmp_path / "out").exists()


def test_plot_uses_the_masked_fraction_and_one_line_per_mode(tmp_path):
    sweep = load_sweep(MASK_RATIO_SWEEP)
    results = []
    for index, params in enumerate(expand_grid(sweep)[:6]):  # ratios 0.25, 0.5 × three modes
        masking, ratio = params["model.init_args.masking"], params["model.init_args.mask_ratio"]
        fraction = expected_mask_ratio(masking, (8, 8, 8), ratio, 0.5 if masking == "dual" else None)
        results.append(RunResult(name=f"run_{index}", params=params, run_dir=tmp_path, command=[],
                                 status="finished", effective_mask_ratio=fraction,
                                 metrics={"val/psnr_masked": 20 - 10 * fraction, "val/ssim_masked": 1 - fraction}))
    results.append(RunResult(name="failed", params=expand_grid(sweep)[6], run_dir=tmp_path, command=[],
                             status="failed", returncode=1))
    by_fraction = sweep_figure(results, sweep)
    by_ratio = sweep_figure(results, sweep, x="mask_ratio")
    path = plot_sweep(results, sweep, tmp_path / "sweep.png")
    assert path.stat().st_size > 10_000
    psnr_axis, ssim_axis = by_fraction.axes
    assert psnr_axis.get_ylabel() == "val/psnr_masked (dB)" and ssim_axis.get_ylabel() == "val/ssim_masked"
    assert psnr_axis.get_xlabel() == "masked fraction (effective)"
    lines = {line.get_label(): list(line.get_xdata()) for line in psnr_axis.get_lines()}
    assert lines == {"masking=random": [0.25, 0.5], "masking=tube": [0.25, 0.5], "masking=dual": [0.625, 0.75]}
    dual_by_ratio = [line for line in by_ratio.axes[0].get_lines() if line.get_label() == "masking=dual"]
    assert list(dual_by_ratio[0].get_xdata()) == [0.25, 0.5]
    with pytest.raises(SweepError, match="not a swept parameter"):
        sweep_figure(results, sweep, x="depth")
    assert plot_sweep(results[-1:], sweep, tmp_path / "none.png") is None  # no run with metrics: no plot


@pytest.mark.parametrize("stated", ["data", "model_old_names", "model_new_names"])
def test_the_masked_fraction_is_read_from_configs_of_every_layout(tmp_path, stated):
    model = {"masking": "random", "mask_ratio": 0.3}
    if stated == "model_old_names":  # configs that also stated the sizes on the model, under the old names
        model |= {"img_size": [32, 32, 32], "patch_size": 16}
    elif stated == "model_new_names":
        model |= {"superpatch_size": 32, "token_size": 16}
    else:
        model |= {"token_size": 16}
    config = {"model": {"init_args": model}, "data": {"init_args": {"superpatch_size": 32}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    # 32³ in 16³ tokens: 2 of 8 tokens masked (0.25); the default 8³ tokens would give 19 of 64
    assert mask_ratio_from_config(tmp_path) == pytest.approx(0.25)


def test_probe_dice_is_a_column_of_the_results_the_table_and_the_plot(tmp_path, capsys):
    sweep = load_sweep(MASK_RATIO_SWEEP)
    params = expand_grid(sweep)
    results = [
        RunResult(name="low", params=params[0], run_dir=tmp_path, command=[], status="finished", returncode=0,
                  effective_mask_ratio=0.25, metrics={"val/psnr_masked": 14.0, "val/ssim": 0.3, "probe/dice": 0.41,
                                                     "probe/dice_liver": 0.8, "train/loss": 0.1}),
        RunResult(name="high", params=params[3], run_dir=tmp_path, command=[], status="finished", returncode=0,
                  effective_mask_ratio=0.5, metrics={"val/psnr_masked": 13.0, "val/ssim": 0.2, "probe/dice": 0.47,
                                                     "probe/dice_liver": 0.7, "train/loss": 0.2}),
    ]
    rows = list(csv.DictReader(open(write_results_csv(results, sweep, tmp_path / "results.csv"))))
    header = list(rows[0])
    assert header[header.index("val/psnr_masked"):header.index("val/psnr_masked") + 3] == [
        "val/psnr_masked", "val/ssim", "probe/dice"]
    assert [float(row["probe/dice"]) for row in rows] == [0.41, 0.47]
    assert "probe/dice_liver" in header
    table = format_table(results, sweep).splitlines()
    assert table[0].split()[-3:] == ["psnr_masked", "ssim", "probe/dice"]
    assert table[2].split()[-1] == "0.4100" and table[3].split()[-1] == "0.4700"
    axes = sweep_figure(results, sweep).axes
    assert [axis.get_ylabel() for axis in axes] == ["val/psnr_masked (dB)", "val/ssim", "probe/dice"]
    assert list(axes[2].get_lines()[0].get_ydata()) == [0.41, 0.47]  # one line: both runs mask at random

    report(results, sweep, tmp_path / "out", "auto", 1.0)
    printed = capsys.readouterr().out
    assert "best val/psnr_masked (maximize): low 14.0000" in printed
    assert "best probe/dice (maximize): high 0.4700" in printed
