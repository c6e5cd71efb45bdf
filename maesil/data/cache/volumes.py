"""Cached volumes as files: uncompressed ``.npy`` or chunked, compressed blosc2 arrays (``.b2nd``).

A training step reads one superpatch of a volume. From a C-ordered ``.npy`` a 128³ read is 16,384
separate runs of 128 voxels; a blosc2 NDArray is stored in chunks of 64³ voxels (split into blocks of
32³), so a read touches at most 3 chunks per axis and decompresses only those. Both are memory-mapped.

The ``.b2nd`` layout, and why:

* **chunks 64³, blocks 32³.** Half a 128³ superpatch per axis: a random 128³ read decompresses at most
  3³ chunks (1.7x-3.4x the voxels it needs), a 64³ read at most 2³. A block of 32³ uint16 voxels is
  64 KiB (it fits a core's L2 cache while it is decompressed), a chunk 512 KiB. Smaller chunks cost
  more per-chunk overhead and compress worse; larger ones decompress more voxels that are thrown away.
* **values stored compactly.** CT images, windowed to [0, 1], are stored as ``uint16`` counts of
  ``1 / levels`` with 10 levels per HU of the window (4,250 for [-175, 250]): steps of 0.1 HU, at most
  0.05 HU from the float value, a tenth of the integer HU step of the source scans, and 0 and 1 (the
  clipped air and bone) exact. MRI images (z-normalised, unbounded) stay ``float32``. Label maps keep
  the smallest integer type that holds their values (``uint8`` mostly).
* **LZ4HC level 5 with byte shuffle.** Decompresses as fast as LZ4 and compresses about a fifth
  better on CT; ZSTD compresses better still but decompresses 3-4x slower, which would bound the loader.
* **a CRC-32 of every compressed chunk** is kept in the array's metadata and checked the first time a
  process reads that chunk of that file version (size and modification time; a process keeps its most
  recently read volumes open): a corrupt or truncated file stops with an error naming it, never a silent patch.

Files are written whole to a temporary file (compressed in memory, checksummed, fsynced) and renamed into
place, so an interrupted ``prepare`` never leaves a half-written volume behind.
"""

from __future__ import annotations

import os
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from maesil.data.records import DataError
from maesil.files import atomic_write, atomic_write_bytes

__all__ = [
    "BLOCKS", "CHUNKS", "FORMATS", "SUFFIXES", "VolumeFormat", "ct_levels", "load_volume", "preload_blosc2",
    "read_box",
    "write_volume",
]

VolumeFormat = Literal["npy", "blosc2"]
#: The volume formats of a cache (``prepare --format``, DataModule ``cache_format``).
FORMATS: tuple[str, ...] = ("npy", "blosc2")
#: File suffix of each format.
SUFFIXES: dict[str, str] = {"npy": ".npy", "blosc2": ".b2nd"}
CHUNKS = (64, 64, 64)
BLOCKS = (32, 32, 32)
#: Quantisation levels per HU of the CT window (steps of 0.1 HU).
LEVELS_PER_HU = 10
_META = "maesil"


def ct_levels(hu_window: Sequence[float]) -> int:
    """How many steps the stored CT values divide [0, 1] into: :data:`LEVELS_PER_HU` per HU of the window
    (at most 65,535, the range of ``uint16``)."""
    width = float(hu_window[1]) - float(hu_window[0])
    return int(min(65535, max(1, round(LEVELS_PER_HU * width))))


def preload_blosc2() -> None:
    """Import blosc2 now (e.g. before DataLoader workers are forked, so that they share its pages)."""
    _blosc2()


def _blosc2():
    try:
        import blosc2
    except ImportError as error:  # a dependency of maesil; only a broken install lacks it
        raise ImportError("the blosc2 cache format needs the blosc2 package: pip install 'blosc2>=3.0'") from error
    return blosc2


