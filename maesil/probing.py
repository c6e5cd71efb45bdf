"""Judging a model while it pretrains: a light segmentation probe on its frozen encoder features.

A pretext metric (reconstruction PSNR, a BYOL loss) says how well a model solves its own task, not whether its
features are any good for segmentation. :class:`LinearProbe` answers the second question during the run, for
every pretraining method: every ``every_n_steps`` optimizer steps (and, by default, before the first step and
after the last one) it

1. takes a small labelled set, fixed for the run: ``train_volumes`` + ``test_volumes`` volumes preprocessed
   exactly as the training data (the DataModule's modality, spacing, HU window and foreground crop, its
   superpatch size), with ``superpatches_per_volume`` label-centred superpatches each at deterministic places;
2. computes the method's frozen encoder features of those superpatches (``probe_features``: eval mode, no
   gradient, the run's precision);
3. fits a linear probe on the probe-train superpatches and scores it on the probe-test ones
   (:func:`maesil.evaluation.probe.linear_probe`, on one CPU thread: :func:`one_cpu_thread`);
4. logs ``probe/dice`` (mean foreground Dice), ``probe/dice_<class>`` and ``probe/seconds`` to the run's loggers
   at that step and into ``trainer.callback_metrics`` (so ``summary.json`` and ``sweep-local`` see them), saves a
   picture (image, reference labels, probe prediction) under ``<run folder>/probe/``, and prints one line with
   the Dice and what the probe cost, also as a share of the training time since the previous probe.

The default labelled set is the built-in phantoms, written once to ``phantom_dir`` from ``phantom_seed`` (300:
none of the training phantoms, seeds 0-7, nor the held-out ones of the demos). ``data`` names any labelled
folder or manifest instead.

The cost is bounded: a probe that takes longer than ``max_seconds`` halves the superpatches per volume of the
next probes, and at one superpatch per volume probing stops for the rest of the run; each decision is printed and
warned. Preparing the labelled set (and writing the phantoms the first time) happens once, at the first probe,
and is printed on its own.

The probe never changes the run: the model's weights receive no gradient and every module's train/eval mode is
restored; the probe draws its superpatch places from its own NumPy generator and fits from zero weights, and
the global random states (Python, NumPy, torch) are captured before and restored after it, so an exact resume
(``--ckpt_path``) continues the very same random stream whether or not the callback is there. Under DDP the
global-zero process probes while the others wait at a broadcast of the results, so every process logs the
same values. Its budget state (superpatches per volume, stopped) is saved in checkpoints.

In YAML::

    trainer:
      callbacks:
        - class_path: maesil.probing.LinearProbe
          init_args: {every_n_steps: 300}

Probe Dice compares runs of one method (checkpoints, mask ratios, recipes). Across methods it also compares
feature resolutions (ViT tokens at stride 8, a U-Net's middle stage at stride 4), so read it with that in mind.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from maesil.data.io import subject_from_record
from maesil.data.manifest import declared_classes
from maesil.data.preprocess import PreprocessSettings
from maesil.data.records import DataError, SubjectRecord
from maesil.data.sampling import LabelMapVoxels, place_around
from maesil.data.sources import discover_subjects
from maesil.data.spec import DataSpec
from maesil.evaluation.figures import display_range
from maesil.evaluation.probe import ProbeResult, linear_probe, probe_figure
from maesil.methods.base import MethodModule, datamodule_spec
from maesil.phantoms import ORGAN_LABELS
from maesil.random_state import capture_rng_state, restore_rng_state

__all__ = [
    "LinearProbe", "ProbeSet", "ProbeVolume", "load_probe_set", "one_cpu_thread", "probe_records",
    "superpatch_corners",
]


# --------------------------------------------------------------------------------------------
# The labelled set
# --------------------------------------------------------------------------------------------


def superpatch_corners(label: np.ndarray, size: Sequence[int], count: int, rng: np.random.Generator,
                       where: str) -> list[np.ndarray]:
    """Corners of ``count`` superpatches of ``size`` centred on labelled voxels of ``label`` (X, Y, Z).

    The foreground classes present are visited in an order shuffled by ``rng``, one superpatch per class, again
    from the start when ``count`` exceeds them, so that small organs get superpatches too; each is centred on a
    voxel of its class drawn by ``rng`` and shifted inside the volume by the training samplers' border rule
    (:func:`maesil.data.sampling.place_around`). The first ``k`` corners of a call are those a call with
    ``count = k`` returns first, whatever ``count`` is.

    Raises:
        DataError: the label map has no foreground voxel (``where`` names it).
    """
    voxels = LabelMapVoxels(label, where)
    foreground = voxels.values[voxels.values > 0]
    if foreground.size == 0:
        raise DataError(f"{where}: the label map has no foreground voxel to centre probe superpatches on")
    order = rng.permutation(foreground)
    shape, extent = np.asarray(label.shape, dtype=np.int64), np.asarray(size, dtype=np.int64)
    corners = []
    for index in range(count):
        points = voxels.points(int(order[index % order.size]))
        corners.append(place_around(points[rng.integers(len(points))], shape, extent))
    return corners


@dataclass(frozen=True)
class ProbeVolume:
    """The superpatches of one labelled volume: ``images`` (k, 1, X, Y, Z) float32, ``labels`` (k, X, Y, Z)
    int64, at the corners :func:`superpatch_corners` chose."""

    subject_id: str
    images: Tensor
    labels: Tensor


@dataclass(frozen=True)
class ProbeSet:
    """The labelled superpatches of a run: the volumes that fit the probe and those that score it."""

    train: list[ProbeVolume]
    test: list[ProbeVolume]
    num_classes: int
    class_names: dict[int, str]

    def superpatches(self, split: str, per_volume: int) -> tuple[Tensor, Tensor, list[str]]:
        """The first ``per_volume`` superpatches of every volume of ``split`` (``"train"`` or ``"test"``):
        images (N, 1, X, Y, Z), labels (N, X, Y, Z) and each superpatch's subject id."""
        volumes = self.train if split == "train" else self.test
        images = torch.cat([v.images[:per_volume] for v in volumes])
        labels = torch.cat([v.labels[:per_volume] for v in volumes])
        subjects = [v.subject_id for v in volumes for _ in range(min(per_volume, len(v.images)))]
        return images, labels, subjects


