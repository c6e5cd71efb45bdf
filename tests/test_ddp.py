"""DDP with two CPU processes (gloo) through the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
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


def _cache_with_a_nan_subject(tiny_ct_dir, tmp_path):
    """A prepared cache in which one training subject is all NaN (nothing at load time checks a cache)."""
    import numpy as np

    from maesil.tools import TOOLS
    from maesil.data import VolumeDataModule

    cache = tmp_path / "cache"
    assert TOOLS["prepare"]([str(tiny_ct_dir), "--out", str(cache), "--config",
                             str(REPO_ROOT / "experiments/pretrain/maesil_demo.yaml"), "--target-spacing", "4.0",
                             "--workers", "1", "--no-progress"]) == 0
    module = VolumeDataModule(data_dir=tiny_ct_dir, cache_dir=cache, check_voxels=False, superpatch_size=32,
                              target_spacing=4.0)
    module.setup("fit")
    planted = module.train_records[0].subject_id
    array = np.load(cache / "subjects" / planted / "image.npy", mmap_mode="r+")
    array[...] = np.nan
    array.flush()
    return cache, planted


def _ddp_fit(tiny_ct_dir, run_dir, cache, extra):
    args = tiny_maesil_args(tiny_ct_dir, run_dir, max_steps=3) + [
        "--data.init_args.cache_dir", str(cache), "--data.init_args.check_voxels", "false",
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--trainer.limit_val_batches", "0", *extra,
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "maesil", "fit", *args],
                          capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=300)


def test_ddp_nan_loss_on_one_rank_stops_both_naming_the_subject(tiny_ct_dir, tmp_path):
    """Each rank trains on one of the two training subjects; the NaN one makes its rank's loss NaN. The
    processes agree on the check, so both stop (no rank waits forever in the next all-reduce)."""
    cache, planted = _cache_with_a_nan_subject(tiny_ct_dir, tmp_path)
    result = _ddp_fit(tiny_ct_dir, tmp_path / "run", cache, [])
    assert result.returncode != 0
    assert "NonFiniteLossError" in result.stderr and f"Subjects in this batch: " in result.stderr
    assert planted in result.stderr.split("Subjects in this batch:")[1][:200]


@pytest.mark.slow
def test_ddp_skips_non_finite_batches_on_every_rank_within_the_budget(tiny_ct_dir, tmp_path):
    cache, _ = _cache_with_a_nan_subject(tiny_ct_dir, tmp_path)
    overlay = tmp_path / "guard.yaml"
    overlay.write_text("""
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {save_last: true}
    - class_path: maesil.nonfinite.NonFiniteLossGuard
      init_args: {max_skipped_batches: 10}
""")
    run_dir = tmp_path / "run"
    result = _ddp_fit(tiny_ct_dir, run_dir, cache, ["--config", str(overlay)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 3
    assert checkpoint["maesil_skipped_batches"] == 3  # every step had the NaN subject on one rank
    assert len(checkpoint["maesil_rng"]) == 2  # one RNG state per process
    weights = [v for k, v in checkpoint["state_dict"].items() if v.is_floating_point()]
    assert all(torch.isfinite(w).all() for w in weights)
