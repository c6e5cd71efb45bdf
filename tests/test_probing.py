"""The LinearProbe callback: a probe on frozen encoder features during pretraining, bounded, without side effects."""

from __future__ import annotations

import csv
import math
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from maesil.data import VolumeDataModule
from maesil.data.records import DataError
from maesil.data.views import ViewSettings
from maesil.methods import AE, BYOL, MAESIL, MethodModule
from maesil.phantoms import ORGAN_LABELS
from maesil.probing import LinearProbe, one_cpu_thread, probe_records, superpatch_corners
from tests.helpers import TINY_SHAPE, TINY_SPACING

TINY_VIT = dict(superpatch_size=32, token_size=8, embed_dim=24, depth=1, num_heads=2, decoder_embed_dim=24,
                decoder_depth=1, decoder_num_heads=2)


def tiny_probe(data_dir: Path, **overrides) -> LinearProbe:
    """A probe on the tiny phantoms: 2 volumes fit it, 1 scores it, 2 superpatches each, a short fit."""
    arguments = dict(every_n_steps=2, data=str(data_dir), train_volumes=2, test_volumes=1, superpatches_per_volume=2,
                     fit_iterations=10, max_seconds=600.0)
    return LinearProbe(**{**arguments, **overrides})


def fit_tiny(data_dir: Path, root: Path, callbacks: list, max_steps: int = 3,
             module: MethodModule | None = None, **data) -> tuple[L.Trainer, MethodModule]:
    """A seeded 3-step run (MAESIL unless ``module``) on the tiny phantoms (32³ superpatches at 4 mm), CSV logger,
    no validation; ``data`` overrides the DataModule's arguments."""
    L.seed_everything(0)
    module = module if module is not None else MAESIL(**TINY_VIT)
    datamodule = VolumeDataModule(**{**dict(data_dir=str(data_dir), superpatch_size=32, target_spacing=4.0,
                                            val_fraction=0.34, batch_size=2, samples_per_volume=2, queue_length=4,
                                            num_workers=0, check_voxels=False), **data})
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=CSVLogger(root, name="logs"),
                        default_root_dir=root, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks)
    trainer.fit(module, datamodule)
    return trainer, module


@pytest.fixture(scope="module")
def probed_run(tiny_ct_dir, tmp_path_factory):
    """A tiny run with the probe every 2 steps, 3 steps long: probes at steps 0, 2 and (at the end) 3."""
    root = tmp_path_factory.mktemp("probed_run")
    probe = tiny_probe(tiny_ct_dir)
    trainer, module = fit_tiny(tiny_ct_dir, root, [probe])
    return SimpleNamespace(root=root, probe=probe, trainer=trainer, module=module)


def test_the_probe_logs_a_finite_dice_at_its_steps_with_a_picture(probed_run):
    probe, trainer = probed_run.probe, probed_run.trainer
    assert [step for step, _, _ in probe.history] == [0, 2, 3]
    dice = float(trainer.callback_metrics["probe/dice"])
    assert math.isfinite(dice) and 0.0 <= dice <= 1.0
    assert math.isfinite(float(trainer.callback_metrics["probe/seconds"]))
    assert {f"probe/dice_class_{c}" for c in range(1, 8)} <= set(trainer.callback_metrics)
    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    logged = {int(row["step"]): float(row["probe/dice"]) for row in rows if row.get("probe/dice")}
    assert sorted(logged) == [0, 2, 3] and all(math.isfinite(value) for value in logged.values())
    pictures = sorted(path.name for path in Path(trainer.logger.log_dir, "probe").glob("*.png"))
    assert pictures == ["step_0000000.png", "step_0000002.png", "step_0000003.png"]
    assert probed_run.module.last_figure_path is None  # the run summary keeps naming the method's own picture


def test_the_probe_prints_its_cost(tiny_ct_dir, tmp_path, capsys):
    fit_tiny(tiny_ct_dir, tmp_path, [tiny_probe(tiny_ct_dir)], max_steps=2)
    out = capsys.readouterr().out
    assert "LinearProbe: 2 + 1 labelled volume(s) of" in out and "(32, 32, 32) each" in out
    assert "LinearProbe step 0: probe Dice" in out
    assert "LinearProbe step 2: probe Dice" in out and "on 4 + 2 superpatches" in out
    assert "% of the wall time since the previous probe" in out


