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
* ``python -m maesil sweep-local SWEEP.yaml``: run a W&B grid sweep file locally, one run after another,
  without a W&B server; ``results.csv`` and a plot of the final metrics.

Weights & Biases (``--config experiments/trainer/wandb.yaml``): the full resolved config is logged to the
run, and without credentials (no ``WANDB_API_KEY``, no netrc entry) and without ``WANDB_MODE`` the run goes
offline instead of waiting at a login prompt (see :func:`ensure_wandb_can_start`).
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
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger

import maesil.methods  # noqa: F401  (registers the methods for short class_path names)
from maesil.checkpoint_io import AtomicCheckpointIO, check_resumable, latest_last_checkpoint
from maesil.data import VolumeDataModule  # noqa: F401
from maesil.methods.base import PretrainModule

log = logging.getLogger("maesil")

#: W&B modes (``WANDB_MODE`` or the logger's ``mode``) under which wandb never asks for a login.
WANDB_LOCAL_MODES = ("offline", "dryrun", "disabled")


def flatten_config(config: dict, prefix: str = "") -> dict[str, object]:
    """Nested config dict → ``{"model.init_args.mask_ratio": 0.75, ...}``; lists stay values.

    Dotted keys are the keys a W&B sweep sets (``model.init_args.mask_ratio``), so the logged config and a
    sweep's parameters share one column each in the W&B run table.
    """
    flat: dict[str, object] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, name + "."))
        else:
            flat[name] = value
    return flat


class LoggedSaveConfigCallback(SaveConfigCallback):
    """Writes ``config.yaml`` to the run folder (as LightningCLI does) and logs the resolved config to the loggers.

    Every logger of the trainer except ``CSVLogger`` (whose folder already holds ``config.yaml``) receives
    the flattened config through ``log_hyperparams``; for a ``WandbLogger`` that is the run's config, so a W&B
    run shows every setting, not only the model's hyperparameters. Lightning calls :meth:`save_config` on
    global rank 0 only.
    """

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        import yaml

        loggers = [logger for logger in trainer.loggers if not isinstance(logger, CSVLogger)]
        if not loggers:
            return
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        config.pop("config", None)  # the --config file paths; their content is what follows
        flat = flatten_config(config)
        for logger in loggers:
            if isinstance(logger, Logger):
                logger.log_hyperparams(flat)


def _logger_configs(logger_config: object) -> list:
    """The logger entries of a parsed ``trainer.logger`` (one, a list, or a bool)."""
    if isinstance(logger_config, (list, tuple)):
        return list(logger_config)
    return [logger_config] if logger_config not in (None, True, False) else []


def _is_wandb_logger(logger_config: object) -> bool:
    class_path = logger_config.get("class_path") if hasattr(logger_config, "get") else None
    return str(class_path or "").rsplit(".", 1)[-1] == "WandbLogger"


def wandb_credentials_available(environ: dict[str, str] | None = None) -> bool:
    """Whether wandb would find an API key without asking: ``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE``
    or an entry for the W&B host (``WANDB_BASE_URL``, default api.wandb.ai) in ``$NETRC`` / ``~/.netrc``."""
    import netrc
    from urllib.parse import urlsplit

    environ = os.environ if environ is None else environ
    if environ.get("WANDB_API_KEY") or environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc or "api.wandb.ai"
    if environ.get("NETRC"):
        candidates = [Path(environ["NETRC"]).expanduser()]
    else:
        candidates = [Path("~/.netrc").expanduser(), Path("~/_netrc").expanduser()]
    for path in candidates:
        try:
            entry = netrc.netrc(str(path)).authenticators(host)
        except (OSError, netrc.NetrcParseError):
            continue
        if entry and entry[2]:
            return True
    return False


def ensure_wandb_can_start(logger_config: object, root: Path) -> str | None:
    """Makes a configured ``WandbLogger`` start without a login prompt; returns the mode it set, if any.

    With ``WANDB_MODE`` unset, no credentials (:func:`wandb_credentials_available`) and a W&B logger that is
    not local already (``offline: true`` or ``mode: offline|disabled``), sets ``WANDB_MODE=offline``: the run
    is written under ``<save_dir>/wandb`` and can be uploaded later with ``wandb sync``. A set ``WANDB_MODE``
    (``offline``, ``disabled``, ``online``) is honoured as it is. Without this, wandb would wait at an
    interactive login prompt, or fail a headless job.
    """
    wandb_loggers = [c for c in _logger_configs(logger_config) if _is_wandb_logger(c)]
    if not wandb_loggers or os.environ.get("WANDB_MODE"):
        return None
    settings = [c.get("init_args") or {} for c in wandb_loggers]
    if all(init.get("offline") or init.get("mode") in WANDB_LOCAL_MODES for init in settings):
        return None
    if wandb_credentials_available():
        return None
    os.environ["WANDB_MODE"] = "offline"
    save_dir = settings[0].get("save_dir") or root
    log.warning(
        "W&B: no credentials found (no WANDB_API_KEY, no api.wandb.ai entry in ~/.netrc), so the run is logged "
        "offline to %s/wandb/offline-run-*; upload it later with `wandb sync %s/wandb/offline-run-*` after "
        "`wandb login`, or set WANDB_MODE=disabled to skip W&B.",
        save_dir, save_dir,
    )
    return "offline"


