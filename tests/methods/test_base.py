"""The base of every method: what it reads of its data (the DataModule's spec), the checks ``setup`` makes before
any step, renamed arguments, the trainer it is attached to, and the learning-rate scaling of its groups."""

from __future__ import annotations

import dataclasses
from functools import partial

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from maesil.data.spec import DataSpec
from maesil.methods import MAESIL, PGL, MethodModule
from maesil.methods.arguments import renamed_argument, superpatch_argument, unet_overrides
from maesil.methods.base import datamodule_spec
from maesil.trainer_attachment import attached_trainer

SPEC = DataSpec(task="reconstruct", modality="ct", superpatch_size=(32, 32, 32), target_spacing=4.0,
                hu_window=(-175.0, 250.0), num_classes=None, batch_size=2)


def tiny_spec(**changes) -> DataSpec:
    """A DataSpec of 32³ CT superpatches, batches of 2, task ``reconstruct`` unless changed."""
    return dataclasses.replace(SPEC, **changes)


class SpecData(L.LightningDataModule):
    """Publishes ``spec``; its batches are plain superpatches (no ``view1``), whatever the task says."""

    def __init__(self, spec: DataSpec) -> None:
        super().__init__()
        self.spec = spec

    def train_dataloader(self) -> DataLoader:
        return DataLoader([{"image": torch.rand(2, 1, 32, 32, 32), "subject_id": ["a", "b"]}] * 2, batch_size=None)


class StepCounter(L.Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps += 1


def fit(module: L.LightningModule, spec: DataSpec, tmp_path) -> StepCounter:
    counter = StepCounter()
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[counter])
    trainer.fit(module, datamodule=SpecData(spec))
    return counter


def tiny_maesil(**overrides) -> MAESIL:
    return MAESIL(**{"superpatch_size": 32, "token_size": 8, "embed_dim": 24, "depth": 1, "num_heads": 2,
                     "decoder_embed_dim": 24, "decoder_depth": 1, "decoder_num_heads": 2, **overrides})


# ------------------------------------------------------------------------------------------ the data task
def test_methods_declare_the_task_they_need():
    from maesil.methods import AE, BYOL, S3D, VAE, VQVAE, Segmentation

    assert {cls: cls.accepted_tasks for cls in (MAESIL, S3D, AE, VAE, VQVAE, PGL, BYOL, Segmentation)} == {
        MAESIL: ("reconstruct",), S3D: ("reconstruct",), AE: ("reconstruct",), VAE: ("reconstruct",),
        VQVAE: ("reconstruct",), PGL: ("two_view",), BYOL: ("two_view",), Segmentation: ("segment",)}


def test_a_task_the_method_cannot_train_on_stops_before_any_step(tmp_path):
    torch.manual_seed(0)
    pgl = PGL(unet_preset="tiny", projection_dim=8, hidden_dim=16, num_scales=2)
    with pytest.raises(ValueError) as error:
        fit(pgl, tiny_spec(task="reconstruct"), tmp_path)  # the batches have no view1: a step would KeyError
    assert str(error.value) == ("PGL needs data.init_args.task: two_view (the DataModule has task 'reconstruct')")
    assert pgl.global_step == 0


def test_an_accepted_task_and_size_train(tmp_path):
    module = tiny_maesil()
    assert fit(module, tiny_spec(), tmp_path).steps == 1


def test_a_superpatch_other_than_the_network_s_stops_at_setup_naming_the_data_key(tmp_path):
    module = tiny_maesil()
    with pytest.raises(ValueError) as error:
        fit(module, tiny_spec(superpatch_size=(64, 64, 64)), tmp_path)
    message = str(error.value)
    assert message.startswith("MAESIL was built for superpatches of (32, 32, 32), but the DataModule samples "
                              "(64, 64, 64). State the size once, as data.init_args.superpatch_size")


def test_without_a_spec_nothing_is_checked_and_the_modality_falls_back():
    module = tiny_maesil()
    assert attached_trainer(module) is None and module.data_spec is None
    module.setup("fit")  # no trainer: nothing to check
    assert module.data_modality == "ct"
    module.input_modality = "MRI"
    assert module.data_modality == "mri"


