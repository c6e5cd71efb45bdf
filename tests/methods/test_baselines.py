"""AE, VAE and VQ-VAE baselines: training through the CLI, losses, codebook monitoring, evaluation hook."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from maesil.cli import main
from maesil.methods import AE, VAE, VQVAE
from maesil.methods.baselines import (
    AutoencoderOutput,
    CodebookCollapseWarning,
    codebook_collapse_message,
    codebook_statistics,
)
from maesil.models.autoencoders import AUTOENCODER_PRESETS
from tests.helpers import REPO_ROOT, tiny_data_overrides, validate_on_tiny_mri

BASELINES = {"ae": AE, "vae": VAE, "vqvae": VQVAE}

#: Tiny networks for 32³ superpatches, as constructor arguments and as CLI overrides.
TINY = {
    "ae": dict(img_size=32, channels=[4, 8, 16, 8], strides=[2, 2, 2, 1], num_res_units=1),
    "vae": dict(img_size=32, channels=[4, 8, 16, 8], strides=[2, 2, 2, 1], num_res_units=1, latent_size=16,
                kl_weight=0.01, kl_warmup_steps=2),
    "vqvae": dict(img_size=32, channels=[8, 16], num_res_layers=1, num_res_channels=[8, 16], num_embeddings=16,
                  embedding_dim=8),
}  # fmt: skip


def tiny_baseline_args(name: str, data_dir: Path, run_dir: Path, max_steps: int = 4) -> list[str]:
    """CLI arguments that shrink experiments/pretrain/<name>_demo.yaml to a seconds-long run."""
    model = [arg for key, value in TINY[name].items() for arg in (f"--model.init_args.{key}", str(value))]
    return [
        "--config", str(REPO_ROOT / f"experiments/pretrain/{name}_demo.yaml"),
        *tiny_data_overrides(data_dir),
        *model,
        "--trainer.max_steps", str(max_steps),
        "--trainer.val_check_interval", "2",
        "--trainer.log_every_n_steps", "1",
        "--trainer.default_root_dir", str(run_dir),
    ]  # fmt: skip


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    [metrics_file] = sorted(run_dir.glob("logs/version_*/metrics.csv"))[-1:]
    with open(metrics_file) as handle:
        return list(csv.DictReader(handle))


def values(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(row[key]) for row in rows if row.get(key)]


@pytest.mark.parametrize("name", ["ae", "vae", "vqvae"])
def test_baseline_trains_through_cli_and_reconstructs_from_its_checkpoint(name, tiny_ct_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CodebookCollapseWarning)  # 16 codes, 2 steps: collapse is not the point here
        main(["fit", *tiny_baseline_args(name, tiny_ct_dir, run_dir)])

    out = capsys.readouterr().out
    assert f"{BASELINES[name].__name__}: " in out and "M parameters" in out and "latent" in out
    checkpoint_path = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint_path, map_location="cpu", weights_only=False)["global_step"] == 4
    rows = read_metrics(run_dir)
    psnr = values(rows, "val/psnr")
    assert len(psnr) == 2 and all(0 < value < 100 for value in psnr)
    assert len(values(rows, "val/ssim")) == 2 and len(values(rows, "val/loss")) == 2
    assert values(rows, "train/loss") and values(rows, "train/recon")
    pictures = sorted((run_dir / "logs").glob("version_*/reconstructions/step_*.png"))
    assert [p.name for p in pictures] == ["step_0000002.png", "step_0000004.png"]
    if name == "vae":
        assert values(rows, "train/kl")
        # logged before each optimizer step: kl_weight · min(1, step / kl_warmup_steps) = 0.01 · min(1, step / 2)
        logged = [(int(row["step"]), float(row["train/kl_weight"])) for row in rows if row.get("train/kl_weight")]
        assert [step for step, _ in logged] == [0, 1, 2, 3]
        assert [weight for _, weight in logged] == pytest.approx([0.0, 0.005, 0.01, 0.01])
    if name == "vqvae":
        assert values(rows, "train/quantization") and values(rows, "train/perplexity")
        usage, perplexity = values(rows, "val/codebook_usage"), values(rows, "val/perplexity")
        assert len(usage) == 2 and all(0 < u <= 1 for u in usage)
        assert len(perplexity) == 2 and all(1 <= p <= 16 for p in perplexity)

    # The checkpoint restores as benchmark-recon loads it, and reconstructs whole superpatches.
    model = BASELINES[name].load_from_checkpoint(checkpoint_path, map_location="cpu", weights_only=True).eval()
    images = torch.rand(2, 1, 32, 32, 32)
    reconstruction, hidden = model.reconstruct_for_evaluation({"image": images})
    assert hidden is None and reconstruction.shape == images.shape
    assert float(reconstruction.min()) >= 0.0 and float(reconstruction.max()) <= 1.0


def test_kl_weight_warms_up_linearly():
    module = VAE(**{**TINY["vae"], "kl_weight": 0.2, "kl_warmup_steps": 100})
    assert [module.kl_weight_at(step) for step in (0, 25, 50, 100, 1000)] == pytest.approx([0, 0.05, 0.1, 0.2, 0.2])
    assert VAE(**{**TINY["vae"], "kl_weight": 0.2, "kl_warmup_steps": 0}).kl_weight_at(0) == 0.2


def test_kl_divergence_is_zero_for_the_prior_and_positive_otherwise():
    zeros = torch.zeros(3, 5)
    assert float(VAE.kl_divergence(zeros, zeros)) == 0.0
    # KL(N(1, 1) ‖ N(0, 1)) = 0.5 per dimension
    assert float(VAE.kl_divergence(torch.ones(3, 5), zeros)) == pytest.approx(2.5)


@pytest.mark.parametrize("name", ["ae", "vae", "vqvae"])
def test_tiny_overfit_loss_falls(name):
    torch.manual_seed(0)
    config = {**TINY[name], "img_size": 16}
    if name == "ae":
        config.update(channels=[8, 16, 8], strides=[2, 2, 1])
    if name == "vae":
        config.update(channels=[8, 16, 8], strides=[2, 2, 1], kl_warmup_steps=0, kl_weight=1e-4)
    module = BASELINES[name](**config).train()
    grid = torch.linspace(0, 1, 16)
    images = (grid[:, None, None] * grid[None, :, None] + 0.2 * grid[None, None, :]).clamp(0, 1)
    images = torch.stack([images, images.flip(0)])[:, None]  # two smooth volumes (2, 1, 16, 16, 16)
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = module(images).losses["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses


@pytest.mark.parametrize("name", ["ae", "vae", "vqvae"])
def test_reconstruct_for_evaluation_is_deterministic_and_in_range(name):
    module = BASELINES[name](**TINY[name]).train()  # even in training mode: no sampling, no codebook update
    images = torch.rand(2, 1, 32, 32, 32)
    if name == "vqvae":
        codebook = module.net.quantizer.quantizer.embedding.weight.clone()
    first, hidden = module.reconstruct_for_evaluation({"image": images, "subject_id": ["a", "b"]})
    second, _ = module.reconstruct_for_evaluation({"image": images})
    assert hidden is None and first.shape == images.shape
    assert float(first.min()) >= 0.0 and float(first.max()) <= 1.0
    assert torch.equal(first, second)
    if name == "vqvae":
        assert torch.equal(codebook, module.net.quantizer.quantizer.embedding.weight)
        assert not bool(module.codebook_initialised)  # initialised by the first training batch only


def test_codebook_statistics_and_collapse_message():
    uniform = codebook_statistics(torch.full((8,), 5))
    assert float(uniform["codebook_usage"]) == 1.0 and float(uniform["perplexity"]) == pytest.approx(8.0)
    degenerate = codebook_statistics(torch.tensor([100, 0, 0, 0, 0, 0, 0, 0]))
    assert float(degenerate["codebook_usage"]) == 0.125 and float(degenerate["perplexity"]) == pytest.approx(1.0)
    assert codebook_collapse_message(1.0, 8.0, 8) is None
    assert "collapse" in codebook_collapse_message(0.125, 1.0, 8)  # perplexity below 2
    assert "collapse" in codebook_collapse_message(0.05, 30.0, 1024)  # usage below 10 %


def test_vqvae_codebook_initialises_from_the_first_batch_and_restarts_dead_codes():
    module = VQVAE(**TINY["vqvae"], dead_code_threshold=0.5).train()
    quantizer = module.net.quantizer.quantizer
    images = torch.rand(2, 1, 32, 32, 32)
    latents = module.net.encode(images).detach()
    module(images)
    assert bool(module.codebook_initialised)
    # every code is one of the batch's encoder outputs, moved by at most one EMA update
    distances = torch.cdist(quantizer.embedding.weight, latents.movedim(1, -1).reshape(-1, 8))
    assert float(distances.min(dim=1).values.max()) < 0.5 * float(latents.std()) * 8**0.5
    quantizer.ema_cluster_size[:4] = 0.0  # four codes unused for long
    assert module.restart_dead_codes(latents) == 4
    assert quantizer.ema_cluster_size[:4].tolist() == [1.0] * 4


def test_validation_reports_codebook_usage_and_warns_on_collapse(tmp_path):
    module = VQVAE(**TINY["vqvae"])
    codebook = module.net.quantizer.quantizer.embedding.weight.data
    codebook.fill_(1.0e3)
    codebook[0] = 0.0  # every encoder output is nearest to code 0
    batches = DataLoader([{"image": torch.rand(2, 1, 32, 32, 32), "subject_id": ["a", "b"]}] * 2, batch_size=None)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, default_root_dir=tmp_path, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    with pytest.warns(CodebookCollapseWarning, match=r"6\.2% of 16 codes used"):
        [metrics] = trainer.validate(module, dataloaders=batches)
    assert metrics["val/codebook_usage"] == pytest.approx(1 / 16)
    assert metrics["val/perplexity"] == pytest.approx(1.0)
    assert metrics["val/codes_used"] == 1.0
    assert module.last_collapse_message and "16 codes" in module.last_collapse_message
    assert module.last_figure_path is not None and module.last_figure_path.exists()


@pytest.mark.parametrize("name", ["ae", "vae", "vqvae"])
def test_yaml_sizes_match_presets_and_demo_shares_maesil_data_and_trainer(name):
    demo_reference = yaml.safe_load((REPO_ROOT / "experiments/pretrain/maesil_demo.yaml").read_text())
    paper_reference = yaml.safe_load((REPO_ROOT / "experiments/pretrain/maesil.yaml").read_text())
    for suffix, preset, reference in (("_demo", "cpu", demo_reference), ("", "paper", paper_reference)):
        config = yaml.safe_load((REPO_ROOT / f"experiments/pretrain/{name}{suffix}.yaml").read_text())
        assert config["data"] == reference["data"]
        trainer, expected = dict(config["trainer"]), dict(reference["trainer"])
        assert trainer.pop("default_root_dir") == f"runs/{name}{suffix}"
        expected.pop("default_root_dir")
        trainer.pop("callbacks"), expected.pop("callbacks")
        assert trainer == expected
        init_args = {**config["model"]["init_args"], "superpatch_size": config["data"]["init_args"]["superpatch_size"]}
        for key, value in AUTOENCODER_PRESETS[name][preset].items():
            assert init_args[key] == (list(value) if isinstance(value, tuple) else value), key
        assert config["model"]["init_args"]["optimizer"] == reference["model"]["init_args"]["optimizer"]


def test_mri_validation_of_an_exact_autoencoder_is_perfect_and_pictured_over_the_data(tiny_ct_dir, tmp_path):
    """z-normalised inputs (about [−5, 6]): an exact reconstruction is not clipped to [0, 1] (PSNR ∞, SSIM 1), and
    the picture spans the input's percentiles, its difference row [0, high − low]."""
    module = AE(**TINY["ae"])
    module.forward = lambda images, deterministic=False: AutoencoderOutput(images.clone(), {"loss": torch.tensor(0.0)})
    figures = []
    module.log_figure = lambda name, figure: figures.append(figure)
    metrics = validate_on_tiny_mri(module, tiny_ct_dir, tmp_path)
    assert math.isinf(metrics["val/psnr"]) and metrics["val/ssim"] == pytest.approx(1.0, abs=1e-6)
    [figure] = figures
    low, high = figure.axes[0].images[0].get_clim()  # input, axial
    assert low < -1.0 and high > 1.5
    assert figure.axes[3].images[0].get_clim() == (low, high)  # reconstruction
    assert figure.axes[6].images[0].get_clim() == pytest.approx((0.0, high - low))  # |difference|


def test_reconstruct_for_evaluation_clamps_ct_only():
    module = AE(**TINY["ae"])
    images = torch.randn(2, 1, 32, 32, 32) * 3.0  # z-normalised-like: far outside [0, 1]
    module.forward = lambda images, deterministic=False: AutoencoderOutput(images.clone(), {"loss": torch.tensor(0.0)})
    clamped, _ = module.reconstruct_for_evaluation({"image": images})
    assert torch.equal(clamped, images.clamp(0.0, 1.0))  # no DataModule: CT, as before
    module.input_modality = "mri"
    exact, _ = module.reconstruct_for_evaluation({"image": images})
    assert torch.equal(exact, images)