@pytest.mark.parametrize("method", ["BYOL", "AE"])
def test_the_probe_serves_convolutional_encoders_and_two_view_data(method, tiny_ct_dir, tmp_path):
    if method == "BYOL":
        module, data = BYOL(unet_preset="tiny", projection_dim=16, hidden_dim=32), dict(
            task="two_view", views=ViewSettings(view_size=16))
    else:
        module, data = AE(superpatch_size=32, channels=[4, 8, 16, 8], strides=[2, 2, 2, 1], num_res_units=1), {}
    probe = tiny_probe(tiny_ct_dir, at_start=False, figure=False)
    trainer, _ = fit_tiny(tiny_ct_dir, tmp_path, [probe], max_steps=1, module=module, **data)
    assert [step for step, _, _ in probe.history] == [1]
    assert 0.0 <= float(trainer.callback_metrics["probe/dice"]) <= 1.0


def test_a_run_with_the_probe_trains_exactly_as_one_without(probed_run, tiny_ct_dir, tmp_path):
    _, plain = fit_tiny(tiny_ct_dir, tmp_path, [])
    probed = probed_run.module.state_dict()
    for key, value in plain.state_dict().items():
        assert torch.equal(value, probed[key]), key


def test_a_probe_changes_no_weight_no_optimizer_state_no_mode_and_no_random_state(probed_run, tiny_ct_dir):
    trainer, module = probed_run.trainer, probed_run.module
    module.train()
    module.net.decoder_norm.eval()
    modes = {name: m.training for name, m in module.named_modules()}
    weights = {key: value.clone() for key, value in module.state_dict().items()}
    optimizer = {key: value.clone() for state in trainer.optimizers[0].state.values() for key, value in state.items()
                 if isinstance(value, torch.Tensor)}
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    states = (torch.get_rng_state(), np.random.get_state(), random.getstate())

    metrics = tiny_probe(tiny_ct_dir).probe(trainer, module)

    assert math.isfinite(metrics["probe/dice"])
    assert torch.equal(torch.get_rng_state(), states[0])
    numpy_state = np.random.get_state()
    assert numpy_state[0] == states[1][0] and np.array_equal(numpy_state[1], states[1][1])
    assert numpy_state[2:] == states[1][2:]
    assert random.getstate() == states[2]
    assert {name: m.training for name, m in module.named_modules()} == modes
    assert all(torch.equal(value, weights[key]) for key, value in module.state_dict().items())
    after = {key: value for state in trainer.optimizers[0].state.values() for key, value in state.items()
             if isinstance(value, torch.Tensor)}
    assert all(torch.equal(value, optimizer[key]) for key, value in after.items())


def test_an_overlong_probe_halves_the_superpatches_then_stops(probed_run, tiny_ct_dir):
    probe = tiny_probe(tiny_ct_dir, max_seconds=1e-6, figure=False)
    with pytest.warns(UserWarning, match=r"took .* s, more than max_seconds=1e-06: the next probes use 1 "
                                         r"superpatch\(es\) per volume instead of 2"):
        assert "probe/dice" in probe.probe(probed_run.trainer, probed_run.module)
    assert (probe.per_volume, probe.stopped) == (1, False)
    with pytest.warns(UserWarning, match="with 1 superpatch per volume already: no more probes in this run"):
        probe.probe(probed_run.trainer, probed_run.module)
    assert probe.stopped and probe.state_dict() == {"per_volume": 1, "stopped": True}
    assert probe.probe(probed_run.trainer, probed_run.module) == {}
    assert len(probe.history) == 2

    resumed = tiny_probe(tiny_ct_dir)
    resumed.load_state_dict(probe.state_dict())
    assert (resumed.per_volume, resumed.stopped) == (1, True)


