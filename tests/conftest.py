"""Shared fixtures: tiny synthetic CT folders built with the project's own phantom generator."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import TINY_SHAPE, TINY_SPACING

os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(scope="session")
def tiny_ct_dir(tmp_path_factory) -> Path:
    """Three tiny phantoms (images/ and labels/), written once per test session."""
    from maesil.phantoms import write_phantoms

    root = tmp_path_factory.mktemp("tiny_ct")
    write_phantoms(root, count=3, seed=0, shape=TINY_SHAPE, spacing=TINY_SPACING)
    return root
