"""S3D: phantom runs through the CLI (loss falls, metrics, picture, resume, zero-fill ablation), the masked loss,
validation masks, ``reconstruct_for_evaluation`` and loading by ``benchmark-recon``."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import yaml

from maesil.cli import main
from maesil.methods import S3D
from maesil.models.sparse import upsample_mask
from maesil.tools.benchmark_recon import benchmark_recon_command, load_method
from tests.helpers import REPO_ROOT, validate_on_tiny_mri

pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers.*")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny networks: one intra-op thread is as fast and immune to OpenMP spin-waiting under CPU contention
    (module-scoped, so that it also covers the module-scoped training run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_module(**overrides) -> S3D:
    return S3D(**{"unet_preset": "tiny", "img_size": 32, "mask_block_size": 8, **overrides})


def tiny_s3d_args(data_dir: Path, run_dir: Path, max_steps: int, val_every: int) -> list[str]:
    """CLI arguments that shrink experiments/pretrain/s3d_demo.yaml to a seconds-long run."""
    return [
        "--config", str(REPO_ROOT / "experiments/pretrain/s3d_demo.yaml"),
        "--data.init_args.data_dir", str(data_dir),
        "--data.init_args.superpatch_size", "32",
        "--data.init_args.target_spacing", "4.0",
        "--data.init_args.num_workers", "0",
        "--data.init_args.batch_size", "2",
        "--data.init_args.samples_per_volume", "4",
        "--data.init_args.queue_length", "8",
        "--model.init_args.unet_preset", "tiny",
        "--model.init_args.mask_block_size", "8",
        "--trainer.max_steps", str(max_steps),
        "--trainer.val_check_interval", str(val_every),
        "--trainer.limit_val_batches", "2",
        "--trainer.log_every_n_steps", "1",
        "--trainer.default_root_dir", str(run_dir),
    ]  # fmt: skip


def read_metrics(run_dir: Path, version: int = -1) -> list[dict[str, str]]:
    files = sorted(run_dir.glob("logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    with open(files[version]) as handle:
        return list(csv.DictReader(handle))


def logged(rows: list[dict[str, str]], key: str) -> list[tuple[int, float]]:
    return [(int(row["step"]), float(row[key])) for row in rows if row.get(key)]


@pytest.fixture(scope="module")
def trained_run(tiny_ct_dir, tmp_path_factory) -> Path:
    """24 steps of the demo config (AdamW, warm-up, cosine) shrunk to the tiny preset; validation every 12."""
    run_dir = tmp_path_factory.mktemp("s3d") / "run"
    main(["fit", *tiny_s3d_args(tiny_ct_dir, run_dir, max_steps=24, val_every=12)])
    return run_dir


def test_phantom_run_lowers_the_loss_logs_masked_metrics_and_draws_a_picture(trained_run, capsys):
    rows = read_metrics(trained_run)
    losses = [value for _, value in logged(rows, "train/loss")]
    assert len(losses) == 24
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    ratios = [value for _, value in logged(rows, "train/mask_ratio")]
    assert all(0.6 <= r <= 0.9 for r in ratios) and len(set(ratios)) > 1
    psnr = [value for _, value in logged(rows, "val/psnr_masked")]
    assert len(psnr) == 2 and all(0 < value < 100 for value in psnr)
    for key in ("val/ssim_masked", "val/psnr", "val/ssim", "val/loss"):
        assert len(logged(rows, key)) == 2, key
    pictures = sorted((trained_run / "logs").glob("version_*/reconstructions/step_*.png"))
    assert [p.name for p in pictures] == ["step_0000012.png", "step_0000024.png"]


def test_resume_continues_from_the_checkpoint_step(tiny_ct_dir, tmp_path):
    run_dir = tmp_path / "run"
    main(["fit", *tiny_s3d_args(tiny_ct_dir, run_dir, max_steps=3, val_every=3)])
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 3
    main(["fit", *tiny_s3d_args(tiny_ct_dir, run_dir, max_steps=5, val_every=5), "--ckpt_path", str(last)])
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 5
    steps = [step for step, _ in logged(read_metrics(run_dir, version=-1), "train/loss")]
    assert steps == [3, 4]
    assert [step for step, _ in logged(read_metrics(run_dir, version=0), "train/loss")] == [0, 1, 2]


def test_zero_fill_variant_trains_through_the_cli(tiny_ct_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    main(["fit", *tiny_s3d_args(tiny_ct_dir, run_dir, max_steps=2, val_every=2), "--model.init_args.sparse", "false"])
    assert "dense zero-fill (sparse: false)" in capsys.readouterr().out
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2
    assert not any("mask_tokens" in key for key in checkpoint["state_dict"])
    losses = [value for _, value in logged(read_metrics(run_dir), "train/loss")]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_checkpoint_loads_in_benchmark_recon_and_reconstructs(trained_run, tiny_ct_dir, tmp_path):
    checkpoint = trained_run / "checkpoints" / "last.ckpt"
    out = tmp_path / "benchmark"
    assert benchmark_recon_command(["--checkpoints", str(checkpoint), "--data", str(tiny_ct_dir), "--out", str(out),
                                    "--max-volumes", "1", "--batch-size", "4"]) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {(r["protocol"], r["method"]) for r in rows} == {("inpaint", "S3D"), ("inpaint", "mean fill"),
                                                          ("inpaint", "blur fill"), ("paper", "S3D")}
    [row] = [r for r in rows if r["protocol"] == "inpaint" and r["method"] == "S3D"]
    assert 0 < float(row["psnr_masked_mean"]) < float(row["psnr_mean"])

    model, data = load_method(checkpoint)
    assert isinstance(model, S3D) and model.sparse and data["superpatch_size"] == 32
    images = torch.rand(2, 1, 32, 32, 32)
    locations = torch.tensor([[0, 0, 0, 32, 32, 32], [32, 0, 0, 64, 32, 32]])
    reconstruction, hidden = model.reconstruct_for_evaluation(
        {"image": images, "subject_id": ["a", "b"], "location": locations}
    )
    assert reconstruction.shape == images.shape and hidden.shape == images.shape
    assert torch.equal(reconstruction[~hidden], images[~hidden])


def test_loss_depends_on_masked_voxels_only():
    module = tiny_module()
    images = torch.rand(2, 1, 32, 32, 32)
    mask = module.draw_mask(2, ratio=0.5)
    hidden = upsample_mask(mask, 8)
    prediction = torch.rand_like(images)
    loss = module.loss(prediction, images, mask)
    changed = prediction.clone()
    changed[~hidden] = torch.randn(int((~hidden).sum())) * 100
    assert float(module.loss(changed, images, mask)) == float(loss)
    changed[hidden] += 0.1
    assert float(module.loss(changed, images, mask)) != pytest.approx(float(loss))
    expected = ((prediction - images)[hidden] ** 2).mean()
    torch.testing.assert_close(loss, expected)


def test_reconstruct_for_evaluation_copies_visible_voxels_and_hides_the_validation_fraction():
    module = tiny_module(mask_ratio_range=(0.6, 0.9)).train()
    images = torch.rand(3, 1, 32, 32, 32)
    batch = {"image": images, "subject_id": ["a", "b", "c"],
             "location": torch.tensor([[0, 0, 32 * i, 32, 32, 32 * (i + 1)] for i in range(3)])}  # fmt: skip
    reconstruction, hidden = module.reconstruct_for_evaluation(batch)
    assert hidden.dtype == torch.bool and hidden.shape == images.shape
    assert module.val_mask_ratio == pytest.approx(0.75)
    assert hidden.flatten(1).float().mean(dim=1).tolist() == [round(0.75 * 64) / 64] * 3
    assert torch.equal(reconstruction[~hidden], images[~hidden])
    assert not torch.equal(reconstruction[hidden], images[hidden])
    assert float(reconstruction.min()) >= 0.0 and float(reconstruction.max()) <= 1.0
    # Seeded by subject and location: the same again, and for "b" alone at the same location.
    again, hidden_again = module.reconstruct_for_evaluation(batch)
    assert torch.equal(hidden_again, hidden) and torch.equal(again, reconstruction)
    alone = {"image": images[1:2], "subject_id": ["b"], "location": batch["location"][1:2]}
    assert torch.equal(module.validation_mask(alone)[0], module.validation_mask(batch)[1])
    assert not torch.equal(hidden[0], hidden[1])


def test_fixed_ratio_without_range():
    module = tiny_module(mask_ratio=0.5, mask_ratio_range=None)
    assert module.val_mask_ratio == 0.5
    mask = module.draw_mask(4)
    assert mask.flatten(1).sum(dim=1).tolist() == [32] * 4


def test_training_step_gives_gradients_to_encoder_and_mask_tokens():
    module = tiny_module()
    loss = module.training_step({"image": torch.rand(2, 1, 32, 32, 32)}, 0)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(token.grad is not None and token.grad.abs().sum() > 0 for token in module.net.mask_tokens)
    assert module.net.encoder.stem.conv.weight.grad.abs().sum() > 0


def test_invalid_arguments_fail_at_construction():
    with pytest.raises(ValueError, match="multiple of the mask block size"):
        tiny_module(img_size=36, mask_block_size=8)
    with pytest.raises(ValueError, match="mask_ratio_range"):
        tiny_module(mask_ratio_range=(0.9, 0.6))
    with pytest.raises(ValueError, match="one cell must be masked and one visible"):
        tiny_module(img_size=16, mask_ratio_range=(0.6, 0.95))  # 8 cells: 0.95 hides all
    with pytest.raises(ValueError, match="unknown U-Net preset"):
        tiny_module(unet_preset="huge")
    deep = dict(features=[4, 8, 8, 8, 8], blocks_per_stage=[1] * 5, strides=[1, 2, 2, 2, 2])  # total stride 16
    with pytest.raises(ValueError, match="positive multiple of 16"):
        tiny_module(img_size=24, **deep)
    with pytest.raises(ValueError, match="single voxel"):
        tiny_module(img_size=16, **deep)


def test_paper_config_builds_resenc_l_for_160_cubed():
    config = yaml.safe_load((REPO_ROOT / "experiments/pretrain/s3d.yaml").read_text())
    init_args = {k: v for k, v in config["model"]["init_args"].items() if k not in ("optimizer", "scheduler")}
    with torch.device("meta"):
        module = S3D(**init_args)
    assert module.superpatch_size == (160, 160, 160) and module.grid == (10, 10, 10)
    assert module.net.features == (32, 64, 128, 256, 320, 320) and module.net.total_stride == 32
    assert module.mask_ratio_range == (0.6, 0.9) and module.sparse
    assert config["data"]["init_args"]["superpatch_size"] == 160
    assert config["data"]["init_args"]["target_spacing"] == 1.0


@pytest.mark.parametrize("offset, metric_data_range", [(0.0, None), (0.5, 10.0)])
def test_mri_validation_is_not_clamped_and_scores_on_the_data_range(tiny_ct_dir, tmp_path, offset, metric_data_range):
    """z-normalised inputs (about [−5, 6]): a prediction of input + offset is scored as such, not clipped to
    [0, 1]; an explicit ``metric_data_range`` is the PSNR peak (10 · log10(10² / 0.5²) = 26.02 dB)."""
    module = tiny_module(metric_data_range=metric_data_range)
    module.forward = lambda images, mask: images + offset
    figures = []
    module.log_figure = lambda name, figure: figures.append(figure)
    metrics = validate_on_tiny_mri(module, tiny_ct_dir, tmp_path)
    if offset == 0.0:
        assert math.isinf(metrics["val/psnr_masked"]) and math.isinf(metrics["val/psnr"])
        assert metrics["val/ssim"] == pytest.approx(1.0, abs=1e-6)
    else:
        assert metrics["val/psnr_masked"] == pytest.approx(10 * math.log10(10.0**2 / offset**2), abs=1e-3)
        assert metrics["val/loss"] == pytest.approx(offset**2, rel=1e-4)
    [figure] = figures
    low, high = figure.axes[0].images[0].get_clim()
    assert low < -1.0 and high > 1.5  # the input's 1st-99th percentile, not (0, 1)
