"""Checkpoint files that are either complete or untouched, and checks before resuming from one.

Lightning's default ``TorchCheckpointIO`` opens the target path for writing. A write that fails halfway
(a full disk, a quota, a killed process) then leaves a truncated ``last.ckpt`` and the run can no
longer resume. :class:`AtomicCheckpointIO` writes through :func:`maesil.files.atomic_write` (a temporary
file in the same folder, flushed to disk, then renamed over the target), so the previous checkpoint stays
intact until the new one is complete. :func:`check_resumable` finds a checkpoint cut short by a crash
before Lightning's loader fails on it with a message that names no file.

``python -m maesil`` uses the plugin for every run; in Python, pass ``Trainer(plugins=[AtomicCheckpointIO()])``.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from maesil.files import atomic_write_bytes

__all__ = ["AtomicCheckpointIO", "CheckpointWriteError", "CorruptCheckpointError", "atomic_torch_save",
           "check_resumable", "latest_last_checkpoint"]


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the file at the target path (if any) is unchanged."""


class CorruptCheckpointError(ValueError):
    """A checkpoint to resume from is truncated or corrupt."""


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that never leaves a partial file at ``path``.

    The object is serialised in memory first (serialisation errors leave the disk untouched), then written
    with :func:`maesil.files.atomic_write_bytes`.

    Raises:
        CheckpointWriteError: when writing fails (e.g. ``ENOSPC``); the message names the file, the cause
            and says that the previous checkpoint was kept.
    """
    target = Path(path)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    try:
        atomic_write_bytes(target, buffer.getbuffer())
    except OSError as error:
        kept = "the previous checkpoint there is intact" if target.exists() else "no file was written there"
        raise CheckpointWriteError(
            error.errno,
            f"could not write checkpoint {target} ({error.strerror or error}); {kept}. "
            f"Free disk space or choose another folder (trainer.default_root_dir), then resume with "
            f"--ckpt_path last",
        ) from error


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


def latest_last_checkpoint(folders: list[str | os.PathLike]) -> Path | None:
    """The newest ``last*.ckpt`` in ``folders``: the file ``--ckpt_path last`` resumes from (as Lightning
    picks it), or None when there is none."""
    candidates = [path for folder in folders for path in Path(folder).glob("last*.ckpt") if path.is_file()]
    return max(candidates, key=lambda path: path.stat().st_mtime) if candidates else None


def check_resumable(path: str | os.PathLike) -> None:
    """Fails fast, naming the file, when a checkpoint to resume from is missing, truncated or corrupt.

    torch writes checkpoints as zip archives with a CRC per entry, so reading the archive's directory and
    checking every CRC (:meth:`zipfile.ZipFile.testzip`, one sequential read of the file) finds a file cut
    short by a crash or a full disk before Lightning's loader fails with a message that names no file. The
    error lists the other checkpoints of the folder, newest first, to resume from instead.
    """
    target = Path(path)
    if not target.is_file():
        raise FileNotFoundError(f"checkpoint {target} does not exist{_alternatives(target)}")
    problem: str | None = None
    try:
        with zipfile.ZipFile(target) as archive:
            bad = archive.testzip()
            if bad is not None:
                problem = f"entry {bad!r} fails its CRC check"
    except zipfile.BadZipFile as error:
        problem = f"not a complete torch checkpoint ({error}): truncated, or not a checkpoint"
    except OSError as error:
        problem = f"cannot be read ({error})"
    if problem is not None:
        raise CorruptCheckpointError(f"cannot resume from checkpoint {target}: {problem}{_alternatives(target)}")


def _alternatives(target: Path) -> str:
    others = sorted((p for p in target.parent.glob("*.ckpt") if p != target and p.is_file()),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    if not others:
        return f"; there is no other checkpoint in {target.parent}"
    names = ", ".join(p.name for p in others[:5])
    return f". Other checkpoints in {target.parent}, newest first: {names}; resume from one with --ckpt_path PATH"
