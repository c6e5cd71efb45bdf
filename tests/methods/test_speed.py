"""The speed options every method takes: ``compile`` (torch.compile of its networks, checkpoints unchanged) and
``channels_last`` (channels_last_3d weights and inputs, same outputs)."""

from __future__ import annotations

import inspect

import lightning as L
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from maesil.cli import main
from maesil.methods import AE, BYOL, MAESIL, PGL, S3D, VAE, VQVAE
from maesil.methods.segmentation import Segmentation
from maesil.methods.speed import SPEED_ARGUMENTS, SpeedOptions, accepts_speed_options, networks, to_channels_last
from tests.helpers import tiny_maesil_args

TINY_VIT = dict(superpatch_size=32, token_size=8, embed_dim=24, depth=1, num_heads=2, decoder_embed_dim=24,
                decoder_depth=1, decoder_num_heads=2)
TINY_HEADS = dict(projection_dim=16, hidden_dim=32)
TINY_AE = dict(superpatch_size=32, channels=[4, 8, 16, 8], strides=[2, 2, 2, 1], num_res_units=1)

#: The convolutional methods: tiny constructor (taking the speed options) and their output on a batch.
CNN_METHODS = {
    "S3D": (lambda **speed: S3D(unet_preset="tiny", superpatch_size=32, mask_block_size=8, **speed),
            lambda module, images: module(images, torch.arange(128).reshape(2, 1, 4, 4, 4) % 3 > 0)),
    "BYOL": (lambda **speed: BYOL(unet_preset="tiny", **TINY_HEADS, **speed),
             lambda module, images: module.probe_features(images)),
    "PGL": (lambda **speed: PGL(unet_preset="tiny", num_scales=2, **TINY_HEADS, **speed),
            lambda module, images: module.probe_features(images)),
    "AE": (lambda **speed: AE(**TINY_AE, **speed),
           lambda module, images: module(images, deterministic=True).reconstruction),
    "VAE": (lambda **speed: VAE(**TINY_AE, latent_size=16, **speed),
            lambda module, images: module(images, deterministic=True).reconstruction),
    "VQVAE": (lambda **speed: VQVAE(superpatch_size=32, channels=[8, 16], num_res_layers=1, num_res_channels=[8, 16],
                                    num_embeddings=16, embedding_dim=8, **speed),
              lambda module, images: module(images, deterministic=True).reconstruction),
    "Segmentation": (lambda **speed: Segmentation(num_classes=3, architecture="unet", preset="tiny",
                                                  superpatch_size=32, **speed),
                     lambda module, images: module(images)),
}  # fmt: skip
#: Those whose output above calls a network (``net(x)``), which converts its inputs; the others call parts of
#: their networks (``encode``), whose convolutions follow the channels_last weights.
CALLING_THE_NETWORK = {"S3D", "AE", "Segmentation"}


@pytest.mark.parametrize("method", [MAESIL, S3D, AE, VAE, VQVAE, PGL, BYOL, Segmentation])
def test_every_method_takes_the_speed_options_as_keyword_arguments_off_by_default(method):
    parameters = inspect.signature(method.__init__).parameters
    assert list(parameters)[-4:] == ["compile", "compile_mode", "compile_backend", "channels_last"] == list(SPEED_ARGUMENTS)
    assert [parameters[name].default for name in SPEED_ARGUMENTS] == [False, None, "inductor", False]
    assert all(parameters[name].kind is inspect.Parameter.KEYWORD_ONLY for name in SPEED_ARGUMENTS)


def test_the_options_are_stored_and_not_hyperparameters():
    default = MAESIL(**TINY_VIT)
    assert default.speed_options == SpeedOptions()
    chosen = MAESIL(**TINY_VIT, compile=True, compile_mode="max-autotune", compile_backend="eager", channels_last=True)
    assert chosen.speed_options == SpeedOptions(True, "max-autotune", "eager", True)
    assert not set(SPEED_ARGUMENTS) & set(chosen.hparams)
    assert dict(chosen.hparams) == dict(default.hparams)


def test_a_bad_compile_mode_names_the_key():
    with pytest.raises(ValueError, match=r"model.init_args.compile_mode must be one of default, reduce-overhead, "
                                         r"max-autotune, max-autotune-no-cudagraphs or null, got 'fast'"):
        MAESIL(**TINY_VIT, compile=True, compile_mode="fast")


def test_a_constructor_with_its_own_compile_argument_is_refused():
    def __init__(self, compile: bool = False) -> None:  # noqa: A002
        pass

    with pytest.raises(TypeError, match=r"has its own \['compile'\]"):
        accepts_speed_options(__init__)


def test_the_networks_are_the_parameterised_children_without_metrics():
    module = MAESIL(**TINY_VIT)
    assert networks(module) == [module.net]
    byol = BYOL(unet_preset="tiny", **TINY_HEADS)
    assert networks(byol) == [byol.backbone, byol.projector, byol.predictor, byol.target_backbone,
                              byol.target_projector]


