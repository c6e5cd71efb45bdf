"""The shipped demo configuration, as `make demo` runs it, for a few steps (slow: writes full-size phantoms)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT


@pytest.mark.slow
def test_demo_config_runs_on_builtin_phantoms(tmp_path):
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "maesil", "fit",
        "--config", str(REPO_ROOT / "experiments/pretrain/maesil_demo.yaml"),
        "--data.init_args.phantom_dir", str(tmp_path / "phantoms"),
        "--data.init_args.phantom_count", "3",
        "--data.init_args.cache_dir", str(tmp_path / "cache"),
        "--trainer.default_root_dir", str(run_dir),
        "--trainer.max_steps", "6",
        "--trainer.val_check_interval", "6",
    ]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert len(list((tmp_path / "phantoms" / "images").glob("phantom_*.nii.gz"))) == 3
    assert len(list((tmp_path / "cache" / "subjects").iterdir())) == 3  # the demo trains from its prepared cache
    assert "== run summary ==" in result.stdout
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert sorted(run_dir.glob("logs/version_0/reconstructions/step_*.png"))
