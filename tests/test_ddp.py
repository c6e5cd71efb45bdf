"""DDP with two CPU processes (gloo) through the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from tests.helpers import REPO_ROOT, tiny_maesil_args


def test_ddp_two_cpu_processes_complete_steps(tiny_ct_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = tiny_maesil_args(tiny_ct_dir, run_dir, max_steps=3) + [
        "--trainer.accelerator", "cpu",
        "--trainer.devices", "2",
        "--trainer.strategy", "ddp",
        "--trainer.val_check_interval", "3",
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "maesil", "fit", *args],
        capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 3
    # rank 0 saved the validation picture without a collective call (a broadcast here once deadlocked)
    assert sorted(run_dir.glob("logs/version_*/reconstructions/step_*.png"))
    assert "world_size=2" in result.stdout + result.stderr or "GLOBAL_RANK: 1" in result.stdout + result.stderr


def test_ddp_prepares_the_cache_once_and_trains_from_it(tiny_ct_dir, tmp_path):
    """Rank 0 prepares the cache in ``prepare_data``; both ranks then read it."""
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    args = tiny_maesil_args(tiny_ct_dir, run_dir, max_steps=2) + [
        "--data.init_args.cache_dir", str(cache),
        "--trainer.accelerator", "cpu",
        "--trainer.devices", "2",
        "--trainer.strategy", "ddp",
        "--trainer.val_check_interval", "2",
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "maesil", "fit", *args],
        capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (cache / "index.json").is_file() and len(list(cache.glob("subjects/*/image.npy"))) == 3
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2


def test_ddp_pgl_two_processes(tiny_ct_dir, tmp_path):
    """PGL under DDP: two-view batches on both ranks, the EMA target updated on each rank from the
    all-reduced online weights, the views picture saved by rank 0. (``trainer.sync_batchnorm`` is a GPU
    option: torch's SyncBatchNorm refuses CPU modules, so the heads' BatchNorm runs per process here.)"""
    from tests.methods.test_pgl import tiny_args

    run_dir = tmp_path / "run"
    args = tiny_args("pgl", tiny_ct_dir, run_dir, max_steps=3) + [
        "--model.init_args.num_scales", "2",
        "--trainer.accelerator", "cpu",
        "--trainer.devices", "2",
        "--trainer.strategy", "ddp",
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "maesil", "fit", *args],
        capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 3
    state = checkpoint["state_dict"]
    assert any("projector.0.1.running_mean" in key for key in state)
    assert sorted(run_dir.glob("logs/version_*/views/step_*.png"))