def probe_records(data: str | Path | None, train_volumes: int, test_volumes: int, phantom_dir: str | Path,
                  phantom_seed: int) -> tuple[list[SubjectRecord], list[SubjectRecord], dict[int, str] | None]:
    """The labelled volumes that fit (first list) and score (second) the probe, and the class names if known.

    ``data`` None: ``train_volumes + test_volumes`` built-in phantoms from ``phantom_seed`` in ``phantom_dir``
    (written when missing; organ names from :data:`maesil.phantoms.ORGAN_LABELS`). Otherwise a labelled folder or
    manifest: with a manifest's splits, the first ``train_volumes`` ``train`` subjects and the first
    ``test_volumes`` ``val``/``test`` subjects; without, the subjects sorted by id, first the training ones.

    Raises:
        DataError: a subject without a label, or fewer labelled volumes than needed (naming ``data``).
    """
    needed = train_volumes + test_volumes
    if data is None:
        from maesil.phantoms import default_workers, write_phantoms

        folder = Path(phantom_dir).expanduser()
        images = write_phantoms(folder, count=needed, seed=phantom_seed, workers=default_workers(needed))
        records = [SubjectRecord(path.name.split(".")[0], path, folder / "labels" / path.name) for path in images]
        return records[:train_volumes], records[train_volumes:], dict(ORGAN_LABELS)
    records = discover_subjects(data)
    unlabelled = [r.subject_id for r in records if r.label is None]
    if unlabelled:
        raise DataError(f"{data}: LinearProbe needs a label for every volume; none for {', '.join(unlabelled[:5])}"
                        + (f" and {len(unlabelled) - 5} more" if len(unlabelled) > 5 else ""))
    if any(r.split for r in records):
        train = [r for r in records if r.split == "train"]
        test = [r for r in records if r.split in ("val", "test")]
    else:
        train, test = records[:train_volumes], records[train_volumes:]
    if len(train) < train_volumes or len(test) < test_volumes:
        raise DataError(f"{data}: LinearProbe needs {train_volumes} volume(s) to fit the probe and {test_volumes} to "
                        f"score it, found {len(train)} and {len(test)} (labelled: {len(records)}); lower "
                        "train_volumes/test_volumes or give more data")
    classes = declared_classes(data)
    names = {c: f"class_{c}" for c in classes} if classes else None
    return train[:train_volumes], test[:test_volumes], names


