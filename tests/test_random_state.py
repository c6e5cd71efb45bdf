"""RNG state capture/restore, as stored in checkpoints."""

from __future__ import annotations

import io
import random

import numpy as np
import torch

from maesil.random_state import capture_rng_state, restore_rng_state


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3).tolist()


def test_restored_state_repeats_every_stream_and_survives_weights_only_load():
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    np.random.randn()  # a cached Gaussian is part of NumPy's state
    state = capture_rng_state()
    first = _draws()
    assert _draws() != first  # the streams move on

    buffer = io.BytesIO()
    torch.save({"maesil_rng": [state]}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["maesil_rng"][0]
    restore_rng_state(loaded)
    assert _draws() == first
