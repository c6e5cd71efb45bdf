"""Atomic checkpoint writes: a failed write leaves the previous checkpoint intact and says so."""

from __future__ import annotations

import errno
import os

import pytest
import torch

import maesil.checkpoints.writing as checkpoint_io
from maesil.checkpoints.writing import (
    AtomicCheckpointIO,
    CheckpointWriteError,
    CorruptCheckpointError,
    atomic_torch_save,
    check_resumable,
    latest_last_checkpoint,
)
from maesil.cli import main
from tests.helpers import tiny_maesil_args


def test_atomic_save_writes_a_loadable_file_and_no_temporaries(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    atomic_torch_save({"weights": torch.arange(5.0), "global_step": 3}, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["global_step"] == 3 and torch.equal(loaded["weights"], torch.arange(5.0))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"global_step": 1}, path)
    before = path.read_bytes()

    monkeypatch.setattr(checkpoint_io.os, "fsync", _disk_full)
    with pytest.raises(CheckpointWriteError) as error:
        AtomicCheckpointIO().save_checkpoint({"global_step": 2}, path)
    message = str(error.value)
    assert str(path) in message and "No space left on device" in message and "intact" in message
    assert error.value.errno == errno.ENOSPC
    assert path.read_bytes() == before
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # the temporary file was removed


def test_failed_first_write_says_nothing_was_written(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_io.os, "replace", _disk_full)
    with pytest.raises(CheckpointWriteError, match="no file was written"):
        atomic_torch_save({"global_step": 2}, tmp_path / "new.ckpt")
    assert list(tmp_path.iterdir()) == []


CHECKPOINT_EVERY_2 = """
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {every_n_train_steps: 2, save_last: true, save_top_k: -1}
"""


def test_fit_stops_on_a_failed_checkpoint_write_and_keeps_the_last_good_one(tiny_ct_dir, tmp_path, monkeypatch):
    """The third save (step 4: a top-k file, then last.ckpt) fails like a full disk would."""
    overlay = tmp_path / "every2.yaml"
    overlay.write_text(CHECKPOINT_EVERY_2)
    run_dir = tmp_path / "run"
    real_fsync = checkpoint_io.os.fsync
    calls = {"n": 0}

    def fsync_until_full(fd):
        calls["n"] += 1
        if calls["n"] > 2:  # step 2 writes epoch=...-step=2.ckpt and last.ckpt; step 4 fails
            _disk_full()
        return real_fsync(fd)

    monkeypatch.setattr(checkpoint_io.os, "fsync", fsync_until_full)
    args = tiny_maesil_args(tiny_ct_dir, run_dir, max_steps=6)
    with pytest.raises(CheckpointWriteError, match="No space left on device"):
        main(["fit", *args, "--config", str(overlay), "--trainer.val_check_interval", "100",
              "--trainer.limit_val_batches", "0"])
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 2
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_resuming_from_a_truncated_last_checkpoint_names_it_and_the_alternatives(tiny_ct_dir, tmp_path):
    overlay = tmp_path / "every2.yaml"
    overlay.write_text(CHECKPOINT_EVERY_2)
    run_dir = tmp_path / "run"
    args = [*tiny_maesil_args(tiny_ct_dir, run_dir, max_steps=2), "--config", str(overlay),
            "--trainer.limit_val_batches", "0"]
    main(["fit", *args])
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a crash of a non-atomic writer

    with pytest.raises(CorruptCheckpointError) as error:
        main(["fit", *args, "--trainer.max_steps", "4", "--ckpt_path", "last"])
    message = str(error.value)
    assert str(last) in message and "truncated" in message
    assert "epoch=0-step=2.ckpt" in message  # the intact alternative
    with pytest.raises(CorruptCheckpointError, match="last.ckpt: not a complete torch checkpoint"):
        main(["fit", *args, "--trainer.max_steps", "4", "--ckpt_path", str(last)])

    main(["fit", *args, "--trainer.max_steps", "4",
          "--ckpt_path", str(run_dir / "checkpoints" / "epoch=0-step=2.ckpt")])
    # Lightning keeps the corrupt last.ckpt and names the new one last-v1.ckpt; `last` means the newest
    resumed = latest_last_checkpoint([run_dir / "checkpoints"])
    assert resumed.name == "last-v1.ckpt"
    assert torch.load(resumed, map_location="cpu", weights_only=False)["global_step"] == 4


def test_check_resumable_accepts_a_good_checkpoint_and_rejects_a_corrupt_byte(tmp_path):
    path = tmp_path / "a.ckpt"
    atomic_torch_save({"weights": torch.arange(1000.0)}, path)
    check_resumable(path)
    data = bytearray(path.read_bytes())
    offset = data.find(torch.arange(1000.0).numpy().tobytes()[:64])
    assert offset > 0
    data[offset + 10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="fails its CRC check"):
        check_resumable(path)
    with pytest.raises(FileNotFoundError, match="missing.ckpt does not exist"):
        check_resumable(tmp_path / "missing.ckpt")
