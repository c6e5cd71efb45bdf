"""``benchmarks/gpu_check.sh`` in its reduced CPU mode: a part runs under its limit, records its exit code and
hands over its results in one archive."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.sh"


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


@pytest.mark.slow
def test_a_reduced_part_runs_and_its_results_are_collected(tmp_path):
    # The part's 60 s limit bounds a GPU window; on a busy CPU the dry run may need longer, and this test checks
    # the script's mechanics, not a duration.
    env = {**os.environ, "GPU_CHECK_REDUCED": "1", "GPU_CHECK_PARTS": "mae_vs_monai", "PYTHON": sys.executable,
           "GPU_WHEELS": str(tmp_path / "no_wheels"), "GPU_CHECK_COLLECT": str(tmp_path / "collected"),
           "GPU_CHECK_MAE_S": "480"}
    result = subprocess.run(["bash", str(SCRIPT), "run", str(tmp_path / "out")], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    parts = (tmp_path / "out" / "parts.txt").read_text().split()
    assert parts[:2] == ["mae_vs_monai", "exit=0"]
    assert "speed-up (MONAI / ours, median)" in (tmp_path / "out" / "logs" / "mae_vs_monai.log").read_text()
    with tarfile.open(tmp_path / "collected" / "results.tar.gz") as archive:
        names = set(archive.getnames())
    assert {"./parts.txt", "./machine.txt", "./logs/mae_vs_monai.log"} <= names


def test_an_unknown_mode_is_refused():
    result = subprocess.run(["bash", str(SCRIPT), "deploy"], capture_output=True, text=True)
    assert result.returncode == 2 and "usage: bash benchmarks/gpu_check.sh wheels | run [OUT]" in result.stderr
