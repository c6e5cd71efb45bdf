"""``python -m maesil compare-init``: does pretraining pay? Fine-tune from scratch and from checkpoints, same budget.

On the built-in phantoms' organ labels (or any labelled data given as a manifest), the command fine-tunes
the segmentation network from random initialisation and from each given checkpoint, with the same data,
steps, schedule and seeds, then scores every run on a fixed held-out set over whole volumes (Dice per organ
and HD95 in mm).

The few-label protocol:

* ``--train-count 1 2 4``: each count of labelled training volumes is a separate set of arms. The subsets are
  nested (count ``k`` trains on the first ``k`` training volumes) and every count is scored on the same
  held-out volumes.
* ``--modes finetune frozen``: ``finetune`` trains the whole network (the YAML's schedule: decoder-only
  warm-up, then the encoder); ``frozen`` keeps the encoder fixed and trains the decoder and head only. The
  scratch arm's frozen run is a frozen *random* encoder, the reference every frozen pretrained encoder is
  read against.
* Learning curves: every run scores the held-out volumes every ``--curve-every`` steps. The budget (steps,
  schedule) is fixed before the run and nothing is selected from these scores, so validating on the
  held-out volumes does not leak into the result; the curves only show whether a run has plateaued. The
  final score, the curve's last point, is the scoring of the whole held-out volumes after the last step: the
  validation at that step when ``--curve-every`` divides ``--steps`` (a test pass would score the same
  volumes with the same weights again), else a test pass.
* Paired results: per seed, each pretrained run's Dice minus that of the scratch run of the same network,
  mode, label count and seed; mean ± std over seeds and how many seeds were positive.

Written to ``--out``: ``results.csv`` (one row per run: every test metric, the seconds spent training and
scoring, and how many scorings of the held-out set the run made), ``summary.csv`` (mean ± std per arm),
``paired.csv`` (one row per pretrained arm: seeds, positive seeds, mean and std of the differences),
``paired_seeds.csv`` (one row per pretrained run: its Dice, its scratch reference's and the difference),
``curves.csv`` (one row per run and scored step: the mean Dice and each organ's, which shows when an organ is
found or lost), ``compare_init.png`` (Dice per organ) and ``curves.png``
(mean curve over seeds per arm, one panel per label count). The CSVs are rewritten after every run, seed by
seed, so a stopped command leaves complete pairs behind; every table is printed at the end. Each run's folder
(``runs/<initialisation>_<mode>_n<count>_seed<seed>``) keeps its inputs and result in ``result.json``; a later
call with the same ``--out`` reuses every run whose inputs (YAMLs and manifest by content, checkpoint by path,
size and time, steps, seeds, overrides) are unchanged, so a stopped protocol resumes and more seeds cost only
the new runs (``--force`` runs everything again).

Each checkpoint picks its network from its method's transfer layout: a ViT encoder (MAESIL) is fine-tuned
as UNETR with ``--unetr-config``, a U-Net (PGL, BYOL, S3D) with ``--unet-config``. The encoder's sizes are
read from the checkpoint, so the scratch baseline of each family is the very same network, randomly
initialised. Nothing is tuned per run: the scratch baseline gets exactly the schedule the pretrained runs
get.

    python -m maesil compare-init --checkpoints runs/pgl_demo/checkpoints/last.ckpt \\
        runs/maesil_demo/checkpoints/last.ckpt --train-count 1 --modes finetune frozen --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import csv
import math
import multiprocessing
import os
import statistics
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback

from maesil.phantoms import ORGAN_LABELS
from maesil.tools.overrides import is_override, override_arguments
from maesil.tools.process_lifetime import exit_with_parent

if TYPE_CHECKING:
    from maesil.data.records import SubjectRecord

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_UNET_CONFIG = REPO_ROOT / "experiments/finetune/unet_demo.yaml"
DEFAULT_UNETR_CONFIG = REPO_ROOT / "experiments/finetune/unetr_demo.yaml"
MODES = ("finetune", "frozen")


@dataclass
class Initialisation:
    """One arm of the comparison: a network family and where its weights start."""

    name: str
    family: str  # "unet" or "unetr"
    checkpoint: Path | None
    network_args: dict = field(default_factory=dict)
    preset: str | None = None
    trained_decoder: bool = False  # the checkpoint holds a pretrained U-Net decoder (PGL, S3D)


class Arm(NamedTuple):
    """What a row of the tables describes: an initialisation, fine-tuned or with a frozen encoder, on a label count."""

    initialisation: str
    mode: str
    train_count: int


#: UNETR arguments read from a ViT checkpoint: name -> the older name a checkpoint may store it under.
_VIT_ARGS: dict[str, str | None] = {"token_size": "patch_size", "embed_dim": None, "depth": None,
                                    "num_heads": None, "mlp_ratio": None}
#: ResEnc U-Net arguments read from a U-Net checkpoint.
_UNET_ARGS = ("features", "blocks_per_stage", "strides")


def _encoder_network(method: str | None, state: dict, architecture: dict) -> str:
    """``"vit"``, ``"resenc"`` or ``"none"``: the method's transfer layout says it; for a file that names no
    method (an export of an unknown method, a bare state dict), its architecture or its keys do."""
    from maesil.checkpoints.layouts import method_layouts

    layout = method_layouts().get(method or "")
    if layout is not None:
        return layout.network
    if method is not None:
        return "none"
    kind = architecture.get("type")
    if kind == "ViTEncoder3D" or (kind is None and any(".patch_embed." in key for key in state)):
        return "vit"
    return "resenc" if kind == "ResEncUNet" else "none"


def describe_checkpoint(path: Path) -> Initialisation:
    """The network family and encoder sizes of a pretrained checkpoint (read by the one safe reader).

    A ViT encoder is fine-tuned as UNETR, a U-Net encoder as the ResEnc U-Net, with the sizes of an export's
    ``architecture`` or of the checkpoint's hyperparameters.
    """
    from maesil.checkpoints import has_trained_decoder, identify_method, load_checkpoint_state
    from maesil.checkpoints.layouts import transferable_layouts

    state, metadata = load_checkpoint_state(path)
    method = identify_method(state, metadata)
    architecture = dict(metadata.get("architecture") or {})
    source = architecture or dict(metadata.get("hyper_parameters") or {})
    name = f"{method or path.stem} ({path.parent.parent.name if path.parent.name == 'checkpoints' else path.stem})"
    network = _encoder_network(method, state, architecture)
    if network == "vit":
        args = {}
        for key, old_key in _VIT_ARGS.items():
            value = source.get(key)
            if value is None and old_key is not None:
                value = source.get(old_key)
            if value is not None:
                args[key] = value
        return Initialisation(name, "unetr", path, network_args=args)
    if network == "resenc":
        args = {key: list(source[key]) for key in _UNET_ARGS if source.get(key) is not None}
        return Initialisation(name, "unet", path, network_args=args, preset=source.get("unet_preset"),
                              trained_decoder=has_trained_decoder(state, metadata))
    raise ValueError(f"{path}: a {method or 'unknown'} checkpoint has no encoder compare-init can fine-tune "
                     f"(it handles checkpoints of {', '.join(sorted(transferable_layouts()))})")


def config_preset(config: Path) -> str | None:
    """The ``model.init_args.preset`` a fine-tuning YAML sets, None when it sets none (or is unreadable here; the
    CLI reports a broken YAML when the run starts)."""
    import yaml

    try:
        document = yaml.safe_load(Path(config).read_text()) or {}
        preset = ((document.get("model") or {}).get("init_args") or {}).get("preset")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return preset if isinstance(preset, str) else None


def without_config_preset(arm: Initialisation, config: Path) -> Initialisation:
    """``arm`` with its preset dropped when the fine-tuning YAML sets the same one: the run is the same, so its
    recorded inputs are too, and a scratch run made without a checkpoint is reused by a call with one."""
    if arm.preset is not None and arm.preset == config_preset(config):
        return replace(arm, preset=None)
    return arm


# ------------------------------------------------------------------------------------------------ data
def write_phantom_manifest(folder: Path, train_count: int, test_count: int, seed: int) -> Path:
    """Writes ``train_count + test_count`` phantoms and a manifest with a fixed train/test split."""
    from maesil.phantoms import default_workers, write_phantoms

    paths = write_phantoms(folder, train_count + test_count, seed=seed,
                           workers=default_workers(train_count + test_count))
    manifest = folder / "compare_init.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["subject_id", "image", "label", "split"])
        for index, image in enumerate(paths):
            split = "train" if index < train_count else "test"
            # Paths relative to the manifest's folder, as manifests resolve them.
            writer.writerow([image.name.split(".")[0], f"images/{image.name}", f"labels/{image.name}", split])
    return manifest


@dataclass
class LabelledSplit:
    """A manifest's subjects as the protocol uses them: training pool, held-out set, and what it leaves out."""

    manifest: Path
    train: list[SubjectRecord]  # in the order maesil lists subjects (by subject id)
    test: list[SubjectRecord]
    unused: list[SubjectRecord]  # subjects marked ``val``: neither trained on nor scored


