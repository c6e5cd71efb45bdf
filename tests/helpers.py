"""Helpers shared by tests: paths and tiny-run arguments."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

#: A phantom small enough for unit tests: 48 × 48 × 24 voxels of 4 × 4 × 8 mm (the same anatomy in mm).
TINY_SHAPE = (48, 48, 24)
TINY_SPACING = (4.0, 4.0, 8.0)


def tiny_data_overrides(data_dir: Path) -> list[str]:
    """DataModule arguments for the tiny phantoms: 32³ superpatches at 4 mm, 2 per batch, no worker processes,
    read through the TorchIO queue (a YAML's prepared ``cache_dir`` would be written outside the test's folder)."""
    return [
        "--data.init_args.data_dir", str(data_dir),
        "--data.init_args.cache_dir", "null",
        "--data.init_args.superpatch_size", "32",
        "--data.init_args.target_spacing", "4.0",
        "--data.init_args.num_workers", "0",
        "--data.init_args.batch_size", "2",
        "--data.init_args.samples_per_volume", "2",
        "--data.init_args.queue_length", "4",
    ]


def tiny_maesil_overrides(data_dir: Path) -> list[str]:
    """Data and model arguments that shrink the MAESIL demo to a 32³ superpatch (the model follows the data's
    ``superpatch_size``) and a 2-block ViT."""
    return [
        *tiny_data_overrides(data_dir),
        "--model.init_args.embed_dim", "48",
        "--model.init_args.depth", "2",
        "--model.init_args.num_heads", "2",
        "--model.init_args.decoder_embed_dim", "48",
        "--model.init_args.decoder_depth", "1",
        "--model.init_args.decoder_num_heads", "2",
    ]


def tiny_maesil_args(data_dir: Path, run_dir: Path, max_steps: int = 4) -> list[str]:
    """CLI arguments that shrink experiments/pretrain/maesil_demo.yaml to a seconds-long run."""
    return [
        "--config", str(REPO_ROOT / "experiments/pretrain/maesil_demo.yaml"),
        *tiny_maesil_overrides(data_dir),
        "--trainer.max_steps", str(max_steps),
        "--trainer.val_check_interval", "2",
        "--trainer.log_every_n_steps", "1",
        "--trainer.default_root_dir", str(run_dir),
    ]


def validate_on_tiny_mri(module, data_dir: Path, root: Path) -> dict[str, float]:
    """``trainer.validate`` of ``module`` on the tiny CT phantoms z-normalised as MRI (about [−5, 6], not
    [0, 1]; one validation volume); returns the logged metrics."""
    import lightning as L

    from maesil.data import VolumeDataModule

    datamodule = VolumeDataModule(data_dir=str(data_dir), modality="mri", superpatch_size=32, target_spacing=4.0,
                                  val_fraction=0.34, batch_size=2, num_workers=0, check_voxels=False)
    trainer = L.Trainer(accelerator="cpu", logger=False, default_root_dir=root, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    [metrics] = trainer.validate(module, datamodule=datamodule)
    return metrics
