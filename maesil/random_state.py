"""Random-number-generator state in checkpoints, so that a resumed run continues its random stream.

Lightning restores weights, optimizer, scheduler and loop progress from ``--ckpt_path``, but not the global
RNGs (Python ``random``, NumPy, torch CPU and CUDA), which draw masks, augmentations and dropout. Without
them a resumed run starts those streams from the seed again and repeats the random draws of its first steps.
:class:`maesil.methods.base.MethodModule` stores the state of every process under ``"maesil_rng"`` and
restores the process's own one on resume.

States are stored as tensors and plain Python values only, so checkpoints still load with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng_state", "restore_rng_state"]


def capture_rng_state() -> dict[str, Any]:
    """The current state of Python's, NumPy's and torch's (CPU and, if present, CUDA) global RNGs."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "position": int(position), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Sets the global RNGs to ``state`` (from :func:`capture_rng_state`)."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
