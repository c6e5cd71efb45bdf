"""LinearLRScaling: lr = configured lr × effective batch / base batch, applied before the scheduler is built."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from maesil.callbacks import LinearLRScaling
from maesil.methods.base import MethodModule
from maesil.optim import WarmupCosineLR
from tests.methods.test_base import tiny_spec

BASE_LR = 0.1


class TinyModule(MethodModule):
    """A linear layer trained by AdamW (lr ``BASE_LR``) with warm-up + cosine: the smallest MethodModule."""

    def __init__(self) -> None:
        super().__init__(
            optimizer=partial(torch.optim.AdamW, lr=BASE_LR),
            scheduler=partial(WarmupCosineLR, warmup_steps=2),
        )
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx: int):
        return self.layer(batch).pow(2).mean()


class TinyData(L.LightningDataModule):
    """Random 4-vectors in batches of ``batch_size`` (published in the ``spec`` LinearLRScaling reads)."""

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.spec = tiny_spec(batch_size=batch_size)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.randn(64, 4), batch_size=self.batch_size)


def fit(module: MethodModule, batch_size: int, callbacks: list, max_steps: int = 1, ckpt_path: str | None = None,
        **trainer_args) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        callbacks=callbacks, **trainer_args,
    )  # fmt: skip
    trainer.fit(module, datamodule=TinyData(batch_size), ckpt_path=ckpt_path)
    return trainer


def initial_rates(trainer: L.Trainer) -> list[float]:
    return [group["initial_lr"] for group in trainer.optimizers[0].param_groups]


def test_fit_scales_the_optimizer_and_the_schedule(capsys):
    trainer = fit(TinyModule(), batch_size=4, callbacks=[LinearLRScaling(256)])
    expected = BASE_LR * 4 / 256
    assert initial_rates(trainer) == pytest.approx([expected, expected])
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.base_lrs == pytest.approx([expected, expected])
    # after one step of the 2-step warm-up the rate is the scaled base times the warm-up factor
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(expected * scheduler.lr_factor(1))
    assert "lr scaled by 4/256 = 0.0156 (linear scaling rule, base batch 256" in capsys.readouterr().out


def test_gradient_accumulation_multiplies_the_effective_batch():
    trainer = fit(TinyModule(), batch_size=4, callbacks=[LinearLRScaling(64)], accumulate_grad_batches=2)
    assert initial_rates(trainer)[0] == pytest.approx(BASE_LR * 8 / 64)


def test_without_the_callback_the_configured_lr_is_kept():
    trainer = fit(TinyModule(), batch_size=4, callbacks=[])
    assert initial_rates(trainer) == pytest.approx([BASE_LR, BASE_LR])


def test_effective_batch_counts_processes_and_accumulation():
    module = TinyModule()
    trainer = SimpleNamespace(datamodule=TinyData(6), accumulate_grad_batches=2, world_size=4, is_global_zero=False)
    callback = LinearLRScaling(base_batch_size=256)
    callback.setup(trainer, module, "fit")
    assert callback.effective_batch_size == 48
    assert module.batch_lr_factor == pytest.approx(48 / 256)
    other = TinyModule()
    callback.setup(trainer, other, "validate")  # other stages leave the module alone
    assert other.batch_lr_factor == 1.0


def test_clear_errors():
    trainer = SimpleNamespace(datamodule=None, accumulate_grad_batches=1, world_size=1, is_global_zero=True)
    with pytest.raises(ValueError, match="DataModule with an integer `batch_size`"):
        LinearLRScaling().setup(trainer, TinyModule(), "fit")
    trainer.datamodule = TinyData(2)
    with pytest.raises(TypeError, match="MethodModule"):
        LinearLRScaling().setup(trainer, L.LightningModule(), "fit")
    with pytest.raises(ValueError, match="base_batch_size"):
        LinearLRScaling(0)


def test_resume_keeps_the_checkpoint_rates_and_warns_on_a_different_batch(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit(TinyModule(), batch_size=2, callbacks=[LinearLRScaling(256), checkpoint], max_steps=2)
    with pytest.warns(UserWarning, match="resuming with effective batch 4, but the checkpoint was trained with 2"):
        trainer = fit(TinyModule(), batch_size=4, callbacks=[LinearLRScaling(256), ModelCheckpoint(dirpath=tmp_path)],
                      max_steps=3, ckpt_path=str(tmp_path / "last.ckpt"))
    assert trainer.global_step == 3
    assert initial_rates(trainer)[0] == pytest.approx(BASE_LR * 2 / 256)
    assert trainer.lr_scheduler_configs[0].scheduler.base_lrs[0] == pytest.approx(BASE_LR * 2 / 256)


def test_segmentation_applies_the_factor_under_layer_decay():
    from maesil.methods import Segmentation

    def rates(factor: float) -> list[float]:
        module = Segmentation(num_classes=2, architecture="unetr", preset="tiny", img_size=32, layer_decay=0.75,
                              optimizer=partial(torch.optim.AdamW, lr=1e-3), scheduler=None)
        module.batch_lr_factor = factor
        return [group["lr"] for group in module.configure_optimizers().param_groups]

    plain, scaled = rates(1.0), rates(0.25)
    assert len(set(plain)) > 1  # layer decay gives several rates
    assert scaled == pytest.approx([0.25 * rate for rate in plain])