def read_labelled_split(manifest: Path) -> LabelledSplit:
    """The training pool (subjects not marked ``val`` or ``test``) and the held-out ``test`` subjects of a manifest.

    Raises:
        ValueError: the manifest has problems (every one listed), no test subject or no training subject.
    """
    from maesil.data.manifest import read_manifest
    from maesil.data.records import DataError

    records, problems = read_manifest(manifest)
    errors = [problem for problem in problems if problem.severity == "error"]
    if errors:
        raise DataError(errors, header=f"{manifest}: {len(errors)} problem(s) in the manifest")
    split = LabelledSplit(manifest, [r for r in records if r.split not in ("val", "test")],
                          [r for r in records if r.split == "test"], [r for r in records if r.split == "val"])
    if not split.test:
        raise ValueError(f"{manifest}: no subject is marked split=test; compare-init scores a held-out test set")
    if not split.train:
        raise ValueError(f"{manifest}: no training subject (every subject is marked val or test)")
    return split


def write_count_manifest(split: LabelledSplit, train_count: int, path: Path) -> Path:
    """A manifest that trains on the first ``train_count`` training subjects and validates on the test subjects.

    The held-out subjects are marked ``val``, so that the run scores them during training (the learning curve);
    with no ``test`` subject left, a test pass scores the same volumes (``VolumeDataModule.test_dataloader``).
    Paths are absolute, so the manifest can live anywhere.
    """
    if train_count > len(split.train):
        raise ValueError(f"--train-count {train_count} exceeds the {len(split.train)} training subject(s) of "
                         f"{split.manifest}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["subject_id", "image", "label", "split", "series_uid"])
        for records, name in ((split.train[:train_count], "train"), (split.test, "val")):
            for record in records:
                writer.writerow([record.subject_id, Path(record.image).resolve(),
                                 Path(record.label).resolve() if record.label else "", name, record.series_uid or ""])
    return path


# ------------------------------------------------------------------------------------------------ runs
def slug(name: str) -> str:
    """A folder name for an initialisation's name: ``MAESIL (maesil_demo)`` -> ``maesil__maesil_demo``."""
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


class LearningCurve(Callback):
    """Records the held-out Dice (``val/dice``) at the step of every validation with the Dice of each organ
    (``val/dice_<organ>``), the last validation's scores (``val/...``) and the seconds spent validating."""

    def __init__(self) -> None:
        self.points: list[tuple[int, float]] = []
        self.organ_points: list[dict[str, float]] = []  # per point: {"dice_liver": ..., ...}
        self.last_scores: dict[str, float] = {}
        self.validation_seconds = 0.0
        self._started = 0.0

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._started = time.perf_counter()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.validation_seconds += time.perf_counter() - self._started
        dice = trainer.callback_metrics.get("val/dice")
        if not trainer.sanity_checking and dice is not None:
            self.points.append((int(trainer.global_step), float(dice)))
            self.organ_points.append(organ_dice(trainer.callback_metrics, "val/"))
            self.last_scores = {key: float(value) for key, value in trainer.callback_metrics.items()
                                if key.startswith("val/")}


def organ_dice(metrics: dict, prefix: str) -> dict[str, float]:
    """The per-organ Dice among ``metrics`` (``<prefix>dice_<organ>``), keyed ``dice_<organ>``."""
    return {key[len(prefix):]: float(value) for key, value in metrics.items()
            if key.startswith(f"{prefix}dice_")}


@dataclass
class RunResult:
    """One fine-tuning run: its final scores (``test/...``), its learning curve (ending with the final score)
    with each organ's Dice at every point (``organ_curve``, empty for a run recorded without it) and where its
    time went. ``reused``: read from the ``result.json`` of an earlier identical run."""

    metrics: dict[str, float]
    curve: list[tuple[int, float]]
    train_seconds: float  # fit without its validations (setup included)
    scoring_seconds: float  # every scoring of the held-out volumes: the curve's and the final one
    scorings: int
    reused: bool = False
    organ_curve: list[dict[str, float]] = field(default_factory=list)


#: File in a run's folder with its inputs and its :class:`RunResult`, written when the run has finished.
RESULT_FILE = "result.json"


def _file_fingerprint(path: Path | None) -> str | None:
    """The path, size and modification time of a file: a checkpoint written again by a new pretraining run
    is a different input."""
    if path is None:
        return None
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def _text_digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def yaml_network_sizes(family: str, config: Path) -> dict:
    """The network sizes the fine-tuning YAML's preset sets (``{}`` when it names none or an unknown one)."""
    from maesil.models.unet import UNET_PRESETS
    from maesil.models.unetr import UNETR_PRESETS

    presets = {"unet": UNET_PRESETS, "unetr": UNETR_PRESETS}.get(family, {})
    return dict(presets.get(config_preset(config) or "", {}))


def _same_value(a: object, b: object) -> bool:
    """Equal, with tuples and lists alike (a preset stores tuples, a checkpoint's JSON lists)."""
    def plain(value: object) -> object:
        return list(value) if isinstance(value, tuple) else value

    return plain(a) == plain(b)


def beyond_yaml(network_args: dict, yaml_sizes: dict) -> dict:
    """``network_args`` without the entries the YAML's preset already sets to the same value: an exported
    encoder that states its sizes and a checkpoint that names the preset describe the same network, so their
    scratch runs are the same run."""
    return {key: value for key, value in network_args.items()
            if key not in yaml_sizes or not _same_value(yaml_sizes[key], value)}


def run_inputs(arm: Initialisation, config: Path, manifest: Path, seed: int, steps: int, overrides: Sequence[str],
               mode: str, curve_every: int | None, extra_configs: Sequence[Path]) -> dict:
    """Everything a fine-tuning run's result depends on: the YAMLs and the manifest by content, the checkpoint
    by path, size and time, the network sizes beyond the YAML's own, and the protocol's numbers. A finished run
    with equal inputs is not run again. A checkpoint with a pretrained decoder also records that fine-tuning
    leaves it out (``transfer_decoder`` false unless an override sets it): runs recorded before the decoder was
    left out by default loaded it, and are not reused."""
    inputs = {"initialisation": arm.name, "checkpoint": _file_fingerprint(arm.checkpoint),
              "network_args": beyond_yaml(arm.network_args, yaml_network_sizes(arm.family, config)),
              "preset": arm.preset,
              "configs": [_text_digest(path) for path in (config, *extra_configs)],
              "manifest": _text_digest(manifest), "seed": seed, "steps": steps, "curve_every": curve_every or steps,
              "mode": mode, "overrides": list(overrides)}
    if arm.trained_decoder:
        inputs["pretrained_decoder"] = "loaded only if transfer_decoder is set"
    return inputs


def finished_run(run_dir: Path, inputs: dict, yaml_sizes: dict | None = None) -> RunResult | None:
    """The :class:`RunResult` stored in ``run_dir`` by a finished run with the same ``inputs``, else None.

    ``yaml_sizes`` (:func:`yaml_network_sizes`) also drops the stored sizes the YAML sets, so a run recorded
    with them spelt out is found by a call that leaves them to the YAML."""
    import json

    path = run_dir / RESULT_FILE
    try:
        stored = json.loads(path.read_text())
        recorded = dict(stored["inputs"])
        recorded["network_args"] = beyond_yaml(dict(recorded.get("network_args") or {}), yaml_sizes or {})
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if recorded != json.loads(json.dumps(inputs)):
        return None
    return RunResult(stored["metrics"], [tuple(point) for point in stored["curve"]], stored["train_seconds"],
                     stored["scoring_seconds"], stored["scorings"], reused=True,
                     organ_curve=list(stored.get("organ_curve") or []))


def cli_arguments(arm: Initialisation, config: Path, manifest: Path, seed: int, steps: int, run_dir: Path,
                  overrides: Sequence[str] = (), cache_dir: Path | None = None, mode: str = "finetune",
                  curve_every: int | None = None, extra_configs: Sequence[Path] = ()) -> list[str]:
    """The ``fit`` command line of one fine-tuning run (:func:`fine_tune_and_test`)."""
    import json

    args = [
        "--config", str(config),
        *[word for extra in extra_configs for word in ("--config", str(extra))],
        "--seed_everything", str(seed),
        "--data.init_args.data_dir", str(manifest),
        "--data.init_args.val_fraction", "0",
        "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", str(curve_every or steps),
        "--trainer.default_root_dir", str(run_dir),
        "--model.init_args.pretrained", str(arm.checkpoint) if arm.checkpoint else "null",
        "--model.init_args.freeze_encoder", "true" if mode == "frozen" else "false",
    ]  # fmt: skip
    if cache_dir is not None:
        args += ["--data.init_args.cache_dir", str(cache_dir)]
    if arm.preset:
        args += ["--model.init_args.preset", arm.preset]
    if arm.network_args:
        args += ["--model.init_args.network_args", json.dumps(arm.network_args)]
    args += override_arguments(overrides)
    return args


def prepare_run_cache(arguments: dict) -> None:
    """Prepares the cache a fine-tuning run reads (``arguments`` as for :func:`fine_tune_and_test`), as the run
    itself would at its start, so that runs side by side find it written."""
    from maesil.lightning_cli import MaesilCLI

    run_dir = arguments["out_dir"] / "runs" / arguments["run_name"]
    args = cli_arguments(arguments["arm"], arguments["config"], arguments["manifest"], arguments["seed"],
                         arguments["steps"], run_dir, arguments["overrides"], arguments["cache_dir"],
                         arguments["mode"], arguments["curve_every"], arguments["extra_configs"])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        cli = MaesilCLI(args=args, run=False)
    cli.datamodule.prepare_data()


def fine_tune_and_test(arm: Initialisation, config: Path, manifest: Path, seed: int, steps: int,
                       out_dir: Path, overrides: Sequence[str] = (), cache_dir: Path | None = None,
                       mode: str = "finetune", curve_every: int | None = None, run_name: str | None = None,
                       extra_configs: Sequence[Path] = (), reuse: bool = True) -> RunResult:
    """One fine-tuning run through the same CLI users run, scored on the held-out volumes.

    The run validates on the held-out volumes every ``curve_every`` steps (default: after the last step only).
    The final scores are those of the validation after the last step, renamed ``test/...``; when no validation
    fell on the last step, a test pass scores the same volumes. ``mode="frozen"`` keeps the encoder fixed
    (``freeze_encoder``). ``extra_configs`` are composed after the family's YAML (e.g.
    ``experiments/trainer/gpu_bf16.yaml``), ``overrides`` after them. With ``cache_dir`` every run reads
    the volumes from one prepared cache (written by the first run), so the runs do not each decode and
    resample the same volumes again. A finished run leaves its inputs and result in ``result.json``; with
    ``reuse`` a run whose folder holds one with the same inputs (:func:`run_inputs`) is not run again, so a
    stopped protocol resumes and a call with more seeds runs only the new ones.
    """
    import json

    from maesil.files import atomic_write_bytes
    from maesil.lightning_cli import MaesilCLI

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    run_dir = out_dir / "runs" / (run_name or f"{slug(arm.name)}_seed{seed}")
    inputs = run_inputs(arm, config, manifest, seed, steps, overrides, mode, curve_every, extra_configs)
    if reuse and (done := finished_run(run_dir, inputs, yaml_network_sizes(arm.family, config))) is not None:
        return done
    args = cli_arguments(arm, config, manifest, seed, steps, run_dir, overrides, cache_dir, mode, curve_every,
                         extra_configs)
    started = time.perf_counter()
    with warnings.catch_warnings():  # the arguments come from here, not from sys.argv: nothing to warn about
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        cli = MaesilCLI(args=args, run=False)
    curve = LearningCurve()
    cli.trainer.callbacks.append(curve)
    with warnings.catch_warnings():  # a frozen encoder is in eval mode on purpose
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    fitted = time.perf_counter()
    points, organ_points = list(curve.points), list(curve.organ_points)
    if points and points[-1][0] == cli.trainer.global_step:
        metrics = {f"test/{key[len('val/'):]}": value for key, value in curve.last_scores.items()}
    else:
        [scores] = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
        metrics = {key: float(value) for key, value in scores.items()}
        points.append((int(cli.trainer.global_step), metrics.get("test/dice", math.nan)))
        organ_points.append(organ_dice(metrics, "test/"))
    tested = time.perf_counter() - fitted
    result = RunResult(metrics, points, train_seconds=fitted - started - curve.validation_seconds,
                       scoring_seconds=curve.validation_seconds + tested, scorings=len(points),
                       organ_curve=organ_points)
    record = {"inputs": inputs, "metrics": result.metrics, "curve": result.curve,
              "organ_curve": result.organ_curve, "train_seconds": result.train_seconds,
              "scoring_seconds": result.scoring_seconds, "scorings": result.scorings}
    atomic_write_bytes(run_dir / RESULT_FILE, (json.dumps(record, indent=1) + "\n").encode())
    return result


def _start_worker(threads: int) -> None:
    """Pool initialiser: this worker's share of the cores as torch threads, and its end with the command's (a
    stopped ``compare-init`` leaves no run training on)."""
    import torch

    exit_with_parent()
    torch.set_num_threads(threads)


def _fine_tune_logged(log: Path, arguments: dict) -> RunResult:
    """:func:`fine_tune_and_test` in a pool worker, its output in ``log`` (runs side by side would interleave)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "w") as handle:
        # At the descriptors, not only sys.stdout: logging handlers keep the streams they were made with.
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
        try:
            return fine_tune_and_test(**arguments)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def worker_threads(jobs: int, environ: Mapping[str, str] = os.environ, cores: int | None = None) -> int:
    """Torch threads per run with ``jobs`` runs side by side: an equal share of the command's threads (its
    ``OMP_NUM_THREADS`` if set, else every core); torch's default of every core in every run would
    oversubscribe the machine ``jobs`` times over."""
    budget = environ.get("OMP_NUM_THREADS", "")
    threads = int(budget) if budget.isdigit() and int(budget) > 0 else (cores or os.cpu_count() or 1)
    return max(1, threads // max(1, jobs))


def run_side_by_side(planned: Sequence[tuple[int, dict]], jobs: int, log_name: str = "fit.log"):
    """Yields each planned run's :class:`RunResult` in plan order, running up to ``jobs`` at a time in spawned
    processes. ``planned`` holds (label count, :func:`fine_tune_and_test` arguments). Each label count's volumes
    are added to the shared cache here, before its runs start, so that no two runs write it at once."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_start_worker,
                             initargs=(worker_threads(jobs),)) as pool:
        futures: list[Future] = []
        primed: set[int] = set()
        for count, arguments in planned:
            if count not in primed and arguments.get("cache_dir") is not None:
                primed.add(count)
                prepare_run_cache(arguments)
            log = arguments["out_dir"] / "runs" / arguments["run_name"] / log_name
            futures.append(pool.submit(_fine_tune_logged, log, arguments))
        for future in futures:
            yield future.result()


