"""Segmentation fine-tuning: networks, optimiser groups, the encoder warm-up, and runs through the CLI."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import nibabel as nib
import numpy as np
import pytest
import torch

from maesil.callbacks import EncoderWarmup
from maesil.cli import main
from maesil.methods import Segmentation
from tests.helpers import REPO_ROOT, TINY_SPACING, tiny_data_overrides
from tests.methods.test_base import tiny_spec


def test_unet_and_unetr_networks_and_their_encoders():
    unet = Segmentation(num_classes=3, architecture="unet", preset="tiny", img_size=32)
    assert unet(torch.randn(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)
    assert all(name.startswith("net.encoder.") for name, _ in unet.named_parameters()
               if any(p is _ for p in unet.encoder.parameters()))
    unetr = Segmentation(num_classes=4, architecture="unetr", preset="tiny", img_size=32)
    assert unetr(torch.randn(1, 1, 32, 32, 32)).shape == (1, 4, 32, 32, 32)
    with pytest.raises(ValueError, match="num_classes"):
        Segmentation(num_classes=1, preset="tiny")
    with pytest.raises(ValueError, match="class_names"):
        Segmentation(num_classes=3, preset="tiny", class_names=["liver"])


def test_layerwise_lr_decay_groups():
    module = Segmentation(num_classes=3, architecture="unetr", preset="tiny", img_size=32, layer_decay=0.5)
    groups = module.parameter_groups()
    layers = module.net.num_lr_layers  # depth + 2
    by_layer = {group["layer"]: group["lr_scale"] for group in groups}
    assert by_layer[layers - 1] == 1.0  # decoder and head
    assert by_layer[0] == pytest.approx(0.5 ** (layers - 1))  # patch embedding
    assert by_layer[1] == pytest.approx(0.5 ** (layers - 2))  # first block
    assert sum(len(g["params"]) for g in groups) == len(list(module.net.parameters()))
    encoder_params = {id(p) for p in module.encoder.parameters()}
    for group in groups:
        assert all((id(p) in encoder_params) == group["is_encoder"] for p in group["params"])
        if any(p.ndim < 2 for p in group["params"]):
            assert group["weight_decay"] == 0.0
    module.optimizer_factory = lambda params: torch.optim.AdamW(params, lr=1e-3)
    module.scheduler_factory = None
    optimizer = module.configure_optimizers()  # scales each group's rate by its lr_scale
    rates = {group["layer"]: group["lr"] for group in optimizer.param_groups}
    assert rates[layers - 1] == pytest.approx(1e-3)
    assert rates[0] == pytest.approx(1e-3 * 0.5 ** (layers - 1))


def test_encoder_warmup_factor():
    warmup = EncoderWarmup(decoder_only_steps=10, encoder_warmup_steps=4)
    assert [warmup.encoder_factor(s) for s in (0, 9, 10, 11, 12, 13, 50)] == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert EncoderWarmup(0, 0).encoder_factor(0) == 1.0
    with pytest.raises(ValueError):
        EncoderWarmup(-1, 0)


def tiny_finetune_args(data_dir: Path, run_dir: Path, max_steps: int = 4, pretrained: Path | None = None) -> list[str]:
    """experiments/finetune/unet_demo.yaml shrunk to a seconds-long run on the tiny phantoms."""
    return [
        "--config", str(REPO_ROOT / "experiments/finetune/unet_demo.yaml"),
        *tiny_data_overrides(data_dir),
        "--model.init_args.preset", "tiny",
        "--model.init_args.pretrained", str(pretrained) if pretrained else "null",
        "--trainer.max_steps", str(max_steps),
        "--trainer.val_check_interval", str(max_steps),
        "--trainer.log_every_n_steps", "1",
        "--trainer.default_root_dir", str(run_dir),
    ]  # fmt: skip


def metric(run_dir: Path, key: str) -> list[float]:
    [metrics_file] = sorted(run_dir.glob("logs/version_*/metrics.csv"))[-1:]
    with open(metrics_file) as handle:
        return [float(row[key]) for row in csv.DictReader(handle) if row.get(key)]


@pytest.fixture(scope="module")
def tiny_pgl_checkpoint(tiny_ct_dir, tmp_path_factory) -> Path:
    from tests.methods.test_pgl import tiny_args

    run_dir = tmp_path_factory.mktemp("pgl")
    main(["fit", *tiny_args("pgl", tiny_ct_dir, run_dir, max_steps=1), "--model.init_args.num_scales", "2"])
    return run_dir / "checkpoints" / "last.ckpt"


def test_fine_tune_from_pgl_then_predict_in_original_geometry(tiny_ct_dir, tiny_pgl_checkpoint, tmp_path, capsys):
    run_dir = tmp_path / "finetune"
    main(["fit", *tiny_finetune_args(tiny_ct_dir, run_dir, pretrained=tiny_pgl_checkpoint)])
    out = capsys.readouterr().out
    assert "pretrained weights from" in out and "loaded" in out
    assert "pretrained decoder left out" in out  # the default transfers PGL's encoder only
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    pgl = torch.load(tiny_pgl_checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    dice = metric(run_dir, "val/dice")
    assert len(dice) == 1 and 0.0 <= dice[0] <= 1.0
    assert metric(run_dir, "val/dice_liver")
    lr = metric(run_dir, "lr-AdamW/pg1")
    assert lr, "learning rates are logged per parameter group"
    assert any(key.startswith("net.encoder.") for key in checkpoint["state_dict"])
    assert any(key.startswith("backbone.encoder.") for key in pgl)

    out_dir = tmp_path / "predictions"
    main(["predict", *tiny_finetune_args(tiny_ct_dir, run_dir), "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"),
          "--model.init_args.output_dir", str(out_dir)])
    inputs = sorted((tiny_ct_dir / "images").glob("*.nii.gz"))
    outputs = sorted(out_dir.glob("*.nii.gz"))
    assert [p.name for p in outputs] == [p.name for p in inputs]
    for source, predicted in zip(inputs, outputs):
        a, b = nib.load(source), nib.load(predicted)
        assert b.shape == a.shape
        np.testing.assert_allclose(b.affine, a.affine, atol=1e-5)
        assert set(np.unique(np.asarray(b.dataobj)).tolist()) <= set(range(8))


def test_frozen_encoder_does_not_move_during_decoder_warmup(tiny_ct_dir, tiny_pgl_checkpoint, tmp_path, capsys):
    run_dir = tmp_path / "frozen"
    args = tiny_finetune_args(tiny_ct_dir, run_dir, max_steps=2, pretrained=tiny_pgl_checkpoint)
    # 2 steps, inside the demo's 30 decoder-only steps (EncoderWarmup), from PGL's encoder and decoder
    main(["fit", *args, "--model.init_args.transfer_decoder", "true"])
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    pgl = torch.load(tiny_pgl_checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    encoder = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.encoder.")}
    decoder_moved = False
    for key, value in encoder.items():
        assert torch.equal(value, pgl[f"backbone.{key}"]), key
    for key, value in state.items():
        if key.startswith("net.decoder.") and not torch.equal(value, pgl[f"backbone.{key[len('net.'):]}"]):
            decoder_moved = True
    assert decoder_moved

    # A resumed run takes its own checkpoint's weights and does not load the pretrained ones again.
    capsys.readouterr()
    resume = tiny_finetune_args(tiny_ct_dir, run_dir, max_steps=3, pretrained=tiny_pgl_checkpoint)
    main(["fit", *resume, "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")])
    assert "pretrained weights from" not in capsys.readouterr().out


def test_transfer_decoder_is_refused_for_unetr():
    with pytest.raises(ValueError, match="transfer_decoder applies to architecture 'unet'"):
        Segmentation(num_classes=3, architecture="unetr", preset="tiny", superpatch_size=32, transfer_decoder=True)


def test_class_count_mismatch_with_the_datamodule_fails_at_setup():
    from types import SimpleNamespace

    module = Segmentation(num_classes=3, preset="tiny", img_size=32)
    module.trainer = SimpleNamespace(datamodule=SimpleNamespace(spec=tiny_spec(task="segment", num_classes=8)))
    with pytest.raises(ValueError, match="num_classes=8"):
        module.setup("fit")


def test_superpatch_and_token_sizes_take_the_new_names_and_translate_the_old_ones():
    with pytest.warns(FutureWarning, match="use network_args.token_size"):
        old = Segmentation(num_classes=2, architecture="unetr", preset="tiny", superpatch_size=[32, 32, 16],
                           network_args={"patch_size": 4})
    assert old.net.token_size == 4 and old.superpatch_size == (32, 32, 16)
    assert old.hparams.network_args == {"token_size": 4} and old.hparams.superpatch_size == [32, 32, 16]
    new = Segmentation(num_classes=2, architecture="unetr", preset="tiny", superpatch_size=32,
                       network_args={"token_size": 4})
    assert new.net.token_size == 4 and new(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 2, 32, 32, 32)
    with pytest.raises(ValueError, match="network_args.patch_size=8 and network_args.token_size=16"):
        Segmentation(num_classes=2, architecture="unetr", preset="tiny", network_args={"patch_size": 8,
                                                                                      "token_size": 16})
    assert Segmentation(num_classes=2, preset="tiny").superpatch_size == (64, 64, 64)  # the default


def test_prediction_needs_the_volume_datamodule_for_original_images():
    from types import SimpleNamespace

    module = Segmentation(num_classes=2, preset="tiny", superpatch_size=32)
    module.trainer = SimpleNamespace(datamodule=SimpleNamespace(spec=tiny_spec(task="segment")))
    with pytest.raises(TypeError, match="VolumeDataModule"):
        module.source_image("case_000")


@pytest.mark.parametrize("architecture", ["unet", "unetr"])
def test_frozen_encoder_has_no_gradient_no_optimizer_group_and_stays_in_eval_mode(architecture):
    module = Segmentation(num_classes=3, architecture=architecture, preset="tiny", superpatch_size=32,
                          freeze_encoder=True, layer_decay=0.75 if architecture == "unetr" else None)
    encoder_params = {id(p) for p in module.encoder.parameters()}
    assert encoder_params and not any(p.requires_grad for p in module.encoder.parameters())
    grouped = [p for group in module.parameter_groups() for p in group["params"]]
    assert grouped and not any(id(p) in encoder_params for p in grouped)
    assert len(grouped) == len(list(module.net.parameters())) - len(encoder_params)  # decoder and head all in
    assert not any(group["is_encoder"] for group in module.parameter_groups())
    module.train()
    assert module.training
    assert all(m.training for name, m in module.net.named_modules() if not name.startswith("encoder"))
    assert not any(m.training for m in module.encoder.modules())
    assert "frozen" in module.describe()
    trainable = Segmentation(num_classes=3, architecture=architecture, preset="tiny", superpatch_size=32).train()
    assert all(m.training for m in trainable.encoder.modules())


class EncoderStateRecorder(L.Callback):
    """Records, at every training step, whether the encoder is in train mode and whether it takes gradients."""

    def __init__(self) -> None:
        self.steps: list[tuple[bool, bool, bool]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append((pl_module.training, any(m.training for m in pl_module.encoder.modules()),
                           any(p.requires_grad for p in pl_module.encoder.parameters())))


def test_freeze_encoder_keeps_the_encoder_bit_identical_through_fit_and_warmup(tiny_ct_dir):
    from maesil.data import VolumeDataModule

    L.seed_everything(0)
    module = Segmentation(num_classes=8, preset="tiny", superpatch_size=32, freeze_encoder=True)
    encoder_before = {key: value.clone() for key, value in module.encoder.state_dict().items()}
    decoder_before = {key: value.clone() for key, value in module.net.state_dict().items()
                      if not key.startswith("encoder.")}
    data = VolumeDataModule(data_dir=str(tiny_ct_dir), task="segment", num_classes=8, superpatch_size=32,
                            target_spacing=4.0, num_workers=0, batch_size=2, samples_per_volume=2, queue_length=4)
    recorder = EncoderStateRecorder()
    # The warm-up would unfreeze its encoder after 1 step; a frozen encoder stays frozen.
    trainer = L.Trainer(accelerator="cpu", max_steps=4, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[EncoderWarmup(decoder_only_steps=1, encoder_warmup_steps=1), recorder])
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 4 and len(recorder.steps) == 4
    assert recorder.steps == [(True, False, False)] * 4  # module training, encoder in eval mode, no gradient
    for key, value in module.encoder.state_dict().items():
        assert torch.equal(value, encoder_before[key]), key
    assert any(not torch.equal(value, decoder_before[key]) for key, value in module.net.state_dict().items()
               if not key.startswith("encoder."))
