"""W&B through the real CLI, offline: the resolved config, metrics and pictures land in the run; no login prompt.

wandb 0.31 writes an offline run's config, history and summary only into its ``run-*.wandb`` transaction
log (``files/`` holds the media and ``output.log``, no ``config.yaml`` or ``wandb-summary.json`` until
``wandb sync``), and no longer ships a Python reader for it, so :func:`read_wandb_records` decodes the
log's record framing (LevelDB log format behind a 7-byte ``:W&B`` header) with wandb's own protobufs.
``run.finish()`` returns before wandb's service has written that log (about one read in four found only its
header); the CLI's ``wandb.teardown()`` after the run waits for it, which these tests rely on.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import pytest
import yaml

from maesil.cli import main
from maesil.wandb_support import ensure_wandb_can_start, flatten_config, wandb_credentials_available
from tests.helpers import REPO_ROOT, tiny_maesil_args

WANDB_YAML = str(REPO_ROOT / "experiments/trainer/wandb.yaml")


def read_wandb_records(path: Path) -> list:
    """Every record of a ``.wandb`` transaction log, as ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    block, pos, pending, chunks = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:  # FULL
            chunks.append(chunk)
        elif kind == 2:  # FIRST
            pending = chunk
        elif kind == 3:  # MIDDLE
            pending += chunk
        elif kind == 4:  # LAST
            chunks.append(pending + chunk)
    return [wandb_internal_pb2.Record.FromString(chunk) for chunk in chunks]


def offline_run(run_dir: Path, index: int = -1) -> tuple[Path, dict, list[dict], list]:
    """The ``index``-th offline run under ``run_dir/wandb``: (its folder, config, history rows, records)."""
    folders = sorted(run_dir.glob("wandb/offline-run-*"))
    assert folders, f"no offline W&B run under {run_dir}"
    folder = folders[index]
    [log_file] = folder.glob("run-*.wandb")
    records = read_wandb_records(log_file)
    config: dict = {}
    history: list[dict] = []
    for record in records:
        kind = record.WhichOneof("record_type")
        # wandb writes a key either as `key` or as `nested_key` parts (["reconstructions", "filenames"]),
        # depending on the code path that logged it.
        if kind == "config":
            config.update({item.key or ".".join(item.nested_key): json.loads(item.value_json)
                           for item in record.config.update})
        elif kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
    return folder, config, history, records


def fit_with_wandb(data_dir: Path, run_dir: Path, *extra: str) -> None:
    main(["fit", *tiny_maesil_args(data_dir, run_dir, max_steps=2), "--config", WANDB_YAML, *extra])


