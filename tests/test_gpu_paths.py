"""What only a GPU run exercises, checked on the CPU: bf16 autocast, the fp16 GradScaler path, no hard-coded
CUDA device in the package, and no host-device synchronisation in a training step."""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader

import maesil
from maesil.methods import MAESIL, S3D

PACKAGE = Path(maesil.__file__).resolve().parent
TINY_VIT = dict(superpatch_size=32, token_size=8, embed_dim=24, depth=1, num_heads=2, decoder_embed_dim=24,
                decoder_depth=1, decoder_num_heads=2)


class Superpatches(L.LightningDataModule):
    def __init__(self, batches: int = 4) -> None:
        super().__init__()
        self.batches = batches

    def train_dataloader(self) -> DataLoader:
        torch.manual_seed(0)
        batch = {"image": torch.rand(2, 1, 32, 32, 32), "subject_id": ["a", "b"]}
        return DataLoader([batch] * self.batches, batch_size=None)


class Losses(L.Callback):
    def __init__(self) -> None:
        self.values: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(outputs["loss"].detach())


def fit(module: L.LightningModule, tmp_path, steps: int, callbacks=(), **trainer_args) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=list(callbacks), **trainer_args)
    trainer.fit(module, datamodule=Superpatches(steps))
    return trainer


# ------------------------------------------------------------------------------------------ mixed precision
def test_bf16_autocast_trains_maesil_with_finite_losses_in_bfloat16(tmp_path):
    torch.manual_seed(0)
    module = MAESIL(**TINY_VIT)
    dtypes = []
    module.net.encoder.blocks[0].attn.qkv.register_forward_hook(lambda _, __, output: dtypes.append(output.dtype))
    losses = Losses()
    trainer = fit(module, tmp_path, steps=2, callbacks=[losses], precision="bf16-mixed")
    assert isinstance(trainer.precision_plugin, MixedPrecision) and trainer.precision_plugin.precision == "bf16-mixed"
    assert trainer.global_step == 2 and dtypes == [torch.bfloat16, torch.bfloat16]
    assert len(losses.values) == 2 and all(torch.isfinite(loss) for loss in losses.values)
    assert all(param.dtype == torch.float32 for param in module.parameters())  # weights stay float32


def test_fp16_on_a_gpu_selects_mixed_precision_with_a_grad_scaler():
    """Lightning turns ``16-mixed`` into bf16 on the CPU; its choice for a CUDA accelerator is asked directly."""
    connector = L.Trainer(accelerator="cpu", logger=False)._accelerator_connector
    connector._precision_flag, connector._accelerator_flag = "16-mixed", "cuda"
    plugin = connector._check_and_init_precision()
    assert isinstance(plugin, MixedPrecision) and (plugin.precision, plugin.device) == ("16-mixed", "cuda")
    assert isinstance(plugin.scaler, torch.amp.GradScaler)
    connector._precision_flag = "bf16-mixed"
    assert connector._check_and_init_precision().scaler is None  # bf16 needs no loss scaling