def load_probe_set(train: Sequence[SubjectRecord], test: Sequence[SubjectRecord], settings: PreprocessSettings,
                   superpatch_size: Sequence[int], per_volume: int, seed: int,
                   class_names: dict[int, str] | None = None) -> ProbeSet:
    """Reads and preprocesses the volumes as the training data (``settings``, padded to the superpatch) and cuts
    ``per_volume`` label-centred superpatches from each (:func:`superpatch_corners`, volume ``i`` of the
    concatenated lists drawing from ``numpy.random.default_rng([seed, i])``).

    ``class_names`` None: classes ``0..max label`` named ``class_<c>``.
    """
    size = tuple(int(s) for s in superpatch_size)
    transform = settings.transform(min_shape=size)
    volumes = []
    for index, record in enumerate([*train, *test]):
        subject = transform(subject_from_record(record, with_label=True))
        image = subject["image"].data.float()
        label = subject["label"].data[0].long()
        corners = superpatch_corners(label.numpy(), size, per_volume, np.random.default_rng([seed, index]),
                                     where=f"{record.label}: subject {record.subject_id!r}")
        crops = [tuple(slice(int(c), int(c) + s) for c, s in zip(corner, size)) for corner in corners]
        volumes.append(ProbeVolume(
            subject_id=record.subject_id,
            images=torch.stack([image[(slice(None), *crop)] for crop in crops]).contiguous(),
            labels=torch.stack([label[crop] for crop in crops]).contiguous(),
        ))
    highest = max(int(v.labels.max()) for v in volumes)
    if class_names is None:
        class_names = {c: f"class_{c}" for c in range(highest + 1)}
    num_classes = max(max(class_names) + 1, highest + 1, 2)
    return ProbeSet(train=volumes[:len(train)], test=volumes[len(train):], num_classes=num_classes,
                    class_names=dict(class_names))


# --------------------------------------------------------------------------------------------
# The callback
# --------------------------------------------------------------------------------------------


