"""Command line: ``python -m maesil {fit,validate,test,predict} --config ...`` plus tool subcommands.

The Lightning subcommands come from :class:`MaesilCLI` (LightningCLI). Model and data are chosen in
YAML by ``class_path``; several ``--config`` files compose (later ones override), e.g. a method YAML plus
``experiments/trainer/ddp.yaml``. Tools that are not training runs are plain subcommands:

* ``python -m maesil phantoms --out DIR --count 8``: write synthetic CT phantoms (image + organ labels).
* ``python -m maesil check-data DIR``: validate a dataset up front, one table row per problem.
* ``python -m maesil prepare DIR --out CACHE``: preprocess once into a cache for fast loading.
* ``python -m maesil benchmark-recon --checkpoints A.ckpt B.ckpt --data DIR --out OUT``: whole-volume
  reconstruction benchmark (PSNR, SSIM, optional LPIPS) with a table and a slice figure.
* ``python -m maesil export-encoder CKPT --out enc.safetensors``: the pretrained encoder alone, as safetensors
  plus a JSON sidecar (architecture, preprocessing).
* ``python -m maesil compare-init --checkpoints A.ckpt B.ckpt``: fine-tune from scratch and from each
  checkpoint with the same budget over several seeds; Dice/HD95 table and plot.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger

import maesil.methods  # noqa: F401  (registers the methods for short class_path names)
from maesil.checkpoint_io import AtomicCheckpointIO
from maesil.data import VolumeDataModule  # noqa: F401
from maesil.methods.base import PretrainModule


class MaesilCLI(LightningCLI):
    """LightningCLI with maesil's defaults.

    * ``trainer.use_distributed_sampler`` defaults to False: the DataModule shards subjects across DDP
      processes itself (TorchIO's Queue must not be wrapped in a second sampler).
    * Without an explicit logger, metrics go to a CSV file under ``default_root_dir/logs``.
    * A ``ModelCheckpoint`` without ``dirpath`` writes to ``default_root_dir/checkpoints``, a fixed
      folder, so that ``--ckpt_path last`` finds ``last.ckpt`` when a run resumes.
    * Checkpoints are written atomically (:class:`maesil.checkpoint_io.AtomicCheckpointIO`) unless
      ``trainer.plugins`` is set: a failed write keeps the previous checkpoint.
    * ``config.yaml`` is overwritten on repeated runs in one folder instead of failing.
    * With ``--ckpt_path``, LightningCLI rebuilds the model from the checkpoint's hyperparameters, which
      override the command's config. A method's ``runtime_hparams`` (e.g. the segmentation ``output_dir``
      and sliding-window settings of ``predict``) are settings of this command, not of the trained network:
      for those the command's config wins.
    """

    def __init__(self, args: Sequence[str] | None = None, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("trainer_defaults", {"use_distributed_sampler": False})
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault(
            "parser_kwargs",
            {
                "description": "maesil: self-supervised pretraining of 3D medical images. "
                "Tools besides the Lightning subcommands: " + ", ".join(sorted(TOOLS)) + " (each has --help)."
            },
        )
        super().__init__(
            PretrainModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            **kwargs,
        )

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand") if self.config else None
        before = self.config.get(subcommand, {}).get("model") if subcommand else None
        super()._parse_ckpt_path()
        if before is None or not getattr(before, "class_path", None):
            return
        import importlib

        module_name, _, class_name = str(before.class_path).rpartition(".")
        try:
            model_class = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            return
        after = self.config[subcommand]["model"]
        for key in getattr(model_class, "runtime_hparams", ()):
            if key in before.init_args and "init_args" in after:
                after.init_args[key] = before.init_args[key]

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        config = self._get(self.config_init, "trainer", default={})
        root = Path(config.get("default_root_dir") or os.getcwd())
        if not config.get("plugins") and "plugins" not in kwargs:
            kwargs["plugins"] = [AtomicCheckpointIO()]
        if config.get("logger") in (None, True) and "logger" not in kwargs:
            kwargs["logger"] = CSVLogger(save_dir=str(root), name="logs")
        callbacks = config.get("callbacks") or []
        for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                callback.dirpath = str(root / "checkpoints")
        return super().instantiate_trainer(**kwargs)


def phantoms_command(argv: Sequence[str]) -> int:
    """``python -m maesil phantoms``: writes synthetic CT phantoms as NIfTI."""
    from maesil.data.phantoms import DEFAULT_SHAPE, DEFAULT_SPACING, write_phantoms

    parser = argparse.ArgumentParser(
        prog="python -m maesil phantoms",
        description="Write deterministic synthetic torso CT phantoms (HU images + organ label maps) as NIfTI: "
        "OUT/images/phantom_XXX.nii.gz and OUT/labels/phantom_XXX.nii.gz.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--count", "--n", type=int, default=8, help="number of phantoms (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first phantom (default 0)")
    parser.add_argument("--shape", type=int, nargs=3, default=list(DEFAULT_SHAPE), metavar=("X", "Y", "Z"))
    parser.add_argument("--spacing", type=float, nargs=3, default=list(DEFAULT_SPACING), metavar=("SX", "SY", "SZ"))
    args = parser.parse_args(list(argv))
    paths = write_phantoms(args.out, args.count, seed=args.seed, shape=tuple(args.shape), spacing=tuple(args.spacing))
    print(f"{len(paths)} phantoms in {args.out.resolve()}")
    return 0


def check_data_command(argv: Sequence[str]) -> int:
    """``python -m maesil check-data``: see :mod:`maesil.tools.check_data`."""
    from maesil.tools.check_data import check_data_command as command

    return command(argv)


def prepare_command(argv: Sequence[str]) -> int:
    """``python -m maesil prepare``: see :mod:`maesil.tools.prepare`."""
    from maesil.tools.prepare import prepare_command as command

    return command(argv)


def benchmark_recon_command(argv: Sequence[str]) -> int:
    """``python -m maesil benchmark-recon``: see :mod:`maesil.tools.benchmark_recon`."""
    from maesil.tools.benchmark_recon import benchmark_recon_command as command

    return command(argv)


def export_encoder_command(argv: Sequence[str]) -> int:
    """``python -m maesil export-encoder``: see :mod:`maesil.tools.export_encoder`."""
    from maesil.tools.export_encoder import export_encoder_command as command

    return command(argv)


def compare_init_command(argv: Sequence[str]) -> int:
    """``python -m maesil compare-init``: see :mod:`maesil.tools.compare_init`."""
    from maesil.tools.compare_init import compare_init_command as command

    return command(argv)


TOOLS: dict[str, Callable[[Sequence[str]], int]] = {
    "phantoms": phantoms_command,
    "check-data": check_data_command,
    "prepare": prepare_command,
    "benchmark-recon": benchmark_recon_command,
    "export-encoder": export_encoder_command,
    "compare-init": compare_init_command,
}


def configure_logging(level: int = logging.INFO) -> None:
    """Shows maesil's own messages (data found, files excluded, the train/val split) on stderr.

    Library use stays silent unless the application configures logging; the command line is an
    application, and nothing it skips or decides about the data should go unseen.
    """
    logger = logging.getLogger("maesil")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[maesil] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(level)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m maesil`` and the ``maesil`` console script."""
    configure_logging()
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in TOOLS:
        raise SystemExit(TOOLS[args[0]](args[1:]))
    MaesilCLI(args=None if argv is None else args)