# ------------------------------------------------------------------------------------------------ compile
class Superpatches(L.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        batch = {"image": torch.rand(2, 1, 32, 32, 32), "subject_id": ["a", "b"]}
        return DataLoader([batch] * 4, batch_size=None)


def test_compile_trains_and_keeps_the_checkpoint_keys_and_reports_the_first_steps(tmp_path, capsys):
    torch.manual_seed(0)
    plain_keys = list(MAESIL(**TINY_VIT).state_dict())
    module = MAESIL(**TINY_VIT, compile=True, compile_backend="eager")  # eager: no C compiler needed
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=Superpatches())
    assert module.net._compiled_call_impl is not None  # compiled in place
    assert trainer.global_step == 2
    assert len(module.compiled_step_seconds) == 2 and min(module.compiled_step_seconds) > 0
    first, second = module.compiled_step_seconds
    assert (f"torch.compile (eager): first step {first:.2f} s (compilation included), second step {second:.2f} s"
            in capsys.readouterr().out)
    assert list(module.state_dict()) == plain_keys
    path = tmp_path / "compiled.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    assert list(saved) == plain_keys and not any("_orig_mod" in key for key in saved)
    loaded = MAESIL.load_from_checkpoint(path, map_location="cpu")
    assert all(torch.equal(loaded.state_dict()[key], value) for key, value in saved.items())


def test_without_compile_nothing_is_compiled_or_timed(tmp_path):
    module = MAESIL(**TINY_VIT)
    module.configure_model()
    assert module.net._compiled_call_impl is None and module.compiled_step_seconds == []


# ------------------------------------------------------------------------------------------ channels_last
@pytest.mark.parametrize("name", sorted(CNN_METHODS))
def test_channels_last_gives_the_default_layout_s_outputs(name):
    build, output = CNN_METHODS[name]
    torch.manual_seed(0)
    default = build().eval()
    fast = build(channels_last=True).eval()
    fast.load_state_dict(default.state_dict())
    fast.configure_model()
    convolutions = [param for param in fast.parameters() if param.dim() == 5]
    assert convolutions and all(param.is_contiguous(memory_format=torch.channels_last_3d) for param in convolutions)
    assert list(fast.state_dict()) == list(default.state_dict())
    layouts = []
    for network in networks(fast):  # registered after the conversion: sees what the network computes on
        network.register_forward_pre_hook(lambda _, args: layouts.extend(
            arg.is_contiguous(memory_format=torch.channels_last_3d) for arg in args if arg.dim() == 5))
    images = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        expected, got = output(default, images), output(fast, images)
    assert all(layouts) and bool(layouts) == (name in CALLING_THE_NETWORK)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    fast.configure_model()  # again (validate after fit): converts nothing twice
    assert sum(len(network._forward_pre_hooks) for network in networks(fast)) == 2 * len(networks(fast))


def test_only_5d_floating_tensors_of_a_batch_change_layout():
    image, labels, location = torch.rand(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4, dtype=torch.long), torch.ones(3)
    batch = to_channels_last({"image": image, "label": labels, "location": location, "views": [image, (image,)],
                              "subject_id": ["a"]})
    assert batch["image"].is_contiguous(memory_format=torch.channels_last_3d)
    assert batch["views"][0].is_contiguous(memory_format=torch.channels_last_3d)
    assert batch["views"][1][0].is_contiguous(memory_format=torch.channels_last_3d)
    assert batch["label"] is labels and batch["location"] is location and batch["subject_id"] == ["a"]
    assert torch.equal(batch["image"], image)


@pytest.mark.slow
def test_the_yaml_keys_compile_a_cli_run_and_stay_out_of_its_checkpoints(tiny_ct_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    speed = ["--model.init_args.compile", "true", "--model.init_args.compile_backend", "eager",
             "--model.init_args.channels_last", "true"]
    main(["fit", *tiny_maesil_args(tiny_ct_dir, run_dir, max_steps=2), *speed])
    assert capsys.readouterr().out.count("torch.compile (eager): first step") == 1
    last = run_dir / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    assert not set(SPEED_ARGUMENTS) & set(checkpoint["hyper_parameters"])
    plain = MAESIL.load_from_checkpoint(last, map_location="cpu")  # built from the hyperparameters: not compiled
    assert plain.speed_options == SpeedOptions()
    assert list(checkpoint["state_dict"]) == list(plain.state_dict())
    assert not any("_orig_mod" in key for key in checkpoint["state_dict"])
    config = yaml.safe_load((run_dir / "logs" / "version_0" / "config.yaml").read_text())
    assert {key: config["model"]["init_args"][key] for key in SPEED_ARGUMENTS} == {
        "compile": True, "compile_mode": None, "compile_backend": "eager", "channels_last": True}
    main(["fit", *tiny_maesil_args(tiny_ct_dir, run_dir, max_steps=4), *speed, "--ckpt_path", str(last)])
    assert capsys.readouterr().out.count("torch.compile (eager): first step") == 1  # the command's options stand
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 4
