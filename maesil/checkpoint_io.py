"""Checkpoint files that are either complete or untouched: temp file, fsync, then rename.

Lightning's default ``TorchCheckpointIO`` opens the target path for writing. A write that fails halfway
(a full disk, a quota, a killed process) then leaves a truncated ``last.ckpt`` and the run can no
longer resume. :class:`AtomicCheckpointIO` writes to a temporary file in the same folder, flushes it to
disk and only then renames it over the target (``os.replace`` is atomic on POSIX and Windows within
one file system), so the previous checkpoint stays intact until the new one is complete.

``python -m maesil`` uses it for every run (see :class:`maesil.cli.MaesilCLI`); in Python, pass
``Trainer(plugins=[AtomicCheckpointIO()])``.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO", "CheckpointWriteError", "atomic_torch_save"]


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the file at the target path (if any) is unchanged."""


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that never leaves a partial file at ``path``.

    The object is serialised in memory first (serialisation errors leave the disk untouched), written to a
    temporary file next to ``path``, fsynced and renamed over ``path``.

    Raises:
        CheckpointWriteError: when writing fails (e.g. ``ENOSPC``); the message names the file, the cause
            and says that the previous checkpoint was kept.
    """
    target = Path(path)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    temporary: str | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        with os.fdopen(handle, "wb") as file:
            file.write(buffer.getbuffer())
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
        temporary = None
    except OSError as error:
        kept = "the previous checkpoint there is intact" if target.exists() else "no file was written there"
        raise CheckpointWriteError(
            error.errno,
            f"could not write checkpoint {target} ({error.strerror or error}); {kept}. "
            f"Free disk space or choose another folder (trainer.default_root_dir), then resume with "
            f"--ckpt_path last",
        ) from error
    finally:
        if temporary is not None:
            try:
                os.unlink(temporary)
            except OSError:
                pass


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint plugin writing with :func:`atomic_torch_save` (local paths only)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        if "://" in str(path):
            # Remote file systems (s3://, gs://) have their own commit semantics: Lightning's default writer.
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, path)