def test_the_callback_refuses_a_module_without_features_and_a_datamodule_without_spec(tiny_ct_dir):
    class NoFeatures(MethodModule):
        pass

    probe = tiny_probe(tiny_ct_dir)
    no_data = SimpleNamespace(datamodule=None)
    with pytest.raises(TypeError, match="LinearProbe needs a pretraining method .* got NoFeatures"):
        probe.setup(no_data, NoFeatures(), "fit")
    with pytest.raises(ValueError, match="needs the DataModule's spec"):
        probe.setup(no_data, MAESIL(**TINY_VIT), "fit")
    probe.setup(no_data, NoFeatures(), "validate")  # only fitting is probed


@pytest.mark.parametrize("argument", ["every_n_steps", "train_volumes", "superpatches_per_volume", "fit_iterations"])
def test_bad_arguments_are_named(argument):
    with pytest.raises(ValueError, match=f"LinearProbe: {argument} must be an integer >= 1, got 0"):
        LinearProbe(**{argument: 0})
    with pytest.raises(ValueError, match="max_seconds must be > 0"):
        LinearProbe(max_seconds=0)


def test_probe_records_split_a_labelled_folder_and_name_what_is_missing(tiny_ct_dir, tmp_path):
    train, test, names = probe_records(tiny_ct_dir, 2, 1, tmp_path / "unused", 300)
    assert [r.subject_id for r in train] == ["phantom_000", "phantom_001"]
    assert [r.subject_id for r in test] == ["phantom_002"]
    assert names is None
    with pytest.raises(DataError, match=r"needs 2 volume\(s\) to fit the probe and 2 to score it, found 2 and 1"):
        probe_records(tiny_ct_dir, 2, 2, tmp_path / "unused", 300)
    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(tiny_ct_dir / "images", unlabelled / "images")
    with pytest.raises(DataError, match=r"needs a label for every volume; none for phantom_000, phantom_001"):
        probe_records(unlabelled, 1, 1, tmp_path / "unused", 300)


def test_the_default_labelled_set_is_phantoms_of_their_own_seed(tmp_path, monkeypatch):
    import maesil.phantoms

    written = maesil.phantoms.write_phantoms
    monkeypatch.setattr(maesil.phantoms, "write_phantoms", lambda out, count, seed, workers: written(
        out, count, seed=seed, shape=TINY_SHAPE, spacing=TINY_SPACING, workers=workers))
    train, test, names = probe_records(None, 2, 1, tmp_path / "probe_phantoms", 300)
    assert [r.subject_id for r in [*train, *test]] == ["phantom_300", "phantom_301", "phantom_302"]
    assert all(r.label == tmp_path / "probe_phantoms" / "labels" / f"{r.subject_id}.nii.gz" for r in train)
    assert names == ORGAN_LABELS


def test_superpatch_corners_are_deterministic_label_centred_and_cover_small_classes():
    label = np.zeros((20, 20, 20), dtype=np.int64)
    label[2:18, 2:18, 2:10] = 1  # a large organ
    label[15:17, 15:17, 15:17] = 2  # a small one
    corners = superpatch_corners(label, (8, 8, 8), 4, np.random.default_rng([0, 0]), where="test")
    again = superpatch_corners(label, (8, 8, 8), 4, np.random.default_rng([0, 0]), where="test")
    fewer = superpatch_corners(label, (8, 8, 8), 2, np.random.default_rng([0, 0]), where="test")
    assert all(np.array_equal(a, b) for a, b in zip(corners, again))
    assert all(np.array_equal(a, b) for a, b in zip(corners[:2], fewer))
    classes = [set(np.unique(label[tuple(slice(c, c + 8) for c in corner)]).tolist()) for corner in corners]
    assert sum(2 in found for found in classes) == 2  # one superpatch per class, in turn
    assert all(0 <= c <= 12 for corner in corners for c in corner)
    with pytest.raises(DataError, match="empty: the label map has no foreground voxel"):
        superpatch_corners(np.zeros((8, 8, 8), dtype=np.int64), (8, 8, 8), 1, np.random.default_rng(0), "empty")


def test_one_cpu_thread_restores_the_thread_count():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_cpu_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
