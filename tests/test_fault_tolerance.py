"""Runs that survive faults, end to end through the CLI: SIGKILL and resume, exact resume, determinism."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from maesil.cli import main
from tests.helpers import REPO_ROOT, tiny_maesil_args


def _overlay(path: Path, run_dir: Path, every: int, flush_every: int = 1) -> Path:
    """Checkpoints every ``every`` steps (all kept) and a CSV log flushed every step."""
    path.write_text(f"""
trainer:
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: "{run_dir}", name: logs, flush_logs_every_n_steps: {flush_every}}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{every_n_train_steps: {every}, save_last: true, save_top_k: -1}}
    - class_path: lightning.pytorch.callbacks.LearningRateMonitor
      init_args: {{logging_interval: step}}
""")
    return path


def _rows(metrics_file: Path) -> list[dict[str, str]]:
    if not metrics_file.exists():
        return []
    with open(metrics_file) as handle:
        return list(csv.DictReader(handle))


def _series(rows: list[dict[str, str]], key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


def _global_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


def test_sigkilled_fit_resumes_from_last_without_going_back(tiny_ct_dir, tmp_path, capfd):
    run_dir = tmp_path / "run"
    overlay = _overlay(tmp_path / "overlay.yaml", run_dir, every=3)
    target = 48
    args = [*tiny_maesil_args(tiny_ct_dir, run_dir, max_steps=target), "--config", str(overlay),
            "--trainer.limit_val_batches", "0", "--data.init_args.samples_per_volume", "6",
            "--data.init_args.queue_length", "6"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "maesil", "fit", *args], cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = run_dir / "checkpoints" / "last.ckpt"
    first_log = run_dir / "logs" / "version_0" / "metrics.csv"
    deadline = time.monotonic() + 240
    killed_at = None
    while time.monotonic() < deadline and process.poll() is None:
        saved = [int(p.stem.rsplit("step=", 1)[1]) for p in (run_dir / "checkpoints").glob("*step=*.ckpt")]
        if saved:
            steps = _series(_rows(first_log), "train/loss")
            if steps and max(steps) > max(saved):  # trained past its latest checkpoint
                process.send_signal(signal.SIGKILL)
                killed_at = max(steps)
                break
        time.sleep(0.05)
    process.wait(timeout=30)
    assert killed_at is not None, f"the run ended before it could be killed: {process.stderr.read().decode()[-2000:]}"
    assert process.returncode == -signal.SIGKILL
    resumed_from = _global_step(last)
    assert 3 <= resumed_from < target and resumed_from % 3 == 0
    killed_steps = _series(_rows(first_log), "train/loss")

    capfd.readouterr()
    main(["fit", *args, "--ckpt_path", "last"])
    err = capfd.readouterr().err
    assert _global_step(last) == target

    resumed_rows = _rows(run_dir / "logs" / "version_1" / "metrics.csv")
    resumed_steps = sorted(_series(resumed_rows, "train/loss"))
    assert resumed_steps[0] == resumed_from  # continues at the checkpoint, never earlier
    assert resumed_steps == list(range(resumed_from, target))
    lost = sorted(s for s in killed_steps if s >= resumed_from)
    print(f"killed at step {killed_at}, resumed from {resumed_from}: {len(lost)} steps trained again")
    # The scheduler resumed: the steps trained twice had the same learning rate in both runs.
    killed_lr = _series(_rows(first_log), "lr-AdamW/pg1")
    resumed_lr = _series(resumed_rows, "lr-AdamW/pg1")
    shared = sorted(set(killed_lr) & set(resumed_lr))
    assert shared, "no step was logged by both runs"
    assert all(resumed_lr[s] == pytest.approx(killed_lr[s], rel=1e-9) for s in shared)
    # The data position resumed mid-epoch (2 training subjects × 6 superpatches / batch 2 = 6 batches).
    if resumed_from % 6:
        assert f"after {resumed_from % 6} training batches" in err


@pytest.mark.parametrize("samples_per_volume", [4, 2], ids=["checkpoint-in-epoch-0", "checkpoint-in-epoch-1"])
def test_resume_with_a_prepared_cache_repeats_the_uninterrupted_run_exactly(tiny_ct_dir, tmp_path,
                                                                           samples_per_volume):
    """Optimizer, scheduler, RNG and data position all resume: the losses after the checkpoint are
    bit-identical to those of a run that was never interrupted. 2 training subjects, batch 2: an epoch is
    ``samples_per_volume`` batches, so the step-3 checkpoint lies inside epoch 0 (4) or epoch 1 (2)."""
    cache = tmp_path / "cache"

    def run(name: str, extra: list[str]) -> dict[int, float]:
        run_dir = tmp_path / name
        overlay = _overlay(tmp_path / f"{name}.yaml", run_dir, every=3, flush_every=100)
        main(["fit", *tiny_maesil_args(tiny_ct_dir, run_dir, max_steps=7), "--config", str(overlay),
              "--data.init_args.cache_dir", str(cache),
              "--data.init_args.samples_per_volume", str(samples_per_volume),
              "--trainer.limit_val_batches", "0", *extra])
        return _series(_rows(sorted((run_dir / "logs").glob("version_*/metrics.csv"))[-1]), "train/loss")

    uninterrupted = run("straight", [])
    checkpoint = next((tmp_path / "straight" / "checkpoints").glob("*step=3.ckpt"))
    resumed = run("resumed", ["--ckpt_path", str(checkpoint)])
    assert sorted(resumed) == [3, 4, 5, 6]
    assert [resumed[s] for s in range(3, 7)] == [uninterrupted[s] for s in range(3, 7)]


def test_same_seed_gives_identical_losses_and_another_seed_does_not(tiny_ct_dir, tmp_path):
    def losses(name: str, seed: int) -> list[float]:
        run_dir = tmp_path / name
        main(["fit", *tiny_maesil_args(tiny_ct_dir, run_dir, max_steps=4), "--seed_everything", str(seed),
              "--trainer.limit_val_batches", "0"])
        rows = _rows(sorted((run_dir / "logs").glob("version_*/metrics.csv"))[-1])
        return [value for _, value in sorted(_series(rows, "train/loss").items())]

    first, second, other = losses("a", 7), losses("b", 7), losses("c", 8)
    assert len(first) == 4
    assert first == second
    assert first != other
