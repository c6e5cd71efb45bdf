"""``benchmarks/recipe_table.py``: a recipe whose profile timed out counts as failed unless it had written its
figures (they are written once every measurement is done)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def recipe_table():
    spec = importlib.util.spec_from_file_location("recipe_table", REPO_ROOT / "benchmarks" / "recipe_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _arguments() -> argparse.Namespace:
    return argparse.Namespace(steps=2, warmup=1, loader_batches=1, overrides=[], max_batch=False,
                              max_batch_limit=None, max_batch_seconds=None, timeout=5)


def test_a_profile_that_timed_out_after_writing_its_figures_keeps_them(recipe_table, tmp_path, monkeypatch):
    figures = {"recipe": "pgl", "seconds_per_step_median": 0.19, "largest_batch": 46}
    json_path = tmp_path / "pgl.json"

    def wrote_then_hung(command, **kwargs):
        json_path.write_text(json.dumps(figures))
        raise subprocess.TimeoutExpired(command, kwargs["timeout"])

    monkeypatch.setattr(recipe_table.subprocess, "run", wrote_then_hung)
    assert recipe_table.profile_recipe([tmp_path / "pgl.yaml"], json_path, _arguments(), on_gpu=True) == figures


def test_a_profile_that_timed_out_without_figures_is_a_failed_row(recipe_table, tmp_path, monkeypatch):
    json_path = tmp_path / "unet.json"
    json_path.write_text("{}")  # figures of an earlier call are not taken for this one's

    def hung(command, **kwargs):
        raise subprocess.TimeoutExpired(command, kwargs["timeout"])

    monkeypatch.setattr(recipe_table.subprocess, "run", hung)
    result = recipe_table.profile_recipe([tmp_path / "unet.yaml"], json_path, _arguments(), on_gpu=True)
    assert result == {"error": "timed out after 5 s"}
    row = recipe_table.table_row("unet", result)
    assert row["recipe"] == "unet" and row["network"] == "failed: timed out after 5 s"


def test_a_timed_out_profile_names_the_stage_it_was_in(recipe_table, tmp_path, monkeypatch):
    stderr = b"[profile] building the run\nwarning\n[profile] largest batch: trying 48\n"

    def hung(command, **kwargs):
        raise subprocess.TimeoutExpired(command, kwargs["timeout"], stderr=stderr)  # bytes, as run() leaves them

    monkeypatch.setattr(recipe_table.subprocess, "run", hung)
    result = recipe_table.profile_recipe([tmp_path / "unet.yaml"], tmp_path / "unet.json", _arguments(), True)
    assert result == {"error": "timed out after 5 s at: largest batch: trying 48"}


def test_the_largest_batch_search_gets_half_the_timeout_and_a_cut_search_reads_as_a_lower_bound(
        recipe_table, tmp_path, monkeypatch):
    commands = []

    def failed(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 1, "", "ValueError: no")

    monkeypatch.setattr(recipe_table.subprocess, "run", failed)
    arguments = _arguments()
    arguments.max_batch, arguments.timeout = True, 120
    recipe_table.profile_recipe([tmp_path / "unet.yaml"], tmp_path / "unet.json", arguments, True)
    assert commands[0][commands[0].index("--max-batch-seconds") + 1] == "60"
    figures = {"method": "Segmentation", "network": "ResEncUNet", "input": "128³", "batch": 2,
               "seconds_per_step_median": 0.5, "superpatches_per_second": 4.0, "peak_allocated_gib": 30.0,
               "accelerator": "cuda", "mfu": 0.1, "device": "H200", "precision": "bf16-mixed", "date": "2026-12-01",
               "largest_batch": 16, "largest_batch_stopped_by": "time limit"}
    assert recipe_table.table_row("unet", figures)["largest batch"] == "≥16"
