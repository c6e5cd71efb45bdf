"""Weights & Biases on the command line (``--config experiments/trainer/wandb.yaml``).

* :func:`prepare_wandb_run`, before the trainer is built: under ``wandb agent`` every run of a sweep gets
  its own folder; a ``WandbLogger`` with ``save_dir: null`` writes under the run folder; without credentials
  (:func:`wandb_credentials_available`) and without ``WANDB_MODE`` the run goes offline instead of waiting at
  a login prompt (:func:`ensure_wandb_can_start`).
* :class:`LoggedSaveConfigCallback`: the full resolved config becomes the run's config, in the dotted keys a
  sweep sets (:func:`flatten_config`).
* :func:`finish_wandb_run`, when the command ends: the run is finished and its files complete.
"""

from __future__ import annotations

import logging
import netrc
import os
from collections.abc import Mapping
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

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
    run shows every setting, not only the model's hyperparameters. Values that one key sets for another
    (``model.init_args.superpatch_size`` from ``data.init_args.superpatch_size``) are logged under both keys.
    Lightning calls :meth:`save_config` on global rank 0 only.
    """

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        import yaml

        loggers = [logger for logger in trainer.loggers if not isinstance(logger, CSVLogger)]
        if not loggers:
            return
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False, skip_link_targets=False))
        config.pop("config", None)  # the --config file paths; their content is what follows
        flat = flatten_config(config)
        for logger in loggers:
            if isinstance(logger, Logger):
                logger.log_hyperparams(flat)


def logger_configs(logger_config: object) -> list:
    """The logger entries of a parsed ``trainer.logger`` (one, a list, or a bool)."""
    if isinstance(logger_config, (list, tuple)):
        return list(logger_config)
    return [logger_config] if logger_config not in (None, True, False) else []


def is_wandb_logger(logger_config: object) -> bool:
    """Whether a parsed logger entry (``class_path`` + ``init_args``) is a ``WandbLogger``."""
    class_path = logger_config.get("class_path") if hasattr(logger_config, "get") else None
    return str(class_path or "").rsplit(".", 1)[-1] == "WandbLogger"


def wandb_credentials_available(environ: Mapping[str, str] | None = None) -> bool:
    """Whether wandb would find an API key without asking: ``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE``
    or an entry for the W&B host (``WANDB_BASE_URL``, default api.wandb.ai) in ``$NETRC`` / ``~/.netrc``."""
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
    wandb_loggers = [c for c in logger_configs(logger_config) if is_wandb_logger(c)]
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


def prepare_wandb_run(trainer_config: Mapping) -> None:
    """Settles a parsed ``trainer`` config (changed in place) before the trainer and its loggers are built.

    * Under ``wandb agent`` (``WANDB_SWEEP_ID`` and ``WANDB_RUN_ID`` set) with a W&B logger, the run folder
      is ``default_root_dir/<run id>``: a sweep gives every run the same command, and runs must not share
      checkpoints.
    * A ``WandbLogger`` with neither ``save_dir`` nor ``dir`` writes under ``default_root_dir``, so its
      ``wandb/`` folder, ``config.yaml`` and pictures stay with the run's checkpoints.
    * Without credentials and without ``WANDB_MODE`` the run goes offline (:func:`ensure_wandb_can_start`).
    """
    root = Path(trainer_config.get("default_root_dir") or os.getcwd())
    loggers = logger_configs(trainer_config.get("logger"))
    sweep_id, run_id = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    if sweep_id and run_id and any(is_wandb_logger(c) for c in loggers):
        root = root / run_id
        trainer_config["default_root_dir"] = str(root)
        log.info("W&B sweep %s, run %s: run folder %s", sweep_id, run_id, root)
    for logger_config in loggers:
        init_args = logger_config.get("init_args") if is_wandb_logger(logger_config) else None
        if init_args is not None and init_args.get("save_dir") is None and init_args.get("dir") is None:
            init_args["save_dir"] = str(root)
    ensure_wandb_can_start(trainer_config.get("logger"), root)


def finish_wandb_run(trainer: L.Trainer | None, exit_code: int) -> None:
    """Ends the W&B run of ``trainer``'s ``WandbLogger`` (which leaves it open) and waits for its files.

    ``run.finish()`` alone returns before wandb's service process has written an offline run's transaction
    log; ``wandb.teardown()`` waits for the service to shut down (what wandb's exit hook does when the
    process ends), so the run is complete when the command returns, and a later command in the same process
    starts a new run that reads the environment (``WANDB_MODE``) afresh. Without a ``WandbLogger``, nothing.
    """
    if trainer is None or not any(isinstance(logger, WandbLogger) for logger in trainer.loggers):
        return
    import wandb

    if wandb.run is not None:
        wandb.run.finish(exit_code=exit_code)
    wandb.teardown()