class MaesilCLI(LightningCLI):
    """LightningCLI with maesil's defaults.

    * ``trainer.use_distributed_sampler`` defaults to False: the DataModule shards subjects across DDP
      processes itself (TorchIO's Queue must not be wrapped in a second sampler).
    * Without an explicit logger, metrics go to a CSV file under ``default_root_dir/logs``.
    * A ``ModelCheckpoint`` without ``dirpath`` writes to ``default_root_dir/checkpoints``, a fixed
      folder, so that ``--ckpt_path last`` finds ``last.ckpt`` when a run resumes.
    * Checkpoints are written atomically (:class:`maesil.checkpoint_io.AtomicCheckpointIO`) unless
      ``trainer.plugins`` is set: a failed write keeps the previous checkpoint.
    * ``config.yaml`` is overwritten on repeated runs in one folder instead of failing, and the resolved
      config is logged to the loggers (:class:`LoggedSaveConfigCallback`), e.g. as a W&B run's config.
    * Under ``wandb agent`` (``WANDB_SWEEP_ID`` and ``WANDB_RUN_ID`` set) with a W&B logger, the run folder
      is ``default_root_dir/<run id>``: a sweep gives every run the same command, and runs must not share
      checkpoints.
    * A ``WandbLogger`` with ``save_dir: null`` writes under ``default_root_dir`` (its ``wandb/`` folder,
      ``config.yaml`` and pictures stay with the run's checkpoints); without credentials and without
      ``WANDB_MODE`` it runs offline (:func:`ensure_wandb_can_start`), and its run is finished when the
      subcommand ends, so the offline files are complete and a second CLI in one process starts a new run.
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
        ckpt_path = self.config.get(subcommand, {}).get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_file():
            check_resumable(ckpt_path)  # LightningCLI reads it right here; fail with the file's name
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

    def before_instantiate_classes(self) -> None:
        trainer = self._get(self.config, "trainer")
        if trainer is None:
            return
        root = Path(trainer.get("default_root_dir") or os.getcwd())
        sweep_id, run_id = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
        if sweep_id and run_id and any(_is_wandb_logger(c) for c in _logger_configs(trainer.get("logger"))):
            # Under `wandb agent` every run of the sweep gets the same command: give each its own folder.
            root = root / run_id
            trainer["default_root_dir"] = str(root)
            log.info("W&B sweep %s, run %s: run folder %s", sweep_id, run_id, root)
        for logger_config in _logger_configs(trainer.get("logger")):
            init_args = logger_config.get("init_args") if _is_wandb_logger(logger_config) else None
            if init_args is not None and init_args.get("save_dir") is None and init_args.get("dir") is None:
                init_args["save_dir"] = str(root)
        ensure_wandb_can_start(trainer.get("logger"), root)

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            try:
                self._finish_wandb(exit_code=1)
            except Exception as error:  # never hide the run's own error behind a logging one
                log.warning("W&B: could not finish the run after the error: %s", error)
            raise
        self._finish_wandb(exit_code=0)

    def _finish_wandb(self, exit_code: int) -> None:
        """Ends the W&B run this subcommand started (WandbLogger leaves it open) and waits for its files.

        ``run.finish()`` alone returns before wandb's service process has written an offline run's
        transaction log; ``wandb.teardown()`` waits for the service to shut down (what wandb's exit hook does
        when the process ends), so the run is complete when the subcommand returns, and a later CLI in the
        same process starts a new run that reads the environment (``WANDB_MODE``) afresh.
        """
        from lightning.pytorch.loggers import WandbLogger

        if not any(isinstance(logger, WandbLogger) for logger in self.trainer.loggers):
            return
        import wandb

        if wandb.run is not None:
            wandb.run.finish(exit_code=exit_code)
        wandb.teardown()

    def before_fit(self) -> None:
        """Checks the checkpoint ``--ckpt_path last`` resumes from before anything trains: a truncated or
        corrupt file stops the run at once with its name and the alternatives. (A checkpoint given as a path
        is checked when it is parsed, in :meth:`_parse_ckpt_path`: each file is read through once.)"""
        if str(self._get(self.config_init, "ckpt_path")) != "last":
            return
        folders = [callback.dirpath for callback in self.trainer.checkpoint_callbacks
                   if isinstance(callback, ModelCheckpoint) and callback.dirpath]
        path = latest_last_checkpoint(folders)
        if path is not None:  # None: Lightning warns that there is nothing to resume and starts from scratch
            check_resumable(path)

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


def sweep_local_command(argv: Sequence[str]) -> int:
    """``python -m maesil sweep-local``: see :mod:`maesil.tools.sweep_local`."""
    from maesil.tools.sweep_local import sweep_local_command as command

    return command(argv)


TOOLS: dict[str, Callable[[Sequence[str]], int]] = {
    "phantoms": phantoms_command,
    "check-data": check_data_command,
    "prepare": prepare_command,
    "benchmark-recon": benchmark_recon_command,
    "export-encoder": export_encoder_command,
    "compare-init": compare_init_command,
    "sweep-local": sweep_local_command,
}


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at each message (not the stream of the first call), so
    redirected or captured stderr keeps working."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(level: int = logging.INFO) -> None:
    """Shows maesil's own messages (data found, files excluded, the train/val split) on stderr.

    Library use stays silent unless the application configures logging; the command line is an
    application, and nothing it skips or decides about the data should go unseen.
    """
    logger = logging.getLogger("maesil")
    if not logger.handlers:
        handler = _StderrHandler()
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