def write_volume(path: str | Path, array: np.ndarray, format: VolumeFormat, levels: int | None = None) -> Path:
    """Write ``array`` (X, Y, Z) atomically as ``format`` at ``path`` (its suffix must be the format's).

    ``levels``: blosc2 only: store ``round(array * levels)`` as ``uint16`` (values in [0, 1]: a windowed
    CT; read back as ``count / levels``, so 0 and 1 stay exact); ``None`` stores ``array`` as it is.
    """
    path = Path(path)
    if path.suffix != SUFFIXES[format]:
        raise ValueError(f"{path}: a {format} volume is named *{SUFFIXES[format]}")
    if format == "npy":
        if levels is not None:
            raise ValueError("npy volumes are stored as they are (levels must be None)")
        return atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))
    blosc2 = _blosc2()
    if levels is not None:
        if not 1 <= int(levels) <= 65535:
            raise ValueError(f"levels must be in [1, 65535], got {levels}")
        low, high = float(array.min()), float(array.max())
        if low < -1e-6 or high > 1 + 1e-6:
            raise ValueError(f"{path}: quantised volumes must lie in [0, 1], got [{low}, {high}]")
        array = np.rint(np.clip(array, 0, 1) * np.float32(levels)).astype(np.uint16)
    chunks = tuple(min(c, s) for c, s in zip(CHUNKS, array.shape))
    blocks = tuple(min(b, c) for b, c in zip(BLOCKS, chunks))
    cparams = blosc2.CParams(codec=blosc2.Codec.LZ4HC, clevel=5, filters=[blosc2.Filter.SHUFFLE], nthreads=1)
    frame = blosc2.asarray(np.ascontiguousarray(array), chunks=chunks, blocks=blocks, cparams=cparams).to_cframe()
    # The checksums are taken from the written file: an in-memory array encodes all-zero chunks differently.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        atomic_write_bytes(temporary, frame)
        stored = blosc2.open(str(temporary), mode="a")
        crcs = [zlib.crc32(stored.schunk.get_chunk(n)) for n in range(stored.schunk.nchunks)]
        stored.vlmeta[_META] = {"levels": None if levels is None else int(levels), "crc32": crcs}
        del stored
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def _open_b2nd(path: Path):
    blosc2 = _blosc2()
    try:
        volume = blosc2.open(str(path), mode="r", mmap_mode="r")
        meta = volume.vlmeta[_META]
    except FileNotFoundError:
        raise DataError(f"{path}: cached volume is missing; run `prepare` again") from None
    except Exception as error:  # noqa: BLE001 - blosc2 reports a damaged frame as RuntimeError/KeyError/...
        raise DataError(f"{path}: truncated or corrupt blosc2 volume ({type(error).__name__}: {error});"
                        " run `prepare` again") from None
    return volume, meta


class _OpenVolume(NamedTuple):
    """A ``.b2nd`` volume opened by this process, with the chunks whose checksum it has verified."""

    volume: Any
    meta: dict
    verified: set[int]


#: Volumes opened by this process, least recently read first: (pid, path, size, mtime_ns) -> _OpenVolume. The
#: file's size and time are in the key, so a volume that ``prepare`` rewrote (or that was truncated) is opened
#: and checked afresh; the pid, so that a worker never uses a handle opened before it was forked. At most
#: ``_MAX_OPEN`` stay open: an open volume keeps the pages it read mapped, so a process that kept every volume
#: of a large cache open would grow with the cache.
_opened: OrderedDict[tuple, _OpenVolume] = OrderedDict()
_MAX_OPEN = 8
#: Chunks verified per file version, kept when its volume is closed, so a reopen (about 0.3 ms) checks no
#: chunk twice. Bounded like a cache: forgotten wholesale past ``_MAX_VERIFIED`` file versions.
_verified: dict[tuple, set[int]] = {}
_MAX_VERIFIED = 100_000