# ------------------------------------------------------------------------------------------------ tables
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def _mean_std_cell(values: Sequence[float], digits: int = 3) -> str:
    mean, std = mean_std(values)
    return "n/a" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def summary_table(results: dict[Arm, list[dict[str, float]]], class_names: Sequence[str]) -> list[list[str]]:
    """Rows: one per arm; columns: overall Dice, HD95 and Dice per organ, as mean ± std over seeds."""
    header = ["initialisation", "mode", "labelled", "runs", "Dice", "HD95 (mm)",
              *[f"Dice {name}" for name in class_names]]
    rows = [header]
    for arm, runs in results.items():
        def cell(key: str, digits: int = 3) -> str:
            return _mean_std_cell([run.get(key, math.nan) for run in runs], digits)

        rows.append([arm.initialisation, arm.mode, str(arm.train_count), str(len(runs)), cell("test/dice"),
                     cell("test/hd95", 1), *[cell(f"test/dice_{c}") for c in class_names]])
    return rows


#: Columns of ``paired.csv``: one row per pretrained arm against its scratch reference.
PAIRED_FIELDS = ("family", "mode", "train_count", "initialisation", "reference", "seeds", "positive_seeds",
                 "mean_difference", "std_difference")
#: Columns of ``paired_seeds.csv``: one row per pretrained run and the scratch run it is paired with.
PAIRED_SEED_FIELDS = ("family", "mode", "train_count", "initialisation", "reference", "seed", "dice",
                      "reference_dice", "difference")


