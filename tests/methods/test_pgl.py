"""PGL and global BYOL: the loss on aligned views, the target network, and short runs through the CLI."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from torch import nn

from maesil.cli import main
from maesil.data.views import ViewSettings, sample_view_pair
from maesil.methods import BYOL, PGL
from maesil.methods.bootstrap import cosine_momentum
from tests.helpers import REPO_ROOT

TINY_UNET = dict(unet_preset="tiny")
TINY_HEADS = dict(projection_dim=16, hidden_dim=32)


def two_view_batch(batch_size: int = 2, size: int = 32, view_size: int = 16, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    settings = ViewSettings(view_size=view_size)
    images = torch.rand(batch_size, 1, size, size, size, generator=generator)
    pairs = [sample_view_pair(image, settings, generator) for image in images]
    batch = {key: torch.stack([torch.as_tensor(pair[key]) for pair in pairs])
             for key in ("view1", "view2", "box1", "box2", "flip1", "flip2", "overlap")}
    batch["image"] = images
    batch["subject_id"] = [f"s{index}" for index in range(batch_size)]
    return batch


def swapped(batch: dict) -> dict:
    out = dict(batch)
    for key in ("view", "box", "flip"):
        out[f"{key}1"], out[f"{key}2"] = batch[f"{key}2"], batch[f"{key}1"]
    return out


def build(method: str) -> PGL | BYOL:
    torch.manual_seed(0)
    if method == "pgl":
        return PGL(**TINY_UNET, **TINY_HEADS, num_scales=2)
    return BYOL(**TINY_UNET, **TINY_HEADS)


@pytest.mark.parametrize("method", ["pgl", "byol"])
def test_loss_is_zero_when_online_and_target_agree(method):
    """Identical views, a target equal to the online network and an identity predictor: the online
    prediction equals the target projection, so the loss vanishes (through alignment, for PGL)."""
    module = build(method)
    if method == "pgl":
        module.predictor = nn.ModuleList(nn.Identity() for _ in module.predictor)
    else:
        module.predictor = nn.Identity()
    batch = two_view_batch()
    same = dict(batch, view2=batch["view1"], box2=batch["box1"], flip2=batch["flip1"])
    loss, _ = module.view_loss(same)
    assert loss.item() == pytest.approx(0.0, abs=1e-5)
    different, _ = module.view_loss(batch)
    assert different.item() > 1e-3


@pytest.mark.parametrize("method", ["pgl", "byol"])
def test_loss_is_symmetric_in_the_views(method):
    module = build(method)
    batch = two_view_batch(seed=3)
    loss, stats = module.view_loss(batch)
    loss_swapped, _ = module.view_loss(swapped(batch))
    assert 0.0 < loss.item() < 4.0
    assert loss.item() == pytest.approx(loss_swapped.item(), rel=1e-4, abs=1e-6)
    assert stats["embedding_spread"].item() > 0
    assert stats["overlap"].item() == pytest.approx(batch["overlap"].mean().item())


@pytest.mark.parametrize("method", ["pgl", "byol"])
def test_target_network_gets_no_gradients_and_follows_the_ema(method):
    module = build(method)
    batch = two_view_batch()
    loss, _ = module.view_loss(batch)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in module.target_parameters())
    trained = [name for name, p in module.named_parameters() if p.grad is not None]
    assert any(name.startswith("backbone.encoder.") for name in trained)
    if method == "pgl":  # the local loss trains the decoder as well
        assert any(name.startswith("backbone.decoder.") for name in trained)

    # One optimizer step, then the EMA hook: target = m * target + (1 - m) * online.
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.1)
    optimizer.step()
    old_target = [p.detach().clone() for p in module.target_parameters()]
    module._total_steps, module.momentum, module._ema_step = 10, 0.9, -1
    module.on_train_batch_end(None, batch, 0)
    online = [*module.backbone.parameters(), *module.projector.parameters()]
    for old, new, source in zip(old_target, module.target_parameters(), online):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * source.detach())
    assert module.momentum == pytest.approx(cosine_momentum(0, 10))
    before = [p.detach().clone() for p in module.target_parameters()]
    module.on_train_batch_end(None, batch, 1)  # same global step: no second update
    assert all(torch.equal(a, b) for a, b in zip(before, module.target_parameters()))


def test_pgl_rejects_bad_settings():
    with pytest.raises(ValueError, match="num_scales"):
        PGL(**TINY_UNET, num_scales=5)
    with pytest.raises(ValueError, match="align_fraction"):
        PGL(**TINY_UNET, num_scales=2, align_fraction=0.0)
    with pytest.raises(ValueError, match="momentum"):
        BYOL(**TINY_UNET, base_momentum=0.999, final_momentum=0.99)


def tiny_args(method: str, data_dir: Path, run_dir: Path, max_steps: int) -> list[str]:
    return [
        "--config", str(REPO_ROOT / f"experiments/pretrain/{method}_demo.yaml"),
        "--data.init_args.data_dir", str(data_dir),
        "--data.init_args.superpatch_size", "32",
        "--data.init_args.target_spacing", "4.0",
        "--data.init_args.num_workers", "0",
        "--data.init_args.batch_size", "2",
        "--data.init_args.samples_per_volume", "4",
        "--data.init_args.queue_length", "8",
        "--data.init_args.views.view_size", "16",
        "--model.init_args.unet_preset", "tiny",
        "--model.init_args.projection_dim", "16",
        "--model.init_args.hidden_dim", "32",
        "--trainer.max_steps", str(max_steps),
        "--trainer.val_check_interval", str(max_steps),
        "--trainer.log_every_n_steps", "1",
        "--trainer.default_root_dir", str(run_dir),
    ]  # fmt: skip


def metric(run_dir: Path, key: str) -> list[float]:
    [metrics_file] = sorted(run_dir.glob("logs/version_*/metrics.csv"))[-1:]
    with open(metrics_file) as handle:
        return [float(row[key]) for row in csv.DictReader(handle) if row.get(key)]


@pytest.mark.parametrize("method", ["pgl", "byol"])
def test_short_phantom_run_through_the_cli_lowers_the_loss(method, tiny_ct_dir, tmp_path, capsys):
    run_dir = tmp_path / method
    extra = ["--model.init_args.num_scales", "2"] if method == "pgl" else []
    # 60 steps, 10-step means: over 8 seeds the ratio is 0.56-0.72 for BYOL (30 steps, 5-step means: 0.73-0.93)
    main(["fit", *tiny_args(method, tiny_ct_dir, run_dir, max_steps=60), *extra])
    assert f"{method.upper()}: backbone" in capsys.readouterr().out
    losses = metric(run_dir, "train/loss")
    assert len(losses) == 60
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10, losses
    assert metric(run_dir, "val/loss") and metric(run_dir, "val/embedding_spread")
    overlap = metric(run_dir, "train/overlap")
    assert all(0.3 <= value <= 1.0 for value in overlap)
    assert sorted(run_dir.rglob("views/step_*.png")), "the views picture is missing"
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    keys = checkpoint["state_dict"].keys()
    assert any(key.startswith("backbone.encoder.") for key in keys)
    assert any(key.startswith("target_backbone.encoder.") for key in keys)
