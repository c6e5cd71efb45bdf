"""``python -m maesil prepare``: a cache the DataModule trains from, idempotent re-runs, clear failures."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from maesil.cli import main
from maesil.data.cache import CacheIndex
from tests.data.conftest import write_volume
from tests.helpers import tiny_maesil_args


def _run(capsys, *argv: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(["prepare", *argv])
    captured = capsys.readouterr()
    return int(info.value.code), captured.out


def test_prepare_is_idempotent(flat_ct_dir: Path, tmp_path: Path, capsys) -> None:
    cache = tmp_path / "cache"
    args = (str(flat_ct_dir), "--out", str(cache), "--target-spacing", "3", "--workers", "1", "--no-progress")
    code, out = _run(capsys, *args)
    assert code == 0 and "4 prepared, 0 unchanged" in out
    index = json.loads((cache / "index.json").read_text())
    assert index["settings"]["target_spacing"] == [3.0, 3.0, 3.0] and len(CacheIndex.load(cache)) == 4
    code, out = _run(capsys, *args)
    assert code == 0 and "0 prepared, 4 unchanged" in out
    source = flat_ct_dir / "case_002.nii.gz"
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    code, out = _run(capsys, *args)
    assert code == 0 and "1 prepared, 3 unchanged" in out
    code, out = _run(capsys, *args[:-3], "--target-spacing", "2", "--workers", "1", "--no-progress")
    assert code == 1 and "prepared with" in out  # other settings: refused without --force


def test_prepare_reports_bad_files_and_exits_nonzero(flat_ct_dir: Path, tmp_path: Path, capsys) -> None:
    (flat_ct_dir / "broken.nii.gz").write_bytes(b"\x1f\x8b garbage")
    blank = write_volume(flat_ct_dir / "blank.nii.gz", np.zeros((40, 36, 20), np.int16))
    code, out = _run(capsys, str(flat_ct_dir), "--out", str(tmp_path / "cache"), "--workers", "1", "--no-progress")
    assert code == 1
    assert str(flat_ct_dir / "broken.nii.gz") in out and "cannot be read" in out
    assert str(blank) in out and "constant" in out
    assert "5 prepared" in out and "1 failed" in out and "2 problem(s)" in out


def test_prepare_from_config_then_fit_from_cache(tiny_ct_dir: Path, tmp_path: Path, capsys) -> None:
    config = tmp_path / "data.yaml"
    cache = tmp_path / "cache"
    config.write_text(
        "data:\n  class_path: maesil.data.VolumeDataModule\n  init_args:\n"
        f"    data_dir: {tiny_ct_dir}\n    cache_dir: {cache}\n    target_spacing: 4.0\n"
    )
    code, out = _run(capsys, "--config", str(config), "--no-progress")
    assert code == 0 and "3 prepared" in out
    run_dir = tmp_path / "run"
    from maesil.lightning_cli import MaesilCLI

    MaesilCLI(args=["fit", *tiny_maesil_args(tiny_ct_dir, run_dir, max_steps=2),
                    "--data.init_args.cache_dir", str(cache), "--data.init_args.num_workers", "1"])
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_prepare_format_blosc2_from_the_flag_and_upgrades_a_version_1_index(flat_ct_dir: Path, tmp_path: Path,
                                                                             capsys) -> None:
    from maesil.data.cache.index import SUBJECTS_TABLE, read_subjects

    cache = tmp_path / "cache"
    args = (str(flat_ct_dir), "--out", str(cache), "--target-spacing", "3", "--workers", "1", "--no-progress")
    code, out = _run(capsys, *args, "--format", "blosc2")
    assert code == 0 and "4 prepared, 0 unchanged" in out
    assert len(list(cache.glob("subjects/*/image.b2nd"))) == 4 and not list(cache.glob("subjects/*/image.npy"))
    # an index of version 1 (entries inline in index.json) is upgraded without preparing again
    header = json.loads((cache / "index.json").read_text())
    header.update(version=1, subjects=read_subjects(cache, header))
    (cache / "index.json").write_text(json.dumps(header))
    (cache / SUBJECTS_TABLE).unlink()
    code, out = _run(capsys, *args, "--format", "blosc2")
    assert code == 0 and "0 prepared, 4 unchanged" in out and len(CacheIndex.load(cache)) == 4
    code, out = _run(capsys, *args)  # npy (the default): every subject is stored again
    assert code == 0 and "4 prepared, 0 unchanged" in out
    assert len(list(cache.glob("subjects/*/image.npy"))) == 4 and not list(cache.glob("subjects/*/image.b2nd"))