def paired_differences(rows: Sequence[dict], key: str = "test/dice") -> list[dict]:
    """Per seed, each pretrained run's ``key`` minus that of the scratch run (the reference) of the same family,
    mode, label count and seed. ``rows`` are results rows (``initialisation``, ``family``, ``checkpoint`` —
    empty for scratch —, ``mode``, ``train_count``, ``seed`` and ``key``); the result has
    :data:`PAIRED_SEED_FIELDS`.

    Raises:
        ValueError: a pretrained run has no scratch run to be paired with.
    """
    def where(row: dict) -> tuple:
        return row["family"], row["mode"], int(row["train_count"]), int(row["seed"])

    references = {where(row): row for row in rows if not row["checkpoint"]}
    paired = []
    for row in rows:
        if not row["checkpoint"]:
            continue
        reference = references.get(where(row))
        if reference is None:
            raise ValueError(f"{row['initialisation']} ({row['mode']}, {row['train_count']} labelled, seed "
                             f"{row['seed']}) has no scratch {row['family']} run to be paired with")
        value, reference_value = float(row[key]), float(reference[key])
        paired.append({"family": row["family"], "mode": row["mode"], "train_count": int(row["train_count"]),
                       "initialisation": row["initialisation"], "reference": reference["initialisation"],
                       "seed": int(row["seed"]), "dice": value, "reference_dice": reference_value,
                       "difference": value - reference_value})
    return paired