@contextmanager
def one_cpu_thread() -> Iterator[None]:
    """Torch's CPU operations on one thread inside the block, the previous count restored after it.

    The probe's fit and prediction are many small full-batch operations, where the threads' synchronisation
    costs more than it saves, and much more when the cores are shared: on 2 busy cores the demo's fit took 0.24 s
    on one thread and 6.2 s on two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _preprocess_settings(trainer: L.Trainer, spec: DataSpec) -> PreprocessSettings:
    """The training data's preprocessing: the DataModule's own settings, else those its spec states."""
    settings = getattr(getattr(trainer, "datamodule", None), "settings", None)
    if isinstance(settings, PreprocessSettings):
        return settings
    return PreprocessSettings(modality=spec.modality, target_spacing=spec.target_spacing, hu_window=spec.hu_window)


class LinearProbe(Callback):
    """Every ``every_n_steps`` steps, a linear probe on the frozen encoder features of a small labelled set; logs
    ``probe/dice`` beside the pretext metrics (see the module docstring).

    Args:
        every_n_steps: optimizer steps between probes.
        data: a labelled folder or manifest to probe on; None: the built-in phantoms (``phantom_dir``).
        train_volumes: volumes whose superpatches fit the probe.
        test_volumes: volumes whose superpatches score it.
        superpatches_per_volume: label-centred superpatches cut from each volume (halved while a probe takes longer
            than ``max_seconds``).
        fit_iterations: L-BFGS iterations of the probe's fit (:func:`maesil.evaluation.probe.fit_probe`).
        max_seconds: the bound on one probe's wall time (features, fit, score, picture).
        seed: seed of the superpatch places.
        phantom_dir: where the probe phantoms are written (once; shared by every run that uses the same folder).
        phantom_seed: seed of the first probe phantom.
        at_start: also probe the initial weights, before the first step of a run that starts at step 0 (the
            reference a run should beat).
        at_end: also probe the final weights when the last step is not a multiple of ``every_n_steps``.
        figure: save a picture of each probe.
    """

    def __init__(
        self,
        every_n_steps: int = 300,
        data: str | None = None,
        train_volumes: int = 2,
        test_volumes: int = 2,
        superpatches_per_volume: int = 8,
        fit_iterations: int = 50,
        max_seconds: float = 30.0,
        seed: int = 0,
        phantom_dir: str = "data_cache/probe_phantoms",
        phantom_seed: int = 300,
        at_start: bool = True,
        at_end: bool = True,
        figure: bool = True,
    ) -> None:
        for name, value in (("every_n_steps", every_n_steps), ("train_volumes", train_volumes),
                            ("test_volumes", test_volumes), ("superpatches_per_volume", superpatches_per_volume),
                            ("fit_iterations", fit_iterations)):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"LinearProbe: {name} must be an integer >= 1, got {value!r}")
        if not max_seconds > 0:
            raise ValueError(f"LinearProbe: max_seconds must be > 0, got {max_seconds!r}")
        if isinstance(phantom_seed, bool) or int(phantom_seed) != phantom_seed or phantom_seed < 0:
            raise ValueError(f"LinearProbe: phantom_seed must be an integer >= 0, got {phantom_seed!r}")
        self.every_n_steps = int(every_n_steps)
        self.data = data
        self.train_volumes = int(train_volumes)
        self.test_volumes = int(test_volumes)
        self.superpatches_per_volume = int(superpatches_per_volume)
        self.fit_iterations = int(fit_iterations)
        self.max_seconds = float(max_seconds)
        self.seed = int(seed)
        self.phantom_dir = phantom_dir
        self.phantom_seed = int(phantom_seed)
        self.at_start = bool(at_start)
        self.at_end = bool(at_end)
        self.figure = bool(figure)
        #: Superpatches per volume of the next probe, and whether probing stopped (both checkpointed).
        self.per_volume = self.superpatches_per_volume
        self.stopped = False
        #: The metrics of the latest probe (all processes), and ``(step, dice, seconds)`` of every probe (rank 0).
        self.last_metrics: dict[str, float] = {}
        self.history: list[tuple[int, float, float]] = []
        self._probe_set: ProbeSet | None = None
        self._last_step: int | None = None
        #: wall clock and global step at the end of the previous probe (or the start of training)
        self._clock: tuple[float, int] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, data=self.data, seed=self.seed)

    def state_dict(self) -> dict[str, Any]:
        return {"per_volume": self.per_volume, "stopped": self.stopped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.per_volume = min(int(state_dict.get("per_volume", self.per_volume)), self.superpatches_per_volume)
        self.stopped = bool(state_dict.get("stopped", False))

    # ---------------------------------------------------------------- hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Refuses, before any step, a module without encoder features or a DataModule without a spec."""
        if stage != "fit":
            return
        if not isinstance(pl_module, MethodModule) or type(pl_module).probe_features is MethodModule.probe_features:
            raise TypeError(f"LinearProbe needs a pretraining method that exposes encoder features (probe_features), "
                            f"got {type(pl_module).__name__}; remove the callback from trainer.callbacks")
        if datamodule_spec(trainer) is None:
            raise ValueError("LinearProbe preprocesses its labelled set like the training data and needs the "
                             "DataModule's spec (maesil.data.VolumeDataModule); "
                             f"got {type(getattr(trainer, 'datamodule', None)).__name__}")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._clock = (time.perf_counter(), trainer.global_step)
        if self.at_start and trainer.global_step == 0:
            self.probe(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
                           ) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.probe(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_end and trainer.global_step != self._last_step:
            self.probe(trainer, pl_module)

    # ---------------------------------------------------------------- probing
    def probe(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Probes the current weights (global rank 0; the others receive the results) and logs the metrics;
        returns them (empty once probing has stopped)."""
        self._last_step = trainer.global_step
        if self.stopped:
            return {}
        outcome = self._probe_on_this_process(trainer, pl_module) if trainer.is_global_zero else None
        if trainer.world_size > 1:
            outcome = trainer.strategy.broadcast(outcome, src=0)
        metrics, self.per_volume, self.stopped = outcome
        self.last_metrics = metrics
        trainer.callback_metrics.update({key: torch.tensor(value) for key, value in metrics.items()})
        return metrics

    def _probe_on_this_process(self, trainer: L.Trainer, pl_module: L.LightningModule
                               ) -> tuple[dict[str, float], int, bool]:
        """The probe itself, with the random states and module modes restored after it."""
        random_state = capture_rng_state()
        modes = [(module, module.training) for module in pl_module.modules()]
        try:
            pl_module.eval()
            if self._probe_set is None:
                self._probe_set = self._load(trainer)
            return self._measure(trainer, pl_module, self._probe_set)
        finally:
            for module, training in modes:
                module.training = training
            restore_rng_state(random_state)

    def _load(self, trainer: L.Trainer) -> ProbeSet:
        spec = datamodule_spec(trainer)
        if spec is None:
            raise ValueError("LinearProbe needs the DataModule's spec (maesil.data.VolumeDataModule)")
        start = time.perf_counter()
        where = self.data or f"{self.phantom_dir} (built-in phantoms from seed {self.phantom_seed})"
        train, test, names = probe_records(self.data, self.train_volumes, self.test_volumes, self.phantom_dir,
                                           self.phantom_seed)
        probe_set = load_probe_set(train, test, _preprocess_settings(trainer, spec), spec.superpatch_size,
                                   self.superpatches_per_volume, self.seed, names)
        print(f"LinearProbe: {len(train)} + {len(test)} labelled volume(s) of {where}, "
              f"{self.superpatches_per_volume} superpatch(es) of {tuple(spec.superpatch_size)} each, preprocessed "
              f"as the training data in {time.perf_counter() - start:.1f} s (once)", flush=True)
        return probe_set

    def _features(self, trainer: L.Trainer, pl_module: MethodModule, images: Tensor) -> Tensor:
        """``probe_features`` of ``images`` in chunks of the training batch, in the run's precision, float32."""
        spec = datamodule_spec(trainer)
        chunk = max(1, spec.batch_size if spec is not None else 1)
        outputs = []
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            for start in range(0, images.shape[0], chunk):
                batch = images[start:start + chunk].to(pl_module.device)
                outputs.append(pl_module.probe_features(batch).float())
        return torch.cat(outputs)

    def _measure(self, trainer: L.Trainer, pl_module: MethodModule, probe_set: ProbeSet
                 ) -> tuple[dict[str, float], int, bool]:
        step, per_volume = trainer.global_step, self.per_volume
        start = time.perf_counter()
        train_images, train_labels, _ = probe_set.superpatches("train", per_volume)
        test_images, test_labels, test_subjects = probe_set.superpatches("test", per_volume)
        train_features = self._features(trainer, pl_module, train_images)
        test_features = self._features(trainer, pl_module, test_images)
        feature_seconds = time.perf_counter() - start
        device = train_features.device
        with one_cpu_thread():
            result = linear_probe(train_features, train_labels.to(device), test_features, test_labels.to(device),
                                  probe_set.num_classes, iterations=self.fit_iterations)
        if self.figure:
            self._save_figure(trainer, pl_module, probe_set, test_images, test_labels, test_subjects, result)
        seconds = time.perf_counter() - start
        metrics = {"probe/dice": result.dice, "probe/seconds": seconds}
        names = [probe_set.class_names.get(c, f"class_{c}") for c in range(1, probe_set.num_classes)]
        metrics.update({f"probe/dice_{name}": float(value) for name, value in zip(names, result.class_dice)})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        self.history.append((step, result.dice, seconds))
        self._print_cost(step, result, names, seconds, feature_seconds, len(train_images), len(test_images))
        return (metrics, *self._budget(step, seconds, per_volume))

    def _print_cost(self, step: int, result: ProbeResult, names: Sequence[str], seconds: float,
                    feature_seconds: float, train_count: int, test_count: int) -> None:
        now = time.perf_counter()
        share = ""
        if self._clock is not None and step > self._clock[1]:
            share = (f", {100 * seconds / (now - self._clock[0]):.1f} % of the wall time since the previous probe "
                     "or the start of training")
        self._clock = (now, step)
        classes = ", ".join(f"{name} {value:.2f}" for name, value in zip(names, result.class_dice.tolist())
                            if not math.isnan(value))
        print(f"LinearProbe step {step}: probe Dice {result.dice:.4f} ({classes}); cost {seconds:.1f} s (features "
              f"{feature_seconds:.1f} s, fit and score {seconds - feature_seconds:.1f} s) on {train_count} + "
              f"{test_count} superpatches{share}", flush=True)

    def _budget(self, step: int, seconds: float, per_volume: int) -> tuple[int, bool]:
        """The superpatches per volume of the next probe and whether probing stops, after one of ``seconds``."""
        if seconds <= self.max_seconds:
            return per_volume, False
        if per_volume > 1:
            reduced = max(1, per_volume // 2)
            message = (f"LinearProbe: the probe at step {step} took {seconds:.1f} s, more than max_seconds="
                       f"{self.max_seconds:g}: the next probes use {reduced} superpatch(es) per volume instead of "
                       f"{per_volume}")
            print(message, flush=True)
            warnings.warn(message, stacklevel=2)
            return reduced, False
        message = (f"LinearProbe: the probe at step {step} took {seconds:.1f} s, more than max_seconds="
                   f"{self.max_seconds:g}, with 1 superpatch per volume already: no more probes in this run (raise "
                   "max_seconds, or lower train_volumes, test_volumes or fit_iterations)")
        print(message, flush=True)
        warnings.warn(message, stacklevel=2)
        return per_volume, True

    def _save_figure(self, trainer: L.Trainer, pl_module: MethodModule, probe_set: ProbeSet, images: Tensor,
                     labels: Tensor, subjects: Sequence[str], result: ProbeResult) -> None:
        """Draws the test superpatch with the most classes: image, reference labels, probe prediction.

        It goes through the method's ``log_figure`` (the run folder and image-taking loggers), keeping the
        method's own latest picture as the one the run summary names."""
        index = int(np.argmax([len(torch.unique(label)) for label in labels]))
        image = images[index, 0].numpy()
        title = f"probe · step {trainer.global_step} · Dice {result.dice:.3f} · {subjects[index]}"
        figure = probe_figure(image, labels[index].numpy(), result.prediction[index].numpy(), probe_set.class_names,
                              title=title, value_range=display_range(image, pl_module.data_modality))
        previous = pl_module.last_figure_path
        pl_module.log_figure("probe", figure)
        pl_module.last_figure_path = previous