def test_the_spec_is_read_from_the_trainer_s_datamodule_only():
    from types import SimpleNamespace

    assert datamodule_spec(None) is None
    assert datamodule_spec(SimpleNamespace(datamodule=None)) is None
    assert datamodule_spec(SimpleNamespace(datamodule=SimpleNamespace(modality="mri"))) is None  # no spec: ignored
    spec = tiny_spec(modality="mri")
    assert datamodule_spec(SimpleNamespace(datamodule=SimpleNamespace(spec=spec))) is spec


def test_attached_trainer_follows_lightning_s_public_trainer_property(tmp_path):
    """``LightningModule.trainer`` raises RuntimeError when detached (Lightning 2.6.6): if that changes, this fails."""
    module = L.LightningModule()
    with pytest.raises(RuntimeError, match="not attached to a `Trainer`"):
        module.trainer  # noqa: B018
    assert attached_trainer(module) is None
    trainer = L.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path)
    module.trainer = trainer
    assert attached_trainer(module) is trainer


# ------------------------------------------------------------------------------------------ renamed arguments
def test_renamed_argument_takes_either_name_warns_on_the_old_one_and_refuses_a_conflict():
    assert renamed_argument("M", "token_size", None, "patch_size", None, default=8, yaml_key="k") == 8
    assert renamed_argument("M", "token_size", 16, "patch_size", None, default=8, yaml_key="k") == 16
    with pytest.warns(FutureWarning, match=r"M: patch_size is deprecated, use token_size \(in YAML: k\)"):
        assert renamed_argument("M", "token_size", None, "patch_size", 16, default=8, yaml_key="k") == 16
    with pytest.warns(FutureWarning):
        assert superpatch_argument("M", [32, 32, 32], 32, default=128) == [32, 32, 32]  # the same size
    with pytest.raises(ValueError, match="M got img_size=64 and superpatch_size=32; img_size is the deprecated name "
                                         "of superpatch_size: give superpatch_size only"):
        superpatch_argument("M", 32, 64, default=128)


def test_methods_take_the_old_names_and_save_the_new_ones():
    with pytest.warns(FutureWarning, match="use superpatch_size"):
        module = MAESIL(img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=2, decoder_embed_dim=24,
                        decoder_depth=1, decoder_num_heads=2)
    assert module.superpatch_size == (32, 32, 32) and module.token_size == 8 and module.grid == (4, 4, 4)
    assert module.hparams.superpatch_size == 32 and module.hparams.token_size == 8
    assert "img_size" not in module.hparams and "patch_size" not in module.hparams
    assert tiny_maesil(superpatch_size=[32, 32, 16]).superpatch_size == (32, 32, 16)


def test_defaults_when_neither_name_is_given():
    with torch.device("meta"):
        module = MAESIL(embed_dim=24, depth=1, num_heads=2, decoder_embed_dim=24, decoder_depth=1,
                        decoder_num_heads=2)
    assert module.superpatch_size == (128, 128, 128) and module.token_size == 8 and module.grid == (16, 16, 16)


def test_unet_overrides_are_the_given_arguments_as_lists():
    assert unet_overrides(None, None, None) == {}
    assert unet_overrides((4, 8), None, [1, 2]) == {"features": [4, 8], "strides": [1, 2]}


# ------------------------------------------------------------------------------------------ optimisation
class _Groups(MethodModule):
    """Two layers, the second in a group with ``lr_scale`` 0.5."""

    def __init__(self) -> None:
        super().__init__(optimizer=partial(torch.optim.AdamW, lr=0.1), scheduler=None)
        self.first, self.second = nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False)

    def parameter_groups(self) -> list[dict]:
        return [{"params": [self.first.weight]}, {"params": [self.second.weight], "lr_scale": 0.5}]


def test_learning_rates_scale_by_the_batch_factor_and_each_group_s_lr_scale():
    module = _Groups()
    module.batch_lr_factor = 0.25
    optimizer = module.configure_optimizers()
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([0.025, 0.0125])
    assert [group["initial_lr"] for group in optimizer.param_groups] == pytest.approx([0.025, 0.0125])


def test_fit_start_prints_the_method_s_description(tmp_path, capsys):
    fit(tiny_maesil(), tiny_spec(), tmp_path)
    assert "M parameters, input (32, 32, 32), 64 tokens, dual masking" in capsys.readouterr().out