def paired_summary(paired: Sequence[dict]) -> list[dict]:
    """One row per pretrained arm (:data:`PAIRED_FIELDS`): the mean and std over seeds of its differences to
    the scratch reference (NaN differences left out), how many seeds it has and how many were positive."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for row in paired:
        group = (row["family"], row["mode"], row["train_count"], row["initialisation"], row["reference"])
        groups[group].append(row["difference"])
    summary = []
    for (family, mode, count, name, reference), differences in groups.items():
        mean, std = mean_std(differences)
        summary.append({"family": family, "mode": mode, "train_count": count, "initialisation": name,
                        "reference": reference, "seeds": len(differences),
                        "positive_seeds": sum(d > 0 for d in differences if not math.isnan(d)),
                        "mean_difference": mean, "std_difference": std})
    return summary


def paired_table(summary: Sequence[dict]) -> list[list[str]]:
    """The rows of :func:`paired_summary` for print: difference as mean ± std over seeds, positive seeds."""
    rows = [["initialisation", "minus", "mode", "labelled", "seeds", "Δ Dice", "positive"]]
    for row in summary:
        mean, std = row["mean_difference"], row["std_difference"]
        reference = f"{row['reference']}, frozen random encoder" if row["mode"] == "frozen" else row["reference"]
        rows.append([row["initialisation"], reference, row["mode"], str(row["train_count"]), str(row["seeds"]),
                     "n/a" if math.isnan(mean) else f"{mean:+.3f} ± {std:.3f}",
                     f"{row['positive_seeds']}/{row['seeds']}"])
    return rows


def curve_table(curves: dict[Arm, list[list[tuple[int, float]]]]) -> list[list[str]]:
    """Rows: one per arm; columns: the held-out Dice at each scored step, mean over seeds."""
    steps = sorted({step for runs in curves.values() for run in runs for step, _ in run})
    rows = [["initialisation", "mode", "labelled", *[f"step {step}" for step in steps]]]
    for arm, runs in curves.items():
        by_step = defaultdict(list)
        for run in runs:
            for step, dice in run:
                by_step[step].append(dice)
        cells = []
        for step in steps:
            mean, _ = mean_std(by_step.get(step, []))
            cells.append("" if math.isnan(mean) else f"{mean:.3f}")
        rows.append([arm.initialisation, arm.mode, str(arm.train_count), *cells])
    return rows


def format_rows(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def write_csv(path: Path, rows: Sequence[dict], fieldnames: Sequence[str]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fieldnames))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_tables(out: Path, rows: Sequence[dict], curve_rows: Sequence[dict],
                 results: dict[Arm, list[dict[str, float]]], class_names: Sequence[str]
                 ) -> tuple[list[list[str]], list[dict]]:
    """Writes ``results.csv``, ``summary.csv``, ``paired_seeds.csv``, ``paired.csv`` and ``curves.csv`` from the
    runs so far; returns the summary table and the paired rows."""
    identity = ["initialisation", "family", "checkpoint", "mode", "train_count", "seed"]
    metric_keys = sorted({key for row in rows for key in row if key.startswith("test/")})
    write_csv(out / "results.csv", rows, [*identity, *metric_keys, "train_seconds", "scoring_seconds", "scorings"])
    table = summary_table(results, class_names)
    with open(out / "summary.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(table)
    paired = paired_differences(rows)
    write_csv(out / "paired_seeds.csv", paired, PAIRED_SEED_FIELDS)
    pairs = paired_summary(paired)
    write_csv(out / "paired.csv", pairs, PAIRED_FIELDS)
    organs = [f"dice_{name}" for name in class_names]
    organs += sorted({key for row in curve_rows for key in row if key.startswith("dice_")} - set(organs))
    write_csv(out / "curves.csv", curve_rows, ["initialisation", "mode", "train_count", "seed", "step", "dice",
                                               *organs])
    return table, pairs


# ------------------------------------------------------------------------------------------------ figures
def _arm_label(arm: Arm) -> str:
    return f"{arm.initialisation}, {arm.mode}"


def plot(results: dict[Arm, list[dict[str, float]]], class_names: Sequence[str], path: Path) -> Path:
    """Grouped bars of mean Dice per organ (and overall) with the std over seeds as error bars; one panel per
    label count."""
    import numpy as np

    from maesil.evaluation.figures import plt, save_figure

    counts = sorted({arm.train_count for arm in results})
    labels = ["overall", *class_names]
    keys = ["test/dice", *[f"test/dice_{c}" for c in class_names]]
    arms_per_panel = max(sum(arm.train_count == count for arm in results) for count in counts)
    width_inches = min(16.0, max(8.0, 0.3 * len(labels) * arms_per_panel))
    figure, axes = plt.subplots(len(counts), 1, figsize=(width_inches, 4.5 * len(counts)), squeeze=False)
    width = 0.8 / arms_per_panel
    for axis, count in zip(axes[:, 0], counts):
        panel = [(arm, runs) for arm, runs in results.items() if arm.train_count == count]
        for index, (arm, runs) in enumerate(panel):
            stats = [mean_std([run.get(key, math.nan) for run in runs]) for key in keys]
            means = [0.0 if math.isnan(m) else m for m, _ in stats]
            stds = [0.0 if math.isnan(s) else s for _, s in stats]
            axis.bar(np.arange(len(labels)) + index * width, means, width, yerr=stds, capsize=2,
                     label=_arm_label(arm), hatch="//" if arm.mode == "frozen" else None)
        axis.set_xticks(np.arange(len(labels)) + 0.4 - width / 2)
        axis.set_xticklabels(labels, rotation=30, ha="right")
        axis.set_ylabel("Dice (held-out volumes)")
        axis.set_ylim(0, 1)
        axis.legend(fontsize=7)
        axis.set_title(f"{count} labelled volume{'s' if count != 1 else ''}: scratch vs. pretrained "
                       "(mean ± std over seeds)")
    figure.tight_layout()
    return save_figure(figure, path)


def plot_curves(curves: dict[Arm, list[list[tuple[int, float]]]], path: Path) -> Path:
    """Held-out Dice against step, mean over seeds (band: ± std) per arm; one panel per label count; frozen
    encoders dashed."""
    from maesil.evaluation.figures import plt, save_figure

    counts = sorted({arm.train_count for arm in curves})
    names = list(dict.fromkeys(arm.initialisation for arm in curves))
    colours = {name: f"C{index % 10}" for index, name in enumerate(names)}
    figure, axes = plt.subplots(1, len(counts), figsize=(5.5 * len(counts), 4.2), squeeze=False, sharey=True)
    for axis, count in zip(axes[0], counts):
        for arm, runs in curves.items():
            if arm.train_count != count:
                continue
            by_step = defaultdict(list)
            for run in runs:
                for step, dice in run:
                    by_step[step].append(dice)
            steps = sorted(by_step)
            stats = [mean_std(by_step[step]) for step in steps]
            means = [m for m, _ in stats]
            axis.plot(steps, means, marker="o", markersize=3, color=colours[arm.initialisation],
                      linestyle="--" if arm.mode == "frozen" else "-", label=_arm_label(arm))
            axis.fill_between(steps, [m - s for m, s in stats], [m + s for m, s in stats],
                              color=colours[arm.initialisation], alpha=0.12)
        axis.set_title(f"{count} labelled volume{'s' if count != 1 else ''}")
        axis.set_xlabel("fine-tuning step")
        axis.grid(alpha=0.3)
    axes[0, 0].set_ylabel("Dice (held-out volumes)")
    axes[0, -1].legend(fontsize=7)
    figure.tight_layout()
    return save_figure(figure, path)


# ------------------------------------------------------------------------------------------------ command
def compare_init_command(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m maesil compare-init",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="*", type=Path, default=[],
                        help="pretrained checkpoints (.ckpt or exported .safetensors) to compare with scratch")
    parser.add_argument("--train-count", type=int, nargs="+", default=[4],
                        help="labelled training volumes; several counts are separate arms on nested subsets "
                        "(default 4)")
    parser.add_argument("--test-count", type=int, default=2, help="held-out phantoms (default 2)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["finetune"],
                        help="finetune: the whole network learns; frozen: the encoder stays fixed, decoder and "
                        "head learn (default finetune)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fine-tuning seeds (default 0 1 2)")
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps per run (default 300)")
    parser.add_argument("--curve-every", type=int, default=None,
                        help="score the held-out volumes every N steps for the learning curves (default: "
                        "steps // 5)")
    parser.add_argument("--data", type=Path, default=None,
                        help="a CSV/JSON manifest with train and test splits instead of the phantoms; count k "
                        "trains on its first k training subjects (by subject id)")
    parser.add_argument("--phantom-seed", type=int, default=200, help="seed of the first phantom (default 200)")
    parser.add_argument("--unet-config", type=Path, default=DEFAULT_UNET_CONFIG)
    parser.add_argument("--unetr-config", type=Path, default=DEFAULT_UNETR_CONFIG)
    parser.add_argument("--families", nargs="*", choices=["unet", "unetr"], default=None,
                        help="scratch baselines to run without a checkpoint of that family (default: those of "
                        "the checkpoints, else unet)")
    parser.add_argument("--trainer-config", nargs="*", type=Path, default=[], metavar="YAML",
                        help="YAML files composed after the family's config in every run, e.g. "
                        "experiments/trainer/gpu_bf16.yaml")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for every run, e.g. data.init_args.num_workers=0")
    parser.add_argument("--force", action="store_true",
                        help="run every fine-tuning again (default: a run whose folder in --out holds the result of "
                             "a finished run with the same inputs is reused)")
    parser.add_argument("--no-cache", action="store_true",
                        help="read the volumes from their files in every run instead of one prepared cache in "
                        "OUT/cache")
    parser.add_argument("--jobs", type=int, default=1,
                        help="fine-tuning runs at a time (default 1; more where one run leaves the machine idle, "
                        "e.g. a GPU): each in its own process with its share of the cores, its output in its "
                        "folder's fit.log")
    parser.add_argument("--out", type=Path, default=Path("runs/compare_init"))
    args = parser.parse_args(list(argv))
    counts = sorted(set(args.train_count))
    if min(counts) < 1 or args.test_count < 1 or args.steps < 1 or args.jobs < 1:
        parser.error("--train-count, --test-count, --steps and --jobs must be >= 1")
    curve_every = args.curve_every if args.curve_every is not None else max(1, args.steps // 5)
    if not 1 <= curve_every <= args.steps:
        parser.error(f"--curve-every must be in 1..--steps ({args.steps}), got {curve_every}")
    if not all(map(is_override, args.set)):
        parser.error(f"--set takes KEY=VALUE items, got {args.set}")
    missing = [str(path) for path in args.trainer_config if not path.is_file()]
    if missing:
        parser.error(f"--trainer-config: no such file: {', '.join(missing)}")
    modes = list(dict.fromkeys(args.modes))

    try:
        arms = [describe_checkpoint(path) for path in args.checkpoints]
        source = args.data or write_phantom_manifest(args.out / "phantoms", max(counts), args.test_count,
                                                     args.phantom_seed)
        split = read_labelled_split(source)
        manifests = {count: write_count_manifest(split, count, args.out / "manifests" / f"train{count}.csv")
                     for count in counts}
    except (OSError, ValueError) as error:
        print(f"compare-init: {error}", file=sys.stderr)
        return 1
    if split.unused:
        print(f"compare-init: {len(split.unused)} subject(s) of {source} marked val are not used (curves and "
              f"scores are on the {len(split.test)} test subjects): {', '.join(r.subject_id for r in split.unused)}",
              file=sys.stderr)
    families = args.families or sorted({arm.family for arm in arms}) or ["unet"]
    scratch = []
    for family in families:
        like = next((arm for arm in arms if arm.family == family), None)
        scratch.append(Initialisation(f"scratch ({family})", family, None,
                                      network_args=dict(like.network_args) if like else {},
                                      preset=like.preset if like else None))
    configs = {"unet": args.unet_config, "unetr": args.unetr_config}
    arms = [without_config_preset(arm, configs[arm.family]) for arm in scratch + arms]
    class_names = [name for label, name in sorted(ORGAN_LABELS.items()) if label > 0]
    results: dict[Arm, list[dict[str, float]]] = defaultdict(list)
    curves: dict[Arm, list[list[tuple[int, float]]]] = defaultdict(list)
    rows, curve_rows = [], []
    total = len(counts) * len(modes) * len(arms) * len(args.seeds)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    # Ascending counts: each count's manifest adds subjects to the shared cache, none is prepared twice. Within
    # a count, seed by seed: after each seed every arm has a run to be paired with, and the tables, rewritten
    # after every run, already hold complete pairs if the command is stopped.
    planned = [(count, seed, mode, init) for count in counts for seed in args.seeds for mode in modes
               for init in arms]
    arguments = [dict(arm=init, config=configs[init.family], manifest=manifests[count], seed=seed, steps=args.steps,
                      out_dir=args.out, overrides=args.set,
                      cache_dir=None if args.no_cache else args.out / "cache", mode=mode, curve_every=curve_every,
                      run_name=f"{slug(init.name)}_{mode}_n{count}_seed{seed}", extra_configs=args.trainer_config,
                      reuse=not args.force)
                 for count, seed, mode, init in planned]
    if args.jobs > 1:
        print(f"== {total} runs, {args.jobs} at a time; each run's output in its folder's fit.log", flush=True)
        finished = run_side_by_side([(item[0], kwargs) for item, kwargs in zip(planned, arguments)], args.jobs)
    else:
        finished = (fine_tune_and_test(**kwargs) for kwargs in arguments)
    for index, (count, seed, mode, init) in enumerate(planned):
        arm = Arm(init.name, mode, count)
        heading = f"{init.name}, {mode}, {count} labelled, seed {seed}: {args.steps} steps"
        if args.jobs == 1:  # before the run, which prints its own progress below it
            print(f"== [{index + 1}/{total}] {heading}", flush=True)
        run = next(finished)
        prefix = "   " if args.jobs == 1 else f"== [{index + 1}/{total}] {heading}: "
        print(f"{prefix}Dice {run.metrics.get('test/dice', math.nan):.3f}; {run.train_seconds:.0f} s training "
              f"({run.train_seconds / args.steps:.2f} s/step, setup included), {run.scorings} scorings "
              f"of the held-out set in {run.scoring_seconds:.0f} s"
              + (" (finished earlier with the same inputs: reused)" if run.reused else ""), flush=True)
        results[arm].append(run.metrics)
        curves[arm].append(run.curve)
        rows.append({"initialisation": init.name, "family": init.family,
                     "checkpoint": str(init.checkpoint or ""), "mode": mode, "train_count": count,
                     "seed": seed, **run.metrics, "train_seconds": round(run.train_seconds, 2),
                     "scoring_seconds": round(run.scoring_seconds, 2), "scorings": run.scorings})
        organ_curve = run.organ_curve or [{}] * len(run.curve)  # empty for runs recorded before it was kept
        curve_rows += [{"initialisation": init.name, "mode": mode, "train_count": count, "seed": seed,
                        "step": step, "dice": dice, **organs}
                       for (step, dice), organs in zip(run.curve, organ_curve)]
        table, pairs = write_tables(args.out, rows, curve_rows, results, class_names)
    elapsed = time.perf_counter() - started

    picture = plot(results, class_names, args.out / "compare_init.png")
    curve_picture = plot_curves(curves, args.out / "curves.png")

    print(f"\n{len(args.seeds)} seeds × {args.steps} steps (held-out Dice every {curve_every}), labelled training "
          f"volumes {', '.join(map(str, counts))}, {len(split.test)} held-out volumes, modes {', '.join(modes)}; "
          f"{total} runs in {elapsed / 60:.1f} min\n")
    print(format_rows(table))
    print("\nHeld-out Dice during training (mean over seeds):\n")
    print(format_rows(curve_table(curves)))
    if pairs:
        print("\nPaired: per seed, pretrained minus its scratch baseline (same network, mode, labels, seed):\n")
        print(format_rows(paired_table(pairs)))
    print(f"\nresults: {(args.out / 'results.csv').resolve()}\npaired:  {(args.out / 'paired.csv').resolve()}\n"
          f"curves:  {(args.out / 'curves.csv').resolve()}\nplots:   {picture.resolve()}, {curve_picture.resolve()}")
    return 0
