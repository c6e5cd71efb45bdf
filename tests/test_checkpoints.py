"""Safe checkpoint reading, key mapping with a report, automatic layouts, preprocessing checks."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from maesil.checkpoints import (
    PRETRAINED_LAYOUTS,
    CheckpointError,
    UnsafeCheckpointError,
    check_preprocessing,
    checkpoint_safe_globals,
    export_encoder,
    infer_method,
    load_checkpoint_state,
    load_pretrained,
)
from maesil.cli import main
from maesil.models.unet import ResEncUNet, resenc_unet
from maesil.models.vit3d import ViTEncoder3D
from tests.helpers import tiny_maesil_args
from tests.methods.test_pgl import tiny_args

# ------------------------------------------------------------------------------------- tiny real checkpoints

_CHECKPOINTS: dict[str, Path] = {}


def tiny_checkpoint(method: str, data_dir: Path, root: Path) -> Path:
    """``last.ckpt`` of a one-step CLI run of ``method`` (maesil, pgl, byol), made once per test session."""
    if method not in _CHECKPOINTS:
        run_dir = root / method
        if method == "maesil":
            args = tiny_maesil_args(data_dir, run_dir, max_steps=1)
        else:
            args = tiny_args(method, data_dir, run_dir, max_steps=1)
            args += ["--model.init_args.num_scales", "2"] if method == "pgl" else []
        main(["fit", *args, "--trainer.limit_val_batches", "0"])
        _CHECKPOINTS[method] = run_dir / "checkpoints" / "last.ckpt"
    return _CHECKPOINTS[method]


@pytest.fixture(scope="session")
def checkpoint_root(tmp_path_factory) -> Path:
    """One folder per session for the tiny runs (shared with tests/tools/test_export_encoder.py)."""
    return tmp_path_factory.getbasetemp() / "tiny_checkpoints"


@pytest.fixture
def pgl_ckpt(tiny_ct_dir: Path, checkpoint_root: Path) -> Path:
    return tiny_checkpoint("pgl", tiny_ct_dir, checkpoint_root)


@pytest.fixture
def byol_ckpt(tiny_ct_dir: Path, checkpoint_root: Path) -> Path:
    return tiny_checkpoint("byol", tiny_ct_dir, checkpoint_root)


@pytest.fixture
def maesil_ckpt(tiny_ct_dir: Path, checkpoint_root: Path) -> Path:
    return tiny_checkpoint("maesil", tiny_ct_dir, checkpoint_root)


class ViTSegmenter(nn.Module):
    """A downstream network holding a ViTEncoder3D at ``encoder`` (as UNETR does), sized like tiny_maesil_args."""

    def __init__(self, img_size: int = 32) -> None:
        super().__init__()
        self.encoder = ViTEncoder3D(img_size, patch_size=8, in_channels=1, embed_dim=48, depth=2, num_heads=2)
        self.head = nn.Linear(48, 3)


def raw_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def with_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + key: value for key, value in state.items()}


# ------------------------------------------------------------------------------------------------ key mapping


def test_renamed_prefix_is_mapped_and_reported(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = resenc_unet("tiny", out_channels=None)
    encoder_state = {k: v for k, v in source.state_dict().items() if k.startswith("encoder.")}
    state = with_prefix({k.removeprefix("encoder."): v for k, v in encoder_state.items()}, "model.vit.")
    state["model.vit.extra.weight"] = torch.ones(3)  # renamed, but the model has no such key
    state["model.proj.weight"] = torch.ones(2, 2)  # outside the mapping: ignored
    path = tmp_path / "renamed.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": {}}, path)

    model = resenc_unet("tiny", out_channels=2)
    decoder_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    report = load_pretrained(model, path, mapping={"model.vit.": "encoder."})

    assert report.layout == "custom"
    assert len(report.loaded) == len(encoder_state) == sum(k.startswith("encoder.") for k in model.state_dict())
    assert sorted(report.missing) == sorted(decoder_before)  # decoder and head keep their initialisation
    assert any(k.startswith("decoder.") for k in report.missing) and "head.weight" in report.missing
    assert report.unexpected == ["encoder.extra.weight"]
    assert report.ignored == ["model.proj.weight"] and report.shape_mismatched == []
    loaded = model.state_dict()
    for key, value in encoder_state.items():
        assert torch.equal(loaded[key], value), key
    for key, value in decoder_before.items():
        assert torch.equal(loaded[key], value), key
    summary = report.summary()
    assert f"loaded:           {len(encoder_state)}" in summary and "unexpected:       1" in summary
    assert "encoder.extra.weight" in summary and str(path) in summary


def test_a_mapping_that_matches_nothing_raises_with_the_file_name(tmp_path: Path) -> None:
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": with_prefix(resenc_unet("tiny", out_channels=None).state_dict(), "model.vit.")}, path)
    model = resenc_unet("tiny", out_channels=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="no tensor matches") as info:
        load_pretrained(model, path, mapping={"net.encoder.": "encoder."})
    message = str(info.value)
    assert str(path) in message and "model.vit.encoder.stem.conv.weight" in message and "encoder.stem" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_shape_mismatch_is_skipped_and_reported_or_raises_when_strict(tmp_path: Path) -> None:
    path = tmp_path / "two_channels.ckpt"
    torch.save({"state_dict": with_prefix(resenc_unet("tiny", in_channels=2, out_channels=None).state_dict(),
                                          "backbone.")}, path)  # fmt: skip
    model = resenc_unet("tiny", in_channels=1, out_channels=3)
    stem_before = model.state_dict()["encoder.stem.conv.weight"].clone()
    report = load_pretrained(model, path, mapping={"backbone.": ""})
    assert report.shape_mismatched == [("encoder.stem.conv.weight", (4, 2, 3, 3, 3), (4, 1, 3, 3, 3))]
    assert "encoder.stem.conv.weight" in report.missing and "encoder.stem.conv.bias" in report.loaded
    assert torch.equal(model.state_dict()["encoder.stem.conv.weight"], stem_before)
    assert "shape mismatched: 1" in report.summary() and "(4, 2, 3, 3, 3)" in report.summary()

    strict_model = resenc_unet("tiny", in_channels=1, out_channels=3)
    bias_before = strict_model.state_dict()["encoder.stem.conv.bias"].clone()
    with pytest.raises(ValueError, match="encoder.stem.conv.weight") as info:
        load_pretrained(strict_model, path, mapping={"backbone.": ""}, strict_shapes=True)
    assert str(path) in str(info.value)
    assert torch.equal(strict_model.state_dict()["encoder.stem.conv.bias"], bias_before)  # nothing copied


# ---------------------------------------------------------------------------------- real tiny checkpoints


def test_auto_layout_on_a_maesil_checkpoint(maesil_ckpt: Path, caplog) -> None:
    state = raw_state(maesil_ckpt)
    encoder = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.encoder.")}
    model = ViTSegmenter()
    with caplog.at_level(logging.INFO, logger="maesil.checkpoints"):
        report = load_pretrained(model, maesil_ckpt)
    assert report.layout == "maesil"
    assert sorted(report.loaded) == sorted(encoder) and report.missing == ["head.weight", "head.bias"]
    assert report.unexpected == [] and report.shape_mismatched == []
    for key, value in encoder.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert "layout 'maesil'" in caplog.text and "missing:          2" in caplog.text

    bare = ViTEncoder3D(64, patch_size=8, in_channels=1, embed_dim=48, depth=2, num_heads=2)  # another img_size
    report = load_pretrained(bare, maesil_ckpt)
    assert report.layout == "maesil (bare encoder)" and report.missing == []
    assert torch.equal(bare.patch_embed.proj.weight, state["net.encoder.patch_embed.proj.weight"])


def test_auto_layout_on_a_pgl_checkpoint_never_loads_the_ema_target(pgl_ckpt: Path) -> None:
    state = raw_state(pgl_ckpt)
    online = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    target = {k.removeprefix("target_backbone."): v for k, v in state.items() if k.startswith("target_backbone.")}
    assert any(not torch.equal(online[k], target[k]) for k in online), "target equals online: test is void"

    model = ResEncUNet(in_channels=1, out_channels=3, features=(4, 8, 16), blocks_per_stage=(1, 1, 1),
                       strides=(1, 2, 2))  # the "tiny" preset  # fmt: skip
    report = load_pretrained(model, pgl_ckpt)
    assert report.layout == "pgl"
    assert sorted(report.loaded) == sorted(online)
    assert any(k.startswith("decoder.") for k in report.loaded)
    assert report.missing == ["head.weight", "head.bias"] and report.unexpected == []
    for key, value in online.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert all(k in report.ignored for k in state if k.startswith("target_"))
    assert "EMA target_* keys, never loaded" in report.summary()


def test_auto_layout_on_a_byol_checkpoint_loads_the_encoder_only(byol_ckpt: Path) -> None:
    state = raw_state(byol_ckpt)
    assert infer_method(state) == "BYOL"  # from the projector's structure alone
    model = resenc_unet("tiny", out_channels=3)
    decoder_before = model.decoder.stages[0][0].conv.weight.clone()
    report = load_pretrained(model, byol_ckpt)
    assert report.layout == "byol"
    assert sorted(report.loaded) == sorted(k.removeprefix("backbone.") for k in state
                                           if k.startswith("backbone.encoder."))  # fmt: skip
    assert all(k.startswith(("decoder.", "head.")) for k in report.missing)
    assert torch.equal(model.decoder.stages[0][0].conv.weight, decoder_before)  # untrained decoder not loaded


def test_checkpoint_metadata_and_the_pgl_layout_registry(pgl_ckpt: Path) -> None:
    state, metadata = load_checkpoint_state(pgl_ckpt)
    assert metadata["hyper_parameters"]["_class_path"] == "maesil.methods.PGL"
    assert metadata["datamodule_hyper_parameters"]["target_spacing"] == 4.0
    assert infer_method(state, metadata) == "PGL"
    assert PRETRAINED_LAYOUTS["pgl"] == {"backbone.encoder.": "encoder.", "backbone.decoder.": "decoder."}
    assert check_preprocessing(metadata, modality="ct", target_spacing=4.0, superpatch_size=32) == []
    assert check_preprocessing(metadata, target_spacing=2.0) == ["pretrained at 4 mm spacing, fine-tuning at 2 mm"]


def test_s3d_checkpoint_transfers_encoder_and_decoder(tmp_path: Path) -> None:
    from maesil.methods.s3d import S3D

    torch.manual_seed(0)
    module = S3D(unet_preset="tiny", img_size=32, mask_block_size=8)
    path = tmp_path / "s3d.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    model = resenc_unet("tiny", out_channels=3)
    report = load_pretrained(model, path)
    assert report.layout == "s3d"
    assert report.missing == ["head.weight", "head.bias"] and report.unexpected == []
    assert any(k.startswith("net.mask_tokens.") for k in report.ignored)
    assert any(k.startswith("net.densify.") for k in report.ignored)
    assert torch.equal(model.decoder.stages[-1][0].conv.weight, module.net.decoder.stages[-1][0].conv.weight)

    out = export_encoder(path, tmp_path / "s3d.safetensors")
    state, sidecar = load_checkpoint_state(out)
    assert sidecar["method"] == "S3D" and sidecar["includes_decoder"] is True
    assert {k.split(".")[0] for k in state} == {"encoder", "decoder"}


# --------------------------------------------------------------------------------------------------- safety


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


# ---------------------------------------------------------------------------------------------- preprocessing


def test_check_preprocessing() -> None:
    sidecar = {"preprocessing": {"modality": "ct", "target_spacing": 1.5, "hu_window": [-175.0, 250.0],
                                 "superpatch_size": 128}}  # fmt: skip
    assert check_preprocessing(sidecar, modality="ct", target_spacing=[1.5, 1.5, 1.5], hu_window=(-175, 250),
                               superpatch_size=128) == []  # fmt: skip
    assert check_preprocessing(sidecar, target_spacing=2.0) == ["pretrained at 1.5 mm spacing, fine-tuning at 2 mm"]
    assert check_preprocessing(sidecar, target_spacing=(1.5, 1.5, 3.0)) == [
        "pretrained at 1.5 mm spacing, fine-tuning at 1.5×1.5×3 mm"
    ]
    warnings = check_preprocessing(sidecar, modality="mri", hu_window=(-1000, 1000), patch_size=96)
    assert warnings == ["pretrained on CT, fine-tuning on MRI", "pretrained on 128³ superpatches, fine-tuning on 96³ "
                        "patches"]  # HU windows do not apply to MRI  # fmt: skip
    assert check_preprocessing(sidecar, hu_window=(-1000, 1000)) == [
        "pretrained with HU window [-175, 250], fine-tuning with [-1000, 1000]"
    ]
    assert check_preprocessing({}, target_spacing=2.0) == []  # nothing recorded: nothing to compare
    assert check_preprocessing({"preprocessing": {"modality": "ct"}}, target_spacing=2.0) == []
    with pytest.raises(TypeError, match="spacing"):
        check_preprocessing(sidecar, spacing=2.0)