def _opened_volume(path: Path) -> _OpenVolume:
    """The volume at ``path``, opened once per process and file version while it is among the ``_MAX_OPEN``
    most recently read (an open parses the frame's metadata, which a superpatch read should not repeat)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise DataError(f"{path}: cached volume is missing; run `prepare` again") from None
    key = (os.getpid(), str(path), stat.st_size, stat.st_mtime_ns)
    entry = _opened.get(key)
    if entry is not None:
        _opened.move_to_end(key)
        return entry
    while len(_opened) >= _MAX_OPEN:
        _opened.popitem(last=False)
    volume, meta = _open_b2nd(path)
    if key not in _verified and len(_verified) >= _MAX_VERIFIED:
        _verified.clear()
    entry = _opened[key] = _OpenVolume(volume, meta, _verified.setdefault(key, set()))
    return entry


def _check_chunks(volume, meta: dict, path: Path, src: Sequence[slice], verified: set[int]) -> None:
    """Compare the CRC-32 of every chunk the box ``src`` touches with the stored one; chunks in ``verified``
    (checked earlier in this process, same file version) are not fetched again, and checked ones join it."""
    grid = [-(-s // c) for s, c in zip(volume.shape, volume.chunks)]
    ranges = [range(sl.start // c, -(-sl.stop // c)) for sl, c in zip(src, volume.chunks)]
    crcs = meta["crc32"]
    for i in ranges[0]:
        for j in ranges[1]:
            for k in ranges[2]:
                n = (i * grid[1] + j) * grid[2] + k
                if n in verified:
                    continue
                try:
                    ok = n < len(crcs) and zlib.crc32(volume.schunk.get_chunk(n)) == crcs[n]
                except Exception:  # noqa: BLE001 - an unreadable chunk is a corrupt one
                    ok = False
                if not ok:
                    raise DataError(f"{path}: chunk {n} (voxels from {tuple(x * c for x, c in zip((i, j, k), volume.chunks))})"
                                    " is corrupt (checksum mismatch); run `prepare` again")
                verified.add(n)


def read_box(path: str | Path, src: Sequence[slice], out: np.ndarray) -> None:
    """Copy the box ``src`` (three slices inside the stored array) of the volume at ``path`` into ``out``
    (its shape; converted to its dtype, CT counts back to [0, 1]). A ``.b2nd`` read decompresses only the
    chunks it touches, after checking their checksums.

    Raises:
        DataError: the file is missing, truncated or corrupt (naming it).
    """
    path = Path(path)
    src = tuple(src)
    if path.suffix == ".npy":
        volume = _open_npy(path)
        out[...] = volume[src]
        del volume
        return
    volume, meta, verified = _opened_volume(path)
    _check_chunks(volume, meta, path, src, verified)
    values = _buffer(tuple(sl.stop - sl.start for sl in src), volume.dtype)
    try:
        volume.get_slice_numpy(values, ([sl.start for sl in src], [sl.stop for sl in src]))
    except Exception as error:  # noqa: BLE001 - a damaged chunk fails to decompress
        raise DataError(f"{path}: corrupt blosc2 volume ({type(error).__name__}: {error}); run `prepare` again") from None
    if meta["levels"] is None:
        out[...] = values
    else:  # a division, correctly rounded: count / levels is the float32 nearest to it, levels / levels is 1
        np.divide(values, np.float32(meta["levels"]), out=out, casting="unsafe")


_buffers: dict[tuple, np.ndarray] = {}


def _buffer(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A scratch array of ``shape`` reused by this process's superpatch reads (a read allocates nothing, so a
    worker's heap does not fragment over an epoch); a few shapes of at most 2²² voxels are kept."""
    if int(np.prod(shape)) > 2**22:  # whole volumes (validation): not kept
        return np.empty(shape, dtype=dtype)
    key = (shape, np.dtype(dtype).str)
    if key not in _buffers:
        if len(_buffers) >= 4:
            _buffers.clear()
        _buffers[key] = np.empty(shape, dtype=dtype)
    return _buffers[key]


def _open_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: cached volume is missing; run `prepare` again") from None
    except (OSError, ValueError) as error:  # a truncated file is shorter than its header says
        raise DataError(f"{path}: truncated or corrupt .npy volume ({error}); run `prepare` again") from None


def load_volume(path: str | Path) -> np.ndarray:
    """The whole stored volume at ``path`` in memory: ``float32`` for images, the stored integer type for
    labels (see :func:`read_box` for errors)."""
    path = Path(path)
    if path.suffix == ".npy":
        return np.array(_open_npy(path))
    volume, meta, _ = _opened_volume(path)  # the handle read_box uses: opened once
    dtype = np.float32 if meta["levels"] is not None else volume.dtype
    out = np.empty(volume.shape, dtype=dtype)
    read_box(path, tuple(slice(0, s) for s in volume.shape), out)
    return out