@pytest.fixture
def wandb_home(tmp_path, monkeypatch) -> Path:
    """Keeps wandb's own files (settings, cache, artifacts) in tmp_path; silences its banner.

    wandb reads its environment (WANDB_MODE included) once per process into a settings singleton;
    ``wandb.teardown()`` before and after makes each test's environment count, as in a fresh process.
    """
    import wandb

    wandb.teardown()
    home = tmp_path / "wandb_home"
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(home / name.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield home
    wandb.teardown()


def test_offline_run_holds_resolved_config_metrics_and_picture_and_reruns_in_place(
    tiny_ct_dir, tmp_path, monkeypatch, wandb_home
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    fit_with_wandb(tiny_ct_dir, run_dir, "--model.init_args.mask_ratio", "0.6")

    # save_dir: null in wandb.yaml → the W&B files, config.yaml and pictures sit in the run folder.
    folder, config, history, records = offline_run(run_dir)
    assert config["model.init_args.mask_ratio"] == 0.6
    assert config["model.init_args.masking"] == "dual"
    assert config["model.class_path"] == "maesil.methods.MAESIL"
    assert config["data.init_args.superpatch_size"] == 32
    assert config["data.init_args.data_dir"] == str(tiny_ct_dir)
    assert config["trainer.max_steps"] == 2
    [run_record] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run_record.project == "maesil" and list(run_record.tags) == ["maesil"]
    [exit_record] = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit_code == 0  # the CLI finished the run, so the log is complete

    summary = json.loads((run_dir / "summary.json").read_text())
    [validation] = [row for row in history if "val/psnr_masked" in row]
    for key in ("val/psnr_masked", "val/ssim_masked", "val/psnr", "val/ssim"):
        assert math.isfinite(validation[key])
        assert validation[key] == pytest.approx(summary["metrics"][key])
    assert any("train/loss" in row for row in history)
    [picture_row] = [row for row in history if "reconstructions/filenames" in row]
    [image] = picture_row["reconstructions/filenames"]
    assert (folder / "files" / image).stat().st_size > 1000
    assert image.startswith("media/images/reconstructions_")
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["init_args"]["mask_ratio"] == 0.6
    assert (run_dir / "reconstructions" / "step_0000002.png").is_file()

    # A second run in the same folder: config.yaml is overwritten, and a new W&B run starts (not the old one).
    fit_with_wandb(tiny_ct_dir, run_dir, "--model.init_args.mask_ratio", "0.75")
    assert len(list(run_dir.glob("wandb/offline-run-*"))) == 2
    second_folder, second_config, second_history, _ = offline_run(run_dir, index=-1)
    assert second_folder != folder
    assert second_config["model.init_args.mask_ratio"] == 0.75
    assert any("val/psnr_masked" in row for row in second_history)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["init_args"]["mask_ratio"] == 0.75


def test_without_credentials_the_cli_goes_offline_instead_of_prompting(
    tiny_ct_dir, tmp_path, monkeypatch, wandb_home, caplog
):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc there
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC", "WANDB_BASE_URL"):
        monkeypatch.setenv(name, "x")  # recorded, so that monkeypatch restores the original state
        monkeypatch.delenv(name)
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="maesil"):
        main(["fit", *tiny_maesil_args(tiny_ct_dir, run_dir, max_steps=1), "--config", WANDB_YAML,
              "--trainer.limit_val_batches", "0"])
    assert os.environ["WANDB_MODE"] == "offline"
    assert "offline" in caplog.text and "wandb sync" in caplog.text and str(run_dir) in caplog.text
    _, config, history, _ = offline_run(run_dir)
    assert config["trainer.max_steps"] == 1
    assert any("train/loss" in row for row in history)


def test_disabled_mode_trains_without_writing_a_wandb_run(tiny_ct_dir, tmp_path, monkeypatch, wandb_home):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run_dir = tmp_path / "run"
    fit_with_wandb(tiny_ct_dir, run_dir)
    assert not list(run_dir.glob("wandb/*run-*"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["global_step"] == 2
    assert math.isfinite(summary["metrics"]["val/psnr_masked"])
    assert summary["history"]["val/psnr_masked"][-1][0] == 2
    assert summary["effective_mask_ratio"] == 0.75  # dual 0.5 then 0.5 on a 4³ token grid: 4 of 16 per slice


def test_credentials_are_found_in_env_and_netrc(tmp_path, monkeypatch):
    netrc = tmp_path / "netrc"
    assert not wandb_credentials_available({"NETRC": str(netrc)})  # no file
    netrc.write_text("machine example.org login user password secret\n")
    assert not wandb_credentials_available({"NETRC": str(netrc)})  # another host
    netrc.write_text("machine api.wandb.ai login user password 0123456789abcdef\n")
    assert wandb_credentials_available({"NETRC": str(netrc)})
    assert not wandb_credentials_available({"NETRC": str(netrc), "WANDB_BASE_URL": "https://wandb.mycorp.org"})
    assert wandb_credentials_available({"NETRC": str(tmp_path / "none"), "WANDB_API_KEY": "k" * 40})
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".netrc").write_text("machine api.wandb.ai login user password 0123456789abcdef\n")
    assert wandb_credentials_available({})


def test_a_set_wandb_mode_or_offline_logger_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_API_KEY", "x")
    monkeypatch.delenv("WANDB_API_KEY")
    logger = {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"save_dir": str(tmp_path)}}
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert ensure_wandb_can_start(logger, tmp_path) is None and os.environ["WANDB_MODE"] == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    assert ensure_wandb_can_start({**logger, "init_args": {"offline": True}}, tmp_path) is None
    assert ensure_wandb_can_start({"class_path": "lightning.pytorch.loggers.CSVLogger"}, tmp_path) is None
    assert "WANDB_MODE" not in os.environ
    assert ensure_wandb_can_start([logger], tmp_path) == "offline" and os.environ["WANDB_MODE"] == "offline"


def test_flatten_config_uses_the_dotted_keys_sweeps_set():
    flat = flatten_config({"model": {"init_args": {"mask_ratio": 0.75, "betas": [0.9, 0.95], "opt": {}}}, "seed": 0})
    assert flat == {"model.init_args.mask_ratio": 0.75, "model.init_args.betas": [0.9, 0.95],
                    "model.init_args.opt": {}, "seed": 0}


def test_under_wandb_agent_each_run_gets_its_own_folder(tiny_ct_dir, tmp_path, monkeypatch, wandb_home):
    # `wandb agent` starts every run of a sweep with the same command and WANDB_SWEEP_ID / WANDB_RUN_ID set.
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep42")
    monkeypatch.setenv("WANDB_RUN_ID", "run7abc")
    run_dir = tmp_path / "sweep"
    main(["fit", *tiny_maesil_args(tiny_ct_dir, run_dir, max_steps=1), "--config", WANDB_YAML,
          "--trainer.limit_val_batches", "0"])
    assert (run_dir / "run7abc" / "checkpoints" / "last.ckpt").is_file()
    assert json.loads((run_dir / "run7abc" / "summary.json").read_text())["global_step"] == 1
    assert not (run_dir / "checkpoints").exists()
