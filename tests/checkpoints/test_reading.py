"""The one safe reader: maesil's checkpoints and exports load, pickles that would run code are refused."""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import pytest
import torch

from maesil.checkpoints import (
    CheckpointError,
    UnsafeCheckpointError,
    checkpoint_safe_globals,
    load_checkpoint_state,
    load_pretrained,
)
from maesil.models.unet import resenc_unet


class _Payload:
    """Unpickling this runs ``exec`` of code that writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_a_pickle_that_would_execute_code_is_refused(tmp_path: Path, zip_format: bool) -> None:
    live = tmp_path / "live_marker"
    pickle.loads(pickle.dumps(_Payload(live)))
    assert live.exists(), "the payload does not run when unpickled: the test would prove nothing"

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    state = {"encoder.stem.conv.weight": torch.zeros(4, 1, 3, 3, 3)}
    torch.save({"state_dict": state, "hyper_parameters": {"x": _Payload(marker)}}, path,
               _use_new_zipfile_serialization=zip_format)  # fmt: skip
    with pytest.raises(UnsafeCheckpointError, match="arbitrary unpickling") as info:
        load_pretrained(resenc_unet("tiny", out_channels=1), path)
    assert str(path) in str(info.value) and "exec" in str(info.value)
    assert not marker.exists()


def test_os_system_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class System:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "x": System()}, path)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load_checkpoint_state(path)
    assert not marker.exists()


def test_known_safe_types_of_python_built_runs_load(tmp_path: Path) -> None:
    """Modules built in Python (not through the CLI) save Path and ViewSettings hyperparameters."""
    from maesil.data.views import ViewSettings

    path = tmp_path / "api.ckpt"
    views = ViewSettings(view_size=16)
    torch.save({"state_dict": {"backbone.encoder.x": torch.ones(2)},
                "datamodule_hyper_parameters": {"data_dir": tmp_path, "views": views, "target_spacing": (2.0,) * 3}},
               path)  # fmt: skip
    state, metadata = load_checkpoint_state(path)
    assert torch.equal(state["backbone.encoder.x"], torch.ones(2))
    assert metadata["datamodule_hyper_parameters"]["data_dir"] == tmp_path
    assert metadata["datamodule_hyper_parameters"]["views"] == views
    assert {g.__name__ for g in checkpoint_safe_globals()} == {"PosixPath", "ViewSettings"}

    from maesil.data.preprocess import PreprocessSettings  # a maesil dataclass, but not on the list

    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"a": torch.ones(1)}, "settings": PreprocessSettings()}, other)
    with pytest.raises(UnsafeCheckpointError, match="PreprocessSettings"):
        load_checkpoint_state(other)


def test_files_that_are_not_checkpoints(tmp_path: Path) -> None:
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match="neither a PyTorch checkpoint") as info:
        load_checkpoint_state(text)
    assert str(text) in str(info.value)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        load_checkpoint_state(tmp_path / "missing.ckpt")
    no_state = tmp_path / "numbers.pt"
    torch.save({"epoch": 3}, no_state)
    with pytest.raises(CheckpointError, match="no state dict"):
        load_checkpoint_state(no_state)
    baseline = tmp_path / "ae.ckpt"
    torch.save({"state_dict": {"net.encode.conv.weight": torch.ones(1)}}, baseline)
    with pytest.raises(CheckpointError, match="AE checkpoint has no known encoder"):
        load_pretrained(resenc_unet("tiny"), baseline)


def test_the_refusal_text_of_torch_still_names_the_global(tmp_path: Path) -> None:
    """For legacy (non-zip) files the reader reads the refused type from this text of torch's error (see the
    "Private internals" of maesil.checkpoints.reading): when torch changes it, this fails first."""
    path = tmp_path / "evil_legacy.ckpt"
    torch.save({"x": _Payload(tmp_path / "never")}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(pickle.UnpicklingError) as info:
        torch.load(path, map_location="cpu", weights_only=True)
    text = str(info.value)
    assert re.search(r"WeightsUnpickler error:\s*\S", text), text
    assert any(name.endswith("exec") for name in re.findall(r"GLOBAL ([\w.]+)", text)), text


def test_another_pickle_protocol_loads_quietly_without_a_global_warning_filter(tmp_path: Path) -> None:
    path = tmp_path / "protocol3.ckpt"
    torch.save({"state_dict": {"encoder.x": torch.ones(2)}}, path, pickle_protocol=3)
    filters = list(warnings.filters)
    state, _ = load_checkpoint_state(path)
    assert warnings.filters == filters  # the loader's filter was scoped to its own call
    assert torch.equal(state["encoder.x"], torch.ones(2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_checkpoint_state(path)
    assert not [w for w in caught if "pickle protocol" in str(w.message)]
    with warnings.catch_warnings(record=True) as caught:  # torch does warn: the test is not void
        warnings.simplefilter("always")
        torch.load(path, map_location="cpu", weights_only=True)
    assert [w for w in caught if "pickle protocol" in str(w.message)]


def test_an_empty_lightning_state_dict_reads_but_a_file_without_one_does_not(tmp_path: Path) -> None:
    path = tmp_path / "no_parameters.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "x.Y"}, "global_step": 3}, path)
    state, metadata = load_checkpoint_state(path)
    assert state == {} and metadata["hyper_parameters"] == {"_class_path": "x.Y"} and metadata["global_step"] == 3
    empty = tmp_path / "empty.pt"
    torch.save({}, empty)
    with pytest.raises(CheckpointError, match="no state dict"):
        load_checkpoint_state(empty)
