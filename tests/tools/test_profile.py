"""``python -m maesil profile``: FLOPs against a hand count, the step timer, the largest-batch search and the
command on a tiny MAESIL demo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from maesil.models.vit3d import ViTEncoder3D
from maesil.profiling import (
    batch_size_of,
    flop_counter_mode,
    known_peak_tflops,
    largest_batch,
    profile_steps,
    tile_batch,
)
from maesil.tools.profile import profile_command
from tests.helpers import REPO_ROOT


def test_vit_training_step_flops_match_a_hand_count():
    batch, edge, token, dim, depth, heads = 2, 32, 8, 64, 2, 4
    encoder = ViTEncoder3D(edge, token_size=token, embed_dim=dim, depth=depth, num_heads=heads)
    images = torch.randn(batch, 1, edge, edge, edge)
    with flop_counter_mode() as counter:
        encoder(images).sum().backward()
    tokens = (edge // token) ** 3
    patch_embed = 2 * batch * tokens * dim * token**3
    # per block: qkv (3D²) + projection (D²) + MLP (2 · 4D²) matmuls, and Q·Kᵀ and P·V (N²D each)
    block = 2 * batch * tokens * 12 * dim**2 + 4 * batch * tokens**2 * dim
    forward = patch_embed + depth * block
    # backward: twice the forward, except the image gradient of the patch embedding (not needed)
    expected = 3 * forward - patch_embed
    assert counter.get_total_flops() == pytest.approx(expected, rel=0.05)


class _LinearModule(L.LightningModule):
    """One linear layer; a batch larger than ``fits`` raises CUDA's out-of-memory error."""

    def __init__(self, fits: int = 1_000_000) -> None:
        super().__init__()
        self.layer = nn.Linear(16, 8)
        self.fits = fits
        self.sizes: list[int] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images = batch["image"]
        self.sizes.append(images.shape[0])
        if images.shape[0] > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.layer(images).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _cpu_trainer(callbacks: list) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)


def test_profile_steps_times_the_steps_and_counts_one_steps_flops():
    module = _LinearModule()
    batch = {"image": torch.randn(4, 16), "subject_id": ["a", "b", "c", "d"]}
    profile = profile_steps(_cpu_trainer, module, batch, steps=3, warmup=2)
    assert len(profile.step_seconds) == 3 and profile.median_seconds > 0
    assert module.sizes == [4] * 6  # 2 warm-up + 3 timed + 1 counted
    assert profile.flops == 2 * 4 * 16 * 8 * 2  # forward and weight gradient; the input needs no gradient
    assert profile.peak_rss_bytes > 0 and profile.peak_allocated_bytes is None
    assert profile.samples_per_second == pytest.approx(4 / profile.median_seconds)


def test_tile_batch_repeats_every_per_sample_entry():
    batch = {"view1": torch.arange(2).view(2, 1), "box1": torch.tensor([[0, 1], [2, 3]]), "overlap": torch.ones(2),
             "subject_id": ["s0", "s1"], "nested": [torch.zeros(2, 3)], "scale": torch.tensor(1.0)}
    tiled = tile_batch(batch, 5)
    assert batch_size_of(tiled) == 5
    assert tiled["view1"].flatten().tolist() == [0, 1, 0, 1, 0]
    assert tiled["box1"].shape == (5, 2) and tiled["overlap"].shape == (5,)
    assert tiled["subject_id"] == ["s0", "s1", "s0", "s1", "s0"]
    assert tiled["nested"][0].shape == (5, 3) and tiled["scale"].ndim == 0


def test_largest_batch_doubles_then_bisects_at_the_out_of_memory_error():
    module = _LinearModule(fits=5)
    found = largest_batch(_cpu_trainer, module, {"image": torch.randn(2, 16)}, limit=64)
    assert found.size == 5 and found.stopped_by == "out of memory"
    assert found.trials == ((4, True), (8, False), (6, False), (5, True))


def test_largest_batch_stops_at_the_limit_and_at_the_memory_guard():
    batch = {"image": torch.randn(2, 16)}
    at_limit = largest_batch(_cpu_trainer, _LinearModule(), batch, limit=6)
    assert (at_limit.size, at_limit.stopped_by, at_limit.trials) == (6, "limit", ((4, True), (6, True)))
    guarded = largest_batch(_cpu_trainer, _LinearModule(), batch, limit=64, fits_in_memory=lambda size: size <= 8)
    assert (guarded.size, guarded.stopped_by) == (8, "memory guard")


def test_largest_batch_stops_when_its_time_is_spent_and_announces_each_try():
    ticks = iter([0.0, 1.0, 2.0, 9.0, 9.5])  # start, before 4, before 8, before the bisection's 6: 9 s spent
    tried: list[int] = []
    found = largest_batch(_cpu_trainer, _LinearModule(fits=5), {"image": torch.randn(2, 16)}, limit=64, seconds=5,
                          on_trial=tried.append, clock=lambda: next(ticks))
    assert (found.size, found.stopped_by) == (4, "time limit")
    assert found.trials == ((4, True), (8, False)) and tried == [4, 8]


def test_known_device_peaks():
    assert known_peak_tflops("NVIDIA H200") == 989.0
    assert known_peak_tflops("NVIDIA L40S") == 362.0
    assert known_peak_tflops("NVIDIA L4") == 121.0
    assert known_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert known_peak_tflops("Tesla T4") is None


