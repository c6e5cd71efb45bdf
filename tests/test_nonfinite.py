"""A NaN/Inf loss stops the run naming the step and the subjects, or is skipped within a budget."""

from __future__ import annotations

import lightning as L
import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from maesil.cli import main
from maesil.tools import TOOLS
from maesil.data.records import DataError
from maesil.data import VolumeDataModule
from maesil.methods.base import MethodModule
from maesil.nonfinite import NonFiniteLossError, NonFiniteLossGuard, NonFiniteSkipBudget
from tests.helpers import REPO_ROOT, tiny_maesil_args


def main_tool(argv: list[str]) -> int:
    return TOOLS[argv[0]](argv[1:])


class _Regression(MethodModule):
    """y = w·x on batches {"x", "subject_id"}; a NaN in x makes the loss NaN."""

    def __init__(self) -> None:
        super().__init__(scheduler=None)
        self.weight = torch.nn.Parameter(torch.ones(3))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return ((batch["x"] * self.weight).sum(dim=1) - 1.0).pow(2).mean()


def _batches(nan_at: set[int], count: int = 6) -> list[dict]:
    batches = []
    for i in range(count):
        x = torch.full((2, 3), 0.1 * (i + 1))
        if i in nan_at:
            x[1, 0] = float("nan")
        batches.append({"x": x, "subject_id": [f"case_{2 * i:02d}", f"case_{2 * i + 1:02d}"]})
    return batches


def _trainer(tmp_path, callbacks=()) -> L.Trainer:
    return L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                     callbacks=list(callbacks))


def test_nan_loss_stops_naming_step_and_subjects(tmp_path):
    model = _Regression()
    with pytest.raises(NonFiniteLossError) as error:
        _trainer(tmp_path).fit(model, DataLoader(_batches({2}), batch_size=None))
    message = str(error.value)
    assert "step 2 (epoch 0, batch 2)" in message
    assert "case_04, case_05" in message and "NonFiniteSkipBudget" in message


class _WeightTrace(L.Callback):
    """The weights before and after every training batch."""

    def __init__(self) -> None:
        self.before: dict[int, torch.Tensor] = {}
        self.after: dict[int, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before[batch_idx] = pl_module.weight.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after[batch_idx] = pl_module.weight.detach().clone()


def test_guard_skips_up_to_the_budget_without_touching_the_weights(tmp_path):
    model = _Regression()
    trace = _WeightTrace()
    trainer = _trainer(tmp_path, [NonFiniteSkipBudget(max_skipped_batches=2), trace])
    trainer.fit(model, DataLoader(_batches({1, 3}), batch_size=None))
    assert model.skipped_batches == 2
    for index in range(6):
        if index in (1, 3):  # skipped: not a single weight moved, not even by weight decay
            assert torch.equal(trace.before[index], trace.after[index])
        else:
            assert not torch.equal(trace.before[index], trace.after[index])
    assert torch.isfinite(model.weight).all()
    # the learning rate is back after a skipped step
    assert {group["lr"] for group in trainer.optimizers[0].param_groups} == {1.5e-4}

    model = _Regression()
    with pytest.raises(NonFiniteLossError, match="2 such batches were already skipped"):
        _trainer(tmp_path, [NonFiniteSkipBudget(max_skipped_batches=2)]).fit(
            model, DataLoader(_batches({0, 1, 4}), batch_size=None))


def test_guard_rejects_a_negative_budget():
    with pytest.raises(ValueError, match="max_skipped_batches"):
        NonFiniteSkipBudget(max_skipped_batches=-1)


def test_the_former_callback_name_still_sets_the_budget_and_warns(tmp_path):
    with pytest.warns(FutureWarning, match="use maesil.nonfinite.NonFiniteSkipBudget"):
        callback = NonFiniteLossGuard(max_skipped_batches=1)
    assert isinstance(callback, NonFiniteSkipBudget) and callback.max_skipped_batches == 1
    model = _Regression()
    _trainer(tmp_path, [callback]).fit(model, DataLoader(_batches({2}), batch_size=None))
    assert model.skipped_batches == 1


def _copy_images(source, target):
    (target / "images").mkdir(parents=True)
    for path in sorted((source / "images").glob("*.nii.gz")):
        (target / "images" / path.name).write_bytes(path.read_bytes())


def _first_training_subject(data_dir, cache_dir=None):
    module = VolumeDataModule(data_dir=data_dir, cache_dir=cache_dir, check_voxels=False, num_workers=0, superpatch_size=32,
                              target_spacing=4.0, batch_size=2, samples_per_volume=2, queue_length=4)
    module.setup("fit")
    return module.train_records[0]


def test_planted_nan_volume_stops_the_run_naming_its_file(tiny_ct_dir, tmp_path):
    """With check_voxels off, the loader's own finiteness check still stops the run at that volume."""
    data_dir = tmp_path / "data"
    _copy_images(tiny_ct_dir, data_dir)
    planted = _first_training_subject(data_dir)
    image = nib.load(planted.image)
    voxels = np.asarray(image.dataobj, dtype=np.float32)
    voxels[20:24, 20:24, 10:12] = np.nan
    nib.save(nib.Nifti1Image(voxels, image.affine), planted.image)

    args = tiny_maesil_args(data_dir, tmp_path / "run", max_steps=8)
    with pytest.raises(DataError, match=f"{planted.image.name}: contains 32 NaN and 0 Inf"):
        main(["fit", *args, "--data.init_args.check_voxels", "false", "--trainer.limit_val_batches", "0"])


def test_nan_in_a_prepared_cache_stops_the_run_naming_its_subject(tiny_ct_dir, tmp_path):
    """A NaN that no loader check sees (here: written into a prepared cache) is caught at the loss."""
    cache = tmp_path / "cache"
    assert main_tool(["prepare", str(tiny_ct_dir), "--out", str(cache), "--config",
                      str(REPO_ROOT / "experiments/pretrain/maesil_demo.yaml"), "--target-spacing", "4.0",
                      "--workers", "1", "--no-progress"]) == 0
    planted = _first_training_subject(tiny_ct_dir, cache).subject_id
    array = np.load(cache / "subjects" / planted / "image.npy", mmap_mode="r+")
    array[...] = np.nan
    array.flush()
    del array

    args = tiny_maesil_args(tiny_ct_dir, tmp_path / "run", max_steps=8)
    with pytest.raises(NonFiniteLossError) as error:
        main(["fit", *args, "--data.init_args.cache_dir", str(cache), "--data.init_args.check_voxels", "false", "--trainer.limit_val_batches", "0"])
    message = str(error.value)
    assert planted in message.split("Subjects in this batch:")[1].split(".")[0]
    assert "non-finite training loss (nan) at step" in message