def test_fp16_with_a_grad_scaler_trains_maesil_through_the_method_s_optimizer_step(tmp_path):
    torch.manual_seed(0)
    module = MAESIL(**TINY_VIT)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    losses = Losses()
    start = {name: value.clone() for name, value in module.state_dict().items()}
    fit(module, tmp_path, steps=3, callbacks=[losses], plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert module.global_step == 3 and all(torch.isfinite(loss) for loss in losses.values)
    assert scaler.get_scale() == 2.0**10  # no overflow: every step was taken
    assert not torch.equal(module.state_dict()["net.decoder_pred.weight"], start["net.decoder_pred.weight"])


# ------------------------------------------------------------------------------------------ device handling
#: Code that places tensors or modules on the GPU itself: ``.cuda()``, ``device="cuda"``, ``torch.device("cuda")``,
#: ``.to("cuda")``, or a default of ``"cuda"`` when a GPU is present.
CUDA_PLACEMENT = re.compile(r"""\.cuda\(|device\s*=\s*['"]cuda|torch\.device\(\s*['"]cuda|\.to\(\s*['"]cuda"""
                            r"""|['"]cuda(:\d+)?['"]\s+if\s+torch\.cuda\.is_available""")
#: Where the package may do so: a tool's ``--device`` default, outside Lightning.
VETTED_CUDA_PLACEMENTS = {
    ("tools/benchmark_recon.py", 'device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))'),
}


def test_the_package_leaves_device_placement_to_lightning():
    found = {(path.relative_to(PACKAGE).as_posix(), line.strip())
             for path in sorted(PACKAGE.rglob("*.py"))
             for line in path.read_text().splitlines()
             if CUDA_PLACEMENT.search(line) and not line.strip().startswith(("#", ">>>"))}
    assert found == VETTED_CUDA_PLACEMENTS


def test_the_placement_pattern_finds_each_form():
    lines = ["x = x.cuda()", "torch.zeros(2, device='cuda')", 'torch.device("cuda:1")', 'model.to("cuda")',
             'device = "cuda" if torch.cuda.is_available() else "cpu"']
    assert [bool(CUDA_PLACEMENT.search(line)) for line in lines] == [True] * 5
    assert not CUDA_PLACEMENT.search('if device.type == "cuda":')


# ------------------------------------------------------------------------------------------ synchronisation
#: Tensor methods that wait for the device: explicit copies to the host, and the implicit ones of Python
#: conversions (``if tensor:``, ``float(tensor)``).
EXPLICIT_SYNCS = ("item", "cpu", "tolist", "numpy")
IMPLICIT_SYNCS = ("__bool__", "__float__", "__int__")


class SyncCounter(L.Callback):
    """Counts the calls of :data:`EXPLICIT_SYNCS` and :data:`IMPLICIT_SYNCS` made directly by code under
    ``root`` (the package: the calling frame's file is under ``maesil/``, so Lightning's and torchmetrics' own
    calls are not counted) from the first training batch to the end of training, by (method, file, function)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, root: Path = PACKAGE) -> None:
        self.monkeypatch = monkeypatch
        self.root = root
        self.calls: Counter[tuple[str, str, str]] = Counter()
        self.counting = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.counting:
            self.counting = True
            for name in (*EXPLICIT_SYNCS, *IMPLICIT_SYNCS):
                self.monkeypatch.setattr(torch.Tensor, name, self.counted(name, getattr(torch.Tensor, name)))

    def on_train_end(self, trainer, pl_module) -> None:
        self.monkeypatch.undo()
        self.counting = False

    def counted(self, name: str, method):
        def call(tensor, *args, **kwargs):
            caller = sys._getframe(1)
            path = Path(caller.f_code.co_filename).resolve()
            if path.is_relative_to(self.root):
                self.calls[(name, path.relative_to(self.root).as_posix(), caller.f_code.co_name)] += 1
            return method(tensor, *args, **kwargs)

        return call

    def count(self, names: tuple[str, ...]) -> dict[tuple[str, str, str], int]:
        return {key: count for key, count in self.calls.items() if key[0] in names}


#: method → (tiny constructor, its conversions to Python numbers per step). Each step asks the host whether the
#: loss is finite (the non-finite guard decides there whether the step is taken): the one wait for the device.
#: S3D also draws its batch's mask ratio as a Python float from torch's CPU generator: a host tensor, no wait.
SYNC_CASES = {
    "MAESIL": (lambda: MAESIL(**TINY_VIT), {("__bool__", "nonfinite.py", "guarded"): 1}),
    "S3D": (lambda: S3D(unet_preset="tiny", superpatch_size=32, mask_block_size=8),
            {("__bool__", "nonfinite.py", "guarded"): 1, ("__float__", "models/sparse.py", "draw_mask_ratio"): 1}),
}


@pytest.mark.parametrize("name", sorted(SYNC_CASES))
def test_a_training_step_does_not_wait_for_the_device_except_for_the_non_finite_check(name, tmp_path, monkeypatch):
    torch.manual_seed(0)
    counter = SyncCounter(monkeypatch)
    steps = 3
    build, per_step = SYNC_CASES[name]
    trainer = fit(build(), tmp_path, steps=steps, callbacks=[counter])
    assert trainer.global_step == steps
    assert counter.count(EXPLICIT_SYNCS) == {}
    assert counter.count(IMPLICIT_SYNCS) == {key: count * steps for key, count in per_step.items()}


def test_the_counter_sees_a_host_copy_in_a_training_step_and_not_lightning_s(tmp_path, monkeypatch):
    class Syncing(MAESIL):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("train/loss_value", loss.item())  # a host copy each step, made by this file
            return loss

    counter = SyncCounter(monkeypatch, root=Path(__file__).resolve().parent)
    torch.manual_seed(0)
    fit(Syncing(**TINY_VIT), tmp_path, steps=2, callbacks=[counter])
    assert dict(counter.calls) == {("item", "test_gpu_paths.py", "training_step"): 2}
