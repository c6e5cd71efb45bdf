"""Files that are either complete or absent: the one atomic write of the project.

Every file a run or a tool writes for later readers (checkpoints, cache volumes and index, phantoms,
exports) goes through :func:`atomic_write`: the bytes land in a hidden temporary file in the target's
folder, are flushed and fsynced, and the file is renamed over the target. A reader, or a run killed
half-way, never sees a partial file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["atomic_write", "atomic_write_bytes"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Calls ``write(file)`` on a temporary file next to ``path``, fsyncs it and renames it over ``path``.

    The file gets the usual permissions (``0666 & ~umask``, not ``mkstemp``'s 0600). On any error, the
    temporary file is removed and the previous ``path`` (if any) is left untouched; the error propagates.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.chmod(temporary, 0o666 & ~_umask())
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    return target


def atomic_write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> Path:
    """:func:`atomic_write` of a bytes buffer."""
    return atomic_write(path, lambda file: file.write(data))
