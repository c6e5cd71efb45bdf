"""MaesilCLI: the LightningCLI behind ``python -m maesil {fit,validate,test,predict}``.

Model and data are chosen in YAML by ``class_path``; several ``--config`` files compose (later ones override),
e.g. a method YAML plus ``experiments/trainer/ddp.yaml``.

Only public LightningCLI methods are overridden (``add_arguments_to_parser``, ``parse_arguments``,
``before_instantiate_classes``, ``instantiate_trainer``, ``before_fit``), and the W&B run is finished around
the constructor, which runs the subcommand. The resume checks rely on the order in which
``LightningCLI.__init__`` calls them (lightning 2.6.6, jsonargparse 4.53 tested): ``parse_arguments``, then
the ``--ckpt_path`` checkpoint's hyperparameters replace the model's config, then
``before_instantiate_classes``. ``tests/test_cli.py`` fails if that order changes.
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.warnings import PossibleUserWarning

import maesil.methods  # noqa: F401  (registers the methods for short class_path names)
from maesil.checkpoints.writing import AtomicCheckpointIO, check_resumable, latest_last_checkpoint
from maesil.data import VolumeDataModule  # noqa: F401
from maesil.methods.base import MethodModule
from maesil.wandb_support import LoggedSaveConfigCallback, finish_wandb_run, prepare_wandb_run

log = logging.getLogger("maesil")


class MaesilCLI(LightningCLI):
    """LightningCLI with maesil's defaults.

    * ``data.init_args.superpatch_size`` sets the model's ``superpatch_size`` too (a YAML states the edge once;
      a model without that argument is not linked). An older YAML that also sets the model's ``img_size``
      still parses; the method checks that the two agree.
    * ``trainer.use_distributed_sampler`` defaults to False: the DataModule shards subjects across DDP
      processes itself (TorchIO's Queue must not be wrapped in a second sampler).
    * Without an explicit logger, metrics go to a CSV file under ``default_root_dir/logs``.
    * A ``ModelCheckpoint`` without ``dirpath`` writes to ``default_root_dir/checkpoints``, a fixed
      folder, so that ``--ckpt_path last`` finds ``last.ckpt`` when a run resumes.
    * Checkpoints are written atomically (:class:`maesil.checkpoints.writing.AtomicCheckpointIO`) unless
      ``trainer.plugins`` is set: a failed write keeps the previous checkpoint.
    * A checkpoint to resume from is checked before anything reads it (``--ckpt_path PATH`` when parsed,
      ``--ckpt_path last`` before fit): a truncated or corrupt file stops the run with its name.
    * ``config.yaml`` is overwritten on repeated runs in one folder instead of failing, and the resolved
      config is logged to the loggers (:class:`~maesil.wandb_support.LoggedSaveConfigCallback`), e.g. as a
      W&B run's config.
    * W&B (:mod:`maesil.wandb_support`): per-run folders under ``wandb agent``, ``save_dir`` defaulting to
      the run folder, offline without credentials, and the run finished when the subcommand ends (also on an
      error), so the offline files are complete and a second CLI in one process starts a new run.
    * With ``--ckpt_path``, LightningCLI rebuilds the model from the checkpoint's hyperparameters, which
      override the command's config. A method's ``runtime_hparams`` (e.g. the segmentation ``output_dir``
      and sliding-window settings of ``predict``) are settings of this command, not of the trained network:
      for those the command's config wins.
    """

    def __init__(self, args: Sequence[str] | None = None, **kwargs) -> None:
        kwargs.setdefault("save_config_callback", LoggedSaveConfigCallback)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("trainer_defaults", {"use_distributed_sampler": False})
        kwargs.setdefault("auto_configure_optimizers", False)
        self._command_model: Namespace | None = None
        # Validation and test batches are whole volumes or grid patches already in memory: their loaders have
        # no workers by design, and Lightning's advice to add some (on machines with many cores) does not apply.
        warnings.filterwarnings("ignore", message=r"The '(val|test)_dataloader' does not have many workers",
                                category=PossibleUserWarning)
        try:
            super().__init__(
                MethodModule,
                L.LightningDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                args=args,
                **kwargs,
            )
        except BaseException:
            try:
                self._finish_wandb(exit_code=1)
            except Exception as error:  # never hide the run's own error behind a logging one
                log.warning("W&B: could not finish the run after the error: %s", error)
            raise
        self._finish_wandb(exit_code=0)

    def _finish_wandb(self, exit_code: int) -> None:
        """Finishes the W&B run of a subcommand that ran (``run=False`` leaves the trainer to the caller)."""
        if getattr(self, "subcommand", None) is not None:
            finish_wandb_run(getattr(self, "trainer", None), exit_code)

    def _command_config(self, config: Namespace) -> Namespace:
        """The part of a parsed config that belongs to this command: ``config[subcommand]``, or all of it
        when the CLI runs no subcommand (``run=False``)."""
        return config[self.subcommand] if self.subcommand else config

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.init_args.superpatch_size", "model.init_args.superpatch_size", apply_on="parse")

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parses, then checks the ``--ckpt_path`` file before LightningCLI reads its hyperparameters (fails
        with the file's name) and keeps the command's model config for :meth:`before_instantiate_classes`."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        command = self.config[subcommand]
        ckpt_path = command.get("ckpt_path")
        if ckpt_path and Path(ckpt_path).is_file():
            check_resumable(ckpt_path)
        model = command.get("model")
        self._command_model = model.clone() if isinstance(model, Namespace) else None

    def before_instantiate_classes(self) -> None:
        self._restore_runtime_hparams()
        trainer = self._command_config(self.config).get("trainer")
        if trainer is not None:
            prepare_wandb_run(trainer)

    def _restore_runtime_hparams(self) -> None:
        """The command's values of the model's ``runtime_hparams``, over those a ``--ckpt_path`` checkpoint
        brought into the config."""
        before = self._command_model
        if before is None or not before.get("class_path") or not self.subcommand:
            return
        module_name, _, class_name = str(before.class_path).rpartition(".")
        try:
            model_class = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError, ValueError):
            return
        after = self.config[self.subcommand]["model"]
        for key in getattr(model_class, "runtime_hparams", ()):
            if key in before.init_args and "init_args" in after:
                after.init_args[key] = before.init_args[key]

    def before_fit(self) -> None:
        """Checks the checkpoint ``--ckpt_path last`` resumes from before anything trains: a truncated or
        corrupt file stops the run at once with its name and the alternatives. (A checkpoint given as a path
        is checked when it is parsed, in :meth:`parse_arguments`: each file is read through once.)"""
        if str(self.config_init[self.subcommand].get("ckpt_path")) != "last":
            return
        folders = [callback.dirpath for callback in self.trainer.checkpoint_callbacks
                   if isinstance(callback, ModelCheckpoint) and callback.dirpath]
        path = latest_last_checkpoint(folders)
        if path is not None:  # None: Lightning warns that there is nothing to resume and starts from scratch
            check_resumable(path)

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        config = self._command_config(self.config_init).get("trainer", {})
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