def test_profile_command_prints_every_figure_without_importing_wandb(tiny_ct_dir, tmp_path):
    overrides = {
        "data.init_args.data_dir": tiny_ct_dir, "data.init_args.superpatch_size": 32,
        "data.init_args.target_spacing": 4.0, "data.init_args.num_workers": 0, "data.init_args.batch_size": 2,
        "data.init_args.samples_per_volume": 2, "data.init_args.queue_length": 4,
        "model.init_args.embed_dim": 48, "model.init_args.depth": 2, "model.init_args.num_heads": 2,
        "model.init_args.decoder_embed_dim": 48, "model.init_args.decoder_depth": 1,
        "model.init_args.decoder_num_heads": 2,
    }
    out = tmp_path / "figures.json"
    argv = ["--config", str(REPO_ROOT / "experiments/pretrain/maesil_demo.yaml"), "--steps", "2", "--warmup", "1",
            "--loader-batches", "2", "--max-batch", "--max-batch-limit", "4", "--json", str(out)]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={value}"]
    code = ("import sys; from maesil.tools.profile import profile_command; rc = profile_command(sys.argv[1:]); "
            "print('wandb imported:', 'wandb' in sys.modules); sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=tmp_path,
                            env={**__import__("os").environ, "WANDB_MODE": "disabled"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout
    for label in ("profile    maesil_demo: MAESIL", "precision 32-true", "s/step median", "s/step min",
                  "superpatches/s", "GiB peak RSS", "trainable /", "GFLOP per training step", "TFLOP/s achieved",
                  "MFU n/a", "max batch  4 (stopped by limit", "attention  SDPA ", "(head dim 24;", "batches/s",
                  "bounds the step"):
        assert label in printed, f"{label!r} missing from:\n{printed}"
    assert "wandb imported: False" in printed
    figures = json.loads(out.read_text())
    assert figures["batch"] == 2 and figures["input"] == "32³" and figures["largest_batch"] == 4
    assert figures["flops_per_step"] > 0 and len(figures["step_seconds"]) == 2
    assert figures["loader_batches"] >= 1 and figures["bound_by"] in ("compute", "data loading")
    assert figures["attention_head_dim"] == 24 and figures["attention_kernel"] in figures["attention_kernels_available"]
    assert not list(tmp_path.glob("runs")), "the profile wrote a run folder"


@pytest.mark.parametrize(("argv", "message"), [
    (["--config", "missing.yaml"], "--config missing.yaml: no such file"),
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--warmup", "-1"], "--warmup must be 0 or more"),
    (["--set", "data.init_args.batch_size"], "expected KEY=VALUE"),
    (["--peak-tflops", "0"], "--peak-tflops must be a positive number"),
])
def test_bad_input_is_named(argv, message, capsys):
    config = ["--config", str(REPO_ROOT / "experiments/pretrain/maesil_demo.yaml")]
    with pytest.raises(SystemExit) as exit_info:
        profile_command(argv if argv[0] == "--config" else [*config, *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cuda_figures_report_allocated_and_reserved_memory_and_the_mfu():
    from maesil.tools.profile import format_report

    figures = {
        "recipe": "maesil", "method": "MAESIL", "network": "MaskedAutoencoder3D", "input": "128³", "batch": 4,
        "device": "NVIDIA H200", "accelerator": "cuda", "precision": "bf16-mixed", "steps": 10, "warmup": 3,
        "seconds_per_step_median": 0.5, "seconds_per_step_min": 0.4, "superpatches_per_second": 8.0,
        "peak_allocated_gib": 12.25, "peak_reserved_gib": 14.0, "peak_rss_gib": None,
        "parameters_trainable": 10, "parameters_total": 12, "flops_per_step": 98.9e12, "achieved_tflops": 197.8,
        "peak_tflops": 989.0, "mfu": 0.2, "largest_batch": 48, "largest_batch_limit": 1024,
        "largest_batch_stopped_by": "out of memory", "largest_batch_trials": [[8, True], [64, False], [48, True]],
        "loader_batches": None,
    }
    report = format_report(figures)
    assert "12.25 GiB max allocated, 14.00 GiB max reserved" in report
    assert "MFU 20.0% of 989 TFLOP/s" in report and "precision bf16-mixed" in report
    assert "max batch  48 (stopped by out of memory, limit 1024; tried 8, 64 ✗, 48)" in report
    assert "loader     not timed" in report
    assert "MFU n/a (FLOPs not counted)" in format_report({**figures, "flops_per_step": None, "achieved_tflops": None,
                                                           "mfu": None})


def test_the_datamodule_serves_the_repeated_batch_and_is_restored_afterwards():
    class _Data(L.LightningDataModule):
        prepared = 0

        def prepare_data(self) -> None:
            self.prepared += 1

        def train_dataloader(self):
            raise AssertionError("the profile must not read the real loader")

    data = _Data()
    module = _LinearModule()
    profile_steps(_cpu_trainer, module, {"image": torch.randn(3, 16)}, steps=1, warmup=0, datamodule=data)
    assert module.sizes == [3, 3] and data.prepared == 0
    assert module.trainer.datamodule is data
    with pytest.raises(AssertionError, match="real loader"):
        data.train_dataloader()
