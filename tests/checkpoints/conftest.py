"""Tiny real checkpoints of one-step CLI runs, shared by the checkpoint tests (and tests/tools)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.checkpoints.tiny_runs import tiny_checkpoint


@pytest.fixture(scope="session")
def checkpoint_root(tmp_path_factory) -> Path:
    """One folder per session for the tiny runs (shared with tests/tools/test_export_encoder.py)."""
    return tmp_path_factory.getbasetemp() / "tiny_checkpoints"


@pytest.fixture
def pgl_ckpt(tiny_ct_dir: Path, checkpoint_root: Path) -> Path:
    return tiny_checkpoint("pgl", tiny_ct_dir, checkpoint_root)


@pytest.fixture
def byol_ckpt(tiny_ct_dir: Path, checkpoint_root: Path) -> Path:
    return tiny_checkpoint("byol", tiny_ct_dir, checkpoint_root)


@pytest.fixture
def maesil_ckpt(tiny_ct_dir: Path, checkpoint_root: Path) -> Path:
    return tiny_checkpoint("maesil", tiny_ct_dir, checkpoint_root)
