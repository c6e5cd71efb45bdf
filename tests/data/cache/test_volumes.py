"""Cached volume files: the blosc2 format against the ``.npy`` one, chunk-local reads, damaged files named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from maesil.data.cache import CachedPatchDataset, CacheIndex, load_cached_subject, prepare_cache
from maesil.data.cache.volumes import CHUNKS, ct_levels, load_volume, read_box, write_volume
from maesil.data.records import DataError

from .conftest import SETTINGS, records_of

LEVELS = ct_levels(SETTINGS.hu_window)
STEP = 1 / LEVELS


@pytest.fixture(scope="module")
def prepared_blosc2(tiny_ct_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache_b2")
    report = prepare_cache(records_of(tiny_ct_dir), out, SETTINGS, workers=1, progress=False, format="blosc2")
    assert not report.failed
    return out


def _stored(shape=(100, 90, 70), seed=0) -> np.ndarray:
    """A windowed-CT-like volume in [0, 1] with exact 0 and 1 (air and bone)."""
    values = np.random.default_rng(seed).random(shape, dtype=np.float32)
    values[:10] = 0.0
    values[-5:] = 1.0
    return values


def test_blosc2_cache_equals_the_npy_cache_within_a_tenth_of_a_hu(prepared, prepared_blosc2) -> None:
    npy_dir, records, _ = prepared
    npy, b2 = CacheIndex.load(npy_dir), CacheIndex.load(prepared_blosc2)
    assert LEVELS == 4250
    for record in records:
        entry = b2.entries[record.subject_id]
        assert entry.image.endswith("image.b2nd") and entry.label.endswith("label.b2nd")
        assert entry.shape == npy.entries[record.subject_id].shape
        exact = np.load(npy.entries[record.subject_id].image_path)
        stored = load_volume(entry.image_path)
        assert stored.dtype == np.float32 and stored.shape == exact.shape
        assert np.abs(stored - exact).max() <= STEP / 2 + 1e-7  # 0.05 HU of the 425 HU window
        assert (stored[exact == 0] == 0).all() and (stored[exact == 1] == 1).all() and (exact == 1).any()
        label = load_volume(entry.label_path)
        assert label.dtype == np.uint8 and np.array_equal(label, np.load(npy.entries[record.subject_id].label_path))
        subject = load_cached_subject(b2, record.subject_id, with_label=True)
        assert np.array_equal(subject["image"].data[0].numpy(), stored)
    ids = [r.subject_id for r in records]
    for a, b in zip(CachedPatchDataset(npy, ids, 12, 3, with_label=True, seed=5),
                    CachedPatchDataset(b2, ids, 12, 3, with_label=True, seed=5)):
        assert a["subject_id"] == b["subject_id"] and np.array_equal(a["location"], b["location"])
        assert (a["image"] - b["image"]).abs().max() <= STEP / 2 + 1e-7
        assert np.array_equal(a["label"], b["label"])


def test_blosc2_is_quantised_chunked_and_smaller(tmp_path: Path) -> None:
    import blosc2

    values = _stored()
    path = write_volume(tmp_path / "image.b2nd", values, "blosc2", levels=LEVELS)
    stored = blosc2.open(str(path), mode="r")
    assert stored.dtype == np.uint16 and stored.chunks == CHUNKS and stored.blocks == (32, 32, 32)
    assert np.array_equal(stored[:], np.rint(values * 4250).astype(np.uint16))
    npy = write_volume(tmp_path / "image.npy", values, "npy")
    assert path.stat().st_size < npy.stat().st_size / 2  # uint16 of uniform noise: no more than the 2 bytes
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        write_volume(tmp_path / "bad.b2nd", values * 2, "blosc2", levels=LEVELS)
    with pytest.raises(ValueError, match=r"\*\.npy"):
        write_volume(tmp_path / "image.b2nd", values, "npy")


def _corrupt_chunk(path: Path, chunk: int) -> None:
    """Flip bytes in the middle of one compressed chunk of the ``.b2nd`` at ``path``."""
    import blosc2

    data = bytearray(path.read_bytes())
    stored = blosc2.open(str(path), mode="r")  # held: its super-chunk lives as long as the array
    payload = stored.schunk.get_chunk(chunk)
    del stored
    at = bytes(data).find(payload)
    assert at > 0
    middle = at + len(payload) // 2
    data[middle:middle + 64] = bytes(b ^ 0x5A for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))


def test_a_corrupt_chunk_fails_only_the_reads_that_touch_it(tmp_path: Path) -> None:
    values = _stored()
    path = write_volume(tmp_path / "image.b2nd", values, "blosc2", levels=LEVELS)
    _corrupt_chunk(path, 7)  # the last of the 2 x 2 x 2 chunks: voxels from (64, 64, 64)
    out = np.empty((64, 64, 64), np.float32)
    read_box(path, (slice(0, 64), slice(0, 64), slice(0, 64)), out)  # chunk 0 only: unaffected
    assert np.abs(out - values[:64, :64, :64]).max() <= STEP / 2 + 1e-7
    with pytest.raises(DataError, match=rf"{path}: chunk 7 \(voxels from \(64, 64, 64\)\) is corrupt"):
        read_box(path, (slice(30, 94), slice(30, 90), slice(30, 70)), np.empty((64, 60, 40), np.float32))


def test_a_process_keeps_few_volumes_open_and_checks_a_chunk_once_per_file_version(tmp_path: Path,
                                                                                   monkeypatch) -> None:
    import zlib

    from maesil.data.cache import volumes

    monkeypatch.setattr(volumes, "_opened", type(volumes._opened)())
    monkeypatch.setattr(volumes, "_verified", {})
    checked, crc32 = [], zlib.crc32
    monkeypatch.setattr(volumes.zlib, "crc32", lambda data: checked.append(1) or crc32(data))
    paths = [write_volume(tmp_path / f"v{i}.b2nd", _stored((70, 70, 70), seed=i), "blosc2", levels=LEVELS)
             for i in range(volumes._MAX_OPEN + 3)]
    box, out = (slice(0, 64),) * 3, np.empty((64, 64, 64), np.float32)
    checked.clear()  # the writes computed theirs
    for path in paths:
        read_box(path, box, out)
    assert len(volumes._opened) == volumes._MAX_OPEN  # the least recently read were closed
    assert len(checked) == len(paths)  # one chunk per read
    read_box(paths[0], box, out)  # closed, opened again: its chunk is not checked again
    assert len(checked) == len(paths) and len(volumes._opened) == volumes._MAX_OPEN
    assert np.abs(out - _stored((70, 70, 70), seed=0)[:64, :64, :64]).max() <= STEP / 2 + 1e-7
    _corrupt_chunk(paths[1], 0)  # a new file version (size or time): opened and checked afresh
    with pytest.raises(DataError, match="chunk 0 .* is corrupt"):
        read_box(paths[1], box, out)


def _break(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "corrupt chunk":
        _corrupt_chunk(path, 0)
    else:
        path.unlink()


@pytest.mark.parametrize("how", ["truncated", "corrupt chunk", "missing"])
def test_a_damaged_volume_stops_the_read_naming_subject_and_file(prepared_blosc2: Path, tmp_path: Path,
                                                                   how: str) -> None:
    import shutil

    cache = Path(shutil.copytree(prepared_blosc2, tmp_path / "cache"))
    index = CacheIndex.load(cache)
    subject = sorted(index.entries)[1]
    path = index.entries[subject].image_path
    _break(path, how)
    dataset = CachedPatchDataset(index, [subject], 8, 2)
    with pytest.raises(DataError) as info:
        dataset[0]
    assert f"subject {subject!r}" in str(info.value) and str(path) in str(info.value)
    with pytest.raises(DataError, match=f"subject {subject!r}: {path}"):
        load_cached_subject(index, subject, with_label=False)


@pytest.mark.parametrize("format", ["npy", "blosc2"])
def test_a_truncated_label_stops_the_read(prepared, prepared_blosc2, tmp_path: Path, format: str) -> None:
    import shutil

    source = prepared[0] if format == "npy" else prepared_blosc2
    cache = Path(shutil.copytree(source, tmp_path / "cache"))
    index = CacheIndex.load(cache)
    subject = sorted(index.entries)[0]
    path = index.entries[subject].label_path
    _break(path, "truncated")
    with pytest.raises(DataError, match=f"subject {subject!r}: {path}: truncated or corrupt"):
        CachedPatchDataset(index, [subject], 8, 2, with_label=True)[0]


def test_an_interrupted_prepare_resumes_and_lists_only_whole_subjects(tiny_ct_dir: Path, tmp_path: Path,
                                                                      monkeypatch) -> None:
    """A run killed while writing a subject's volumes leaves that subject out of the index; the next run
    prepares it (and what follows) and skips what was done."""
    import maesil.data.cache.writer as writer

    records = records_of(tiny_ct_dir)
    calls = []
    real = writer.write_volume

    def killed_at_the_third_write(path, *args, **kwargs):
        calls.append(Path(path).name)
        if len(calls) == 3:  # subject 0: label, image; subject 1: label, then killed before its image
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(writer, "write_volume", killed_at_the_third_write)
    with pytest.raises(KeyboardInterrupt):
        prepare_cache(records, tmp_path, SETTINGS, workers=1, progress=False, format="blosc2")
    monkeypatch.setattr(writer, "write_volume", real)
    index = CacheIndex.load(tmp_path)
    assert list(index.entries) == [records[0].subject_id]
    report = prepare_cache(records, tmp_path, SETTINGS, workers=1, progress=False, format="blosc2")
    assert report.skipped == [records[0].subject_id]
    assert report.prepared == [r.subject_id for r in records[1:]]
    assert not list(tmp_path.glob("subjects/*/.*.tmp"))
    assert set(CacheIndex.load(tmp_path).entries) == {r.subject_id for r in records}


def test_all_zero_chunks_pass_their_checksum(tmp_path: Path) -> None:
    """blosc2 encodes an all-zero chunk specially (and differently in memory and in a file)."""
    values = _stored()
    values[64:, :, :] = 0.0
    path = write_volume(tmp_path / "image.b2nd", values, "blosc2", levels=LEVELS)
    assert np.array_equal(load_volume(path), np.rint(values * LEVELS) / np.float32(LEVELS))
