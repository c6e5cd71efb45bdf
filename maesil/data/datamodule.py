"""The one LightningDataModule: a folder of 3D CT/MRI volumes -> batches of patches."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import warnings
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torchio as tio
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from maesil.data.io import read_volume, subject_from_record
from maesil.data.preprocess import PadToMinShape, PreprocessSettings, padding_value
from maesil.data.sampling import (
    ResumableSampler,
    PatchTask,
    QueueSampler,
    as_patch_size,
    collate_volumes,
    get_task,
    grid_patches,
    is_distributed,
    set_queue_epoch,
    task_options,
    train_queue,
)
from maesil.data.views import ViewSettings  # also registers the task "two_view"
from maesil.data.cache import (
    CACHE_INDEX,
    CachedPatchDataset,
    CacheIndex,
    cache_problems,
    is_cache,
    load_cached_subject,
    prepare_cache,
)
from maesil.data.checks import check_records, raise_on_errors
from maesil.data.manifest import declared_classes
from maesil.data.sources import DEFAULT_EXCLUDE, DataError, SubjectRecord, discover_subjects

log = logging.getLogger(__name__)


def split_subjects(records: Sequence[SubjectRecord], val_fraction: float, seed: int
                   ) -> tuple[list[SubjectRecord], list[SubjectRecord]]:
    """Deterministic train/val split by subject.

    Subjects are ordered by ``sha1(f"{seed}:{subject_id}")`` and the first
    ``max(1, round(val_fraction * n))`` go to validation (at most ``n - 1``). Ordering by a
    hash of the id (not by position) keeps the split nearly unchanged when subjects are
    added. ``val_fraction == 0`` gives no validation subject. With a single subject it is used
    for both training and validation (and a warning is issued).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    records = sorted(records, key=lambda r: r.subject_id)
    n = len(records)
    if n == 0:
        raise ValueError("no subject to split")
    if val_fraction == 0.0:
        return records, []
    if n == 1:
        warnings.warn(
            f"Only one subject ({records[0].subject_id}); it is used for both training and validation.",
            UserWarning,
            stacklevel=2,
        )
        return records, list(records)
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    ranked = sorted(records, key=lambda r: hashlib.sha1(f"{seed}:{r.subject_id}".encode()).hexdigest())
    val_ids = {r.subject_id for r in ranked[:n_val]}
    return [r for r in records if r.subject_id not in val_ids], [r for r in records if r.subject_id in val_ids]


def split_by_manifest(records: Sequence[SubjectRecord], val_fraction: float, seed: int
                      ) -> tuple[list[SubjectRecord], list[SubjectRecord], list[SubjectRecord]]:
    """Train/val/test split honouring a manifest's ``split`` column.

    Subjects marked ``test`` are held out of training and validation; ``val`` ones validate.
    If no subject is marked ``val``, the validation subjects are drawn from the rest by
    :func:`split_subjects`; subjects without a split train otherwise.
    """
    test = [r for r in records if r.split == "test"]
    marked_val = [r for r in records if r.split == "val"]
    pool = [r for r in records if r.split not in ("val", "test")]
    if marked_val:
        return sorted(pool, key=lambda r: r.subject_id), marked_val, test
    if not pool:
        raise DataError("no training subject: every subject is marked test in the manifest")
    train, val = split_subjects(pool, val_fraction, seed)
    return train, val, test


def _first(batch: list) -> Any:
    return batch[0]


class VolumeDataModule(L.LightningDataModule):
    """Patches of 3D CT/MRI volumes for self-supervised pretraining and segmentation.

    Every batch is a dict: ``image`` float32 (B, 1, X, Y, Z) in RAS (Z axial), ``subject_id``
    list[str], ``location`` int64 (B, 6) (patch bounds i0, j0, k0, i1, j1, k1 in the
    preprocessed volume) and, for ``task="segment"``, ``label`` int64 (B, 1, X, Y, Z); for
    ``task="two_view"``, two augmented views and their geometry (``view1``, ``view2``, ``box1``,
    ``box2``, ``flip1``, ``flip2``, ``overlap``; see :mod:`maesil.data.sampling`).
    Training draws ``samples_per_volume`` random patches from each volume through a
    ``tio.Queue``; validation covers every voxel of every validation volume exactly once with
    a non-overlapping grid.

    Whole volumes: for tasks with ``whole_volume_evaluation`` (``"segment"``), validation and
    test batches are instead one whole preprocessed volume each (:meth:`whole_volumes`,
    :func:`~maesil.data.sampling.collate_volumes`): ``image`` (1, C, X, Y, Z), ``label``
    (1, 1, X, Y, Z), ``subject_id``, ``spacing`` (1, 3) in mm, ``location`` (the whole volume) and
    ``subject`` (the preprocessed ``tio.Subject``, with its affine). ``predict_dataloader`` yields
    every image of ``data_dir`` the same way, without label, plus ``source`` (the original
    image's path; :meth:`source_image` reads it), so that predictions can be mapped back onto the
    input grid (:func:`maesil.evaluation.segmentation.to_original_geometry`).

    All input files are checked in ``setup`` (headers, and with ``check_voxels`` every voxel;
    see :mod:`maesil.data.checks`) and every problem is reported in one ``DataError`` before
    training starts.

    Distributed training: subjects are sharded per rank by the queue's own
    ``DistributedSampler``, and both loaders already carry a ``DistributedSampler``, so
    Lightning does not re-shard them; ``Trainer(use_distributed_sampler=False)`` is
    recommended for clarity but not required. Lightning calls ``set_epoch`` on the training
    sampler each epoch; ``set_epoch`` can also be called by hand. Whole-volume validation/test
    loaders shard subjects with ``DistributedSampler(shuffle=False)``, which repeats a few
    subjects so that every rank gets as many: per-volume scores should be de-duplicated by
    ``subject_id`` when gathered (:class:`~maesil.evaluation.segmentation.SegmentationScoreboard`
    does). The predict loader shards without repetition.

    Args:
        data_dir: where the volumes are: a folder with ``images/`` (or ``imagesTr/``) and
            optional sibling ``labels/`` (or ``labelsTr/``) paired by subject id; any folder whose
            supported files (.nii, .nii.gz, .nrrd, .mha, .mhd; searched recursively) and DICOM
            study folders are all images; a CSV/JSON manifest (:mod:`maesil.data.manifest`,
            may fix the train/val/test split); or a cache written by ``python -m maesil
            prepare`` (read as it is). ``None`` uses ``phantom_count`` synthetic phantoms
            written to ``phantom_dir`` (demo / smoke tests).
        task: what a batch holds: ``"reconstruct"`` (images, uniform patches),
            ``"segment"`` (images and labels, label-centred patches; needs labels for all) or
            ``"two_view"`` (uniform patches plus two augmented views of each and the boxes relating
            them, for BYOL-style methods such as PGL; see :mod:`maesil.data.views`).
        modality: ``"ct"`` (clip to ``hu_window``, scale to [0, 1]) or ``"mri"``
            (z-normalisation over the foreground).
        superpatch_size: training/validation patch size in voxels (X, Y, Z), one int for a
            cube. Smaller volumes are padded up to it.
        target_spacing: voxel size in mm after resampling (one number = isotropic); ``None``
            keeps each volume's native spacing.
        hu_window: CT window (HU) mapped to [0, 1]; [-175, 250] as in the MAESIL paper. Ignored
            for MRI, where ``null`` is allowed and caches are never refused over a window (see
            :class:`~maesil.data.preprocess.PreprocessSettings`). ``null`` with CT is an error: CT
            needs a window, and a silent default would hide a config mistake.
        crop_foreground: crop each volume to the bounding box of the body (plus 4 voxels) after
            the intensity step, so superpatches are not spent on the air around the patient.
        val_fraction: fraction of subjects held out for validation (at least one when there
            are >= 2 subjects; 0 = no validation).
        split_seed: seed of the subject split and of the training subject shuffle.
        batch_size: training patches per batch (per device).
        val_batch_size: validation patches per batch; defaults to ``batch_size`` (whole-volume
            evaluation always has one volume per batch).
        samples_per_volume: patches drawn from each loaded training volume per visit.
        queue_length: capacity (in patches) of the training queue; larger mixes patches of
            more volumes per batch but costs memory (patch bytes x queue_length).
        num_workers: processes loading and preprocessing volumes (for the queue and for the
            one-off validation preprocessing). The loaders that yield batches use 0 workers,
            as ``tio.Queue`` requires.
        label_probabilities: ``task="segment"`` only: label value -> relative probability
            that a patch is centred on it, e.g. ``{0: 1, 1: 2}``; ``None`` centres every patch
            on a voxel with label > 0 (then every training label map must be non-empty).
        views: ``task="two_view"`` only: how the two views are drawn (crop scale, view size,
            flips, minimum overlap, intensity jitter; :class:`~maesil.data.views.ViewSettings`);
            ``None`` = the defaults.
        exclude: glob patterns of files under ``data_dir`` that are not images and must be
            ignored (matched against the relative path, the file name and folder names).
            ``None`` = hidden files and .json/.csv/.tsv/.md/.txt. Any other non-image file
            is an error.
        cache_dir: prepare ``data_dir`` into this cache (``prepare_data``, rank 0; subjects whose
            source is unchanged are skipped) and train from it: random superpatch reads from
            ``.npy`` memmaps in ``num_workers`` DataLoader workers, instead of decoding and
            preprocessing whole volumes in a TorchIO queue. Much faster, and memory does not
            grow with the dataset. ``None``: no cache.
        num_classes: label values must be in ``0..num_classes-1`` (checked for every label
            map in ``setup``); ``None``: the classes of a JSON manifest / ``dataset.json``, else
            any non-negative integer.
        check_voxels: in ``setup``, read every voxel of every file once (NaN/Inf, constant
            volumes, label values) besides the header checks, so a bad file stops the run at
            the start. With a cache these checks come free from its index.
        phantom_count: number of phantoms written when ``data_dir`` is ``None``.
        phantom_dir: where the phantoms are written when ``data_dir`` is ``None``.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        task: Literal["reconstruct", "segment", "two_view"] = "reconstruct",
        modality: Literal["ct", "mri"] = "ct",
        superpatch_size: int | tuple[int, int, int] = 128,
        target_spacing: float | tuple[float, float, float] | None = 1.5,
        hu_window: tuple[float, float] | None = (-175.0, 250.0),
        crop_foreground: bool = True,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        batch_size: int = 2,
        val_batch_size: int | None = None,
        samples_per_volume: int = 8,
        queue_length: int = 48,
        num_workers: int = 2,
        label_probabilities: dict[int, float] | None = None,
        views: ViewSettings | None = None,
        exclude: list[str] | None = None,
        cache_dir: str | None = None,
        num_classes: int | None = None,
        check_voxels: bool = True,
        phantom_count: int = 8,
        phantom_dir: str = "data_cache/phantoms",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if modality not in ("ct", "mri"):
            raise ValueError(f"modality must be 'ct' or 'mri', got {modality!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        for name, value in (("batch_size", batch_size), ("samples_per_volume", samples_per_volume),
                            ("queue_length", queue_length)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.data_dir = data_dir
        self.task_name = task
        self.modality = modality
        self._superpatch_size = as_patch_size(superpatch_size)
        self.target_spacing = target_spacing
        # None with CT is refused by PreprocessSettings below.
        self.hu_window = None if hu_window is None else (float(hu_window[0]), float(hu_window[1]))
        self.crop_foreground = bool(crop_foreground)
        self.val_fraction = float(val_fraction)
        self.split_seed = int(split_seed)
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size) if val_batch_size is not None else int(batch_size)
        self.samples_per_volume = int(samples_per_volume)
        self.queue_length = int(queue_length)
        self.num_workers = int(num_workers)
        self.label_probabilities = dict(label_probabilities) if label_probabilities else None
        self.exclude = tuple(exclude) if exclude is not None else DEFAULT_EXCLUDE
        self.cache_dir = cache_dir
        if num_classes is not None and int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes) if num_classes is not None else None
        self.check_voxels = bool(check_voxels)
        self.settings = PreprocessSettings(modality=modality, target_spacing=target_spacing,
                                           hu_window=self.hu_window, crop_foreground=self.crop_foreground)
        self.phantom_count = int(phantom_count)
        self.phantom_dir = phantom_dir
        self.views = views
        self.task: PatchTask = get_task(task, label_probabilities=self.label_probabilities, views=views)
        if self.label_probabilities and not self.task.requires_labels:
            warnings.warn(f"label_probabilities is ignored for task {task!r}", UserWarning, stacklevel=2)
        if views is not None and "views" not in task_options(task):
            warnings.warn(f"views is ignored for task {task!r} (it is used by task 'two_view')", UserWarning,
                          stacklevel=2)

        self.train_records: list[SubjectRecord] = []
        self.val_records: list[SubjectRecord] = []
        self.test_records: list[SubjectRecord] = []
        self._cache: CacheIndex | None = None
        self._test_patches: Dataset | None = None
        self._train_dataset: CachedPatchDataset | None = None
        self._setup_key: tuple | None = None
        self._train_subjects: tio.SubjectsDataset | None = None
        self._val_patches: Dataset | None = None
        self._whole_volumes: dict[str, list[tio.Subject]] = {}
        self.predict_records: list[SubjectRecord] = []
        self._predict_key: tuple | None = None
        self._queue: tio.Queue | None = None
        self._epoch = 0
        self._resume_position: dict[str, Any] | None = None

    # ---------------------------------------------------------------- properties
    @property
    def superpatch_size(self) -> tuple[int, int, int]:
        """Patch size (X, Y, Z) in voxels of every training and validation sample."""
        return self._superpatch_size

    @property
    def voxel_spacing(self) -> tuple[float, float, float] | None:
        """Voxel size (mm) of every sample after resampling; ``None`` if native spacing is kept."""
        if self.target_spacing is None:
            return None
        if isinstance(self.target_spacing, (int, float)):
            return (float(self.target_spacing),) * 3
        return tuple(float(s) for s in self.target_spacing)  # type: ignore[return-value]

    @property
    def resolved_data_dir(self) -> Path:
        """The folder actually read: ``data_dir`` or, if ``None``, ``phantom_dir``."""
        return Path(self.data_dir if self.data_dir is not None else self.phantom_dir).expanduser()

    @property
    def subject_sampler(self) -> DistributedSampler | None:
        """The training queue's subject sampler (after ``train_dataloader``)."""
        return None if self._queue is None else self._queue.subject_sampler

    # ---------------------------------------------------------------- lightning hooks
    def prepare_data(self) -> None:
        """Rank 0 only, via Lightning: write the demo phantoms when ``data_dir`` is ``None``, and
        prepare the cache when ``cache_dir`` is set (idempotent: unchanged subjects are skipped)."""
        if self.data_dir is None:
            from maesil.data.phantoms import write_phantoms

            log.info("data_dir is None: writing %d demo phantoms to %s", self.phantom_count, self.phantom_dir)
            write_phantoms(self.phantom_dir, count=self.phantom_count)
        if self.cache_dir is None or is_cache(self.resolved_data_dir):
            return
        records = discover_subjects(self.resolved_data_dir, exclude=self.exclude)
        # Headers only: preparing reads every voxel anyway (NaN/Inf fail there), and the voxel checks of
        # unchanged subjects are answered from the index instead of re-reading them at every run.
        self._check_source(records, read_voxels=False, warn_small=False)
        report = prepare_cache(records, self.cache_dir, self.settings, workers=max(1, self.num_workers))
        if report.failed:
            raise DataError([f"{sid}: {message}" for sid, message in sorted(report.failed.items())],
                            header=f"{len(report.failed)} subject(s) could not be prepared into {self.cache_dir}")
        index = CacheIndex.load(self.cache_dir)
        errors = [p for p in cache_problems([index.entries[r.subject_id] for r in records], classes=self.label_classes(),
                                            needs_labels=self.task.requires_labels) if p.severity == "error"]
        raise_on_errors(errors, what=f"cache {self.cache_dir}")
        log.info("Cache %s: %d subject(s) prepared, %d unchanged", self.cache_dir, len(report.prepared),
                 len(report.skipped))

    def preprocessing(self) -> tio.Compose:
        """The per-volume preprocessing (canonical, resample, intensity, pad to the patch)."""
        return self.settings.transform(min_shape=self.superpatch_size)

    def label_classes(self) -> list[int] | None:
        """The declared label values: ``range(num_classes)``, else a JSON manifest's, else ``None``."""
        if self.num_classes is not None:
            return list(range(self.num_classes))
        return declared_classes(self.resolved_data_dir)

    def _check_source(self, records: Sequence[SubjectRecord], read_voxels: bool | None = None,
                      warn_small: bool = True) -> None:
        """Labels present where the task needs them; the file checks of :mod:`maesil.data.checks`
        (voxels too when ``read_voxels``, default ``check_voxels``; ``warn_small``: warn about volumes
        smaller than a superpatch, which a cache's setup answers itself after preprocessing)."""
        read_voxels = self.check_voxels if read_voxels is None else read_voxels
        if self.task.requires_labels:
            unlabeled = [r for r in records if r.label is None and r.split != "test"]
            if unlabeled:
                raise DataError(
                    [f"{r.image}: no label (task {self.task_name!r} needs a label for every image)"
                     for r in unlabeled],
                    header=f"Task {self.task_name!r} needs labels (in {self.resolved_data_dir}/labels, or labelsTr,"
                    f" named like the images, or a manifest's label column); {len(unlabeled)} image(s) have none",
                )
        problems = check_records(records, superpatch_size=self.superpatch_size if warn_small else None,
                                 target_spacing=self.target_spacing, classes=self.label_classes(),
                                 read_voxels=read_voxels,
                                 workers=max(2, self.num_workers))
        raise_on_errors(problems, what=f"data of {self.resolved_data_dir}")

    def _make_subject(self, record: SubjectRecord) -> tio.Subject:
        return subject_from_record(record, with_label=self.task.requires_labels)

    def setup(self, stage: str | None = None) -> None:
        """Discover and check all subjects (every problem in one ``DataError``), split them and
        build the datasets. Idempotent. Reads the cache when ``data_dir`` is one or
        ``cache_dir`` is set (call ``prepare_data`` first, as Lightning does).

        ``stage="predict"`` only lists the images to predict (:meth:`setup_predict`): labels are
        neither needed nor read, and there is no split."""
        if stage == "predict":
            self.setup_predict()
            return
        data_dir = self.resolved_data_dir
        if self.data_dir is None and not data_dir.exists():
            self.prepare_data()
        cache_root = data_dir if is_cache(data_dir) else (Path(self.cache_dir) if self.cache_dir else None)
        key = (str(data_dir), str(cache_root), self.exclude, self.task_name, self.val_fraction, self.split_seed)
        if self._setup_key == key:
            return
        self._val_patches = self._test_patches = None
        self._whole_volumes = {}
        self._queue = self._train_dataset = None
        self._train_subjects = None
        if cache_root is not None:
            records = self._setup_from_cache(cache_root)
        else:
            records = discover_subjects(data_dir, exclude=self.exclude)
            self._check_source(records)
            self._cache = None
        self.train_records, self.val_records, self.test_records = split_by_manifest(
            records, self.val_fraction, self.split_seed)
        log.info("%d subjects: %d train, %d val (%s)%s", len(records), len(self.train_records),
                 len(self.val_records), ", ".join(r.subject_id for r in self.val_records),
                 f", {len(self.test_records)} test" if self.test_records else "")
        if self._cache is None:
            transform = self.preprocessing()
            self._train_subjects = tio.SubjectsDataset(
                [self._make_subject(r) for r in self.train_records], transform=transform, load_getitem=False
            )
        self._setup_key = key

    def _setup_from_cache(self, cache_root: Path) -> list[SubjectRecord]:
        """Open the cache index; check its settings match this DataModule's and its subjects are usable."""
        if not (cache_root / CACHE_INDEX).exists():
            raise DataError(f"{cache_root}: no prepared cache here (no {CACHE_INDEX}); run `python -m maesil"
                            f" prepare DATA --out {cache_root}` or let the DataModule prepare it (prepare_data)")
        index = CacheIndex.load(cache_root)
        if index.settings != self.settings:
            raise DataError(
                f"{cache_root}: the cache was prepared with {index.settings.to_dict()}, but this run asks for"
                f" {self.settings.to_dict()}; prepare another cache (or re-run prepare with --force)"
            )
        if self.cache_dir is not None and not is_cache(self.resolved_data_dir):
            wanted = {r.subject_id for r in discover_subjects(self.resolved_data_dir, exclude=self.exclude)}
            missing = sorted(wanted - set(index.entries))
            if missing:
                raise DataError([f"{cache_root}: subject {sid!r} of {self.resolved_data_dir} is not prepared"
                                 for sid in missing[:20]], header="The cache is incomplete; call prepare_data()")
            entries = {sid: index.entries[sid] for sid in sorted(wanted)}
        else:
            entries = dict(sorted(index.entries.items()))
        problems = cache_problems(entries.values(), self.superpatch_size, self.label_classes(),
                                  needs_labels=self.task.requires_labels)
        raise_on_errors(problems, what=f"cache {cache_root}")
        self._cache = index
        return [SubjectRecord(sid, e.image_path, e.label_path, split=e.split) for sid, e in entries.items()]

    def _require_setup(self) -> None:
        if self._setup_key is None:
            raise RuntimeError("call setup() before requesting a dataloader")

    def train_dataloader(self) -> DataLoader:
        """Batches from a DDP-aware ``tio.Queue`` (the DataLoader itself has 0 workers), or from the
        cache: a plain DataLoader with ``num_workers`` workers over random superpatch reads."""
        self._require_setup()
        if self._cache is not None:
            return self._cached_train_dataloader()
        assert self._train_subjects is not None
        self._queue = train_queue(
            self._train_subjects,
            patch_size=self.superpatch_size,
            samples_per_volume=self.samples_per_volume,
            max_length=self.queue_length,
            num_workers=self.num_workers,
            sampler=self.task.train_sampler(self.superpatch_size),
            shuffle_seed=self.split_seed,
        )
        set_queue_epoch(self._queue, self._epoch)
        _silence_worker_warning("train_dataloader")
        sampler = QueueSampler(self._queue)
        self._apply_resume_position(sampler)
        return DataLoader(
            self._queue,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=0,  # required by tio.Queue: it spawns its own loader processes
            collate_fn=self.task.collate,
            pin_memory=torch.cuda.is_available(),
        )

    def _cached_train_dataloader(self) -> DataLoader:
        assert self._cache is not None
        self._train_dataset = CachedPatchDataset(
            self._cache, [r.subject_id for r in self.train_records], self.superpatch_size, self.samples_per_volume,
            with_label=self.task.requires_labels, seed=self.split_seed,
            label_probabilities=self.label_probabilities if self.task.requires_labels else None,
        )
        self._train_dataset.set_epoch(self._epoch)
        if is_distributed():
            sampler = ResumableSampler(self._train_dataset, shuffle=True, seed=self.split_seed)
        else:
            sampler = ResumableSampler(self._train_dataset, num_replicas=1, rank=0, shuffle=True, seed=self.split_seed)
        sampler.set_epoch(self._epoch)
        outer = _EpochForwardingSampler(sampler, self._train_dataset)
        self._apply_resume_position(outer)
        return DataLoader(
            self._train_dataset,
            batch_size=self.batch_size,
            sampler=outer,
            num_workers=self.num_workers,
            collate_fn=self.task.collate,
            pin_memory=torch.cuda.is_available(),
            drop_last=False,
        )

    # ---------------------------------------------------------------- resuming
    def state_dict(self) -> dict[str, Any]:
        """The data position, saved in every checkpoint: the epoch and the training batches already
        used in it, so that ``--ckpt_path last`` continues the epoch instead of restarting it."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit":
            return {}
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": int(trainer.current_epoch), "batches_in_epoch": int(progress.processed),
                "batch_size": int(self.batch_size)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Remembers a checkpoint's data position for the next :meth:`train_dataloader`, and its epoch:
        the training loader is built before Lightning starts the resumed epoch, and its subject order and
        superpatch locations depend on the epoch."""
        self._resume_position = dict(state_dict) if state_dict else None
        if self._resume_position and "epoch" in self._resume_position:
            self._epoch = int(self._resume_position["epoch"])

    def _apply_resume_position(self, sampler: ResumableSampler) -> None:
        """Makes the first pass of a resumed run's training sampler skip what the checkpointed run used.

        With a prepared cache the resumed epoch continues at the exact superpatch (locations are seeded
        by epoch and index). With the TorchIO queue it continues after the last whole subject used
        (patches of a subject still in the queue at the checkpoint are drawn again).
        """
        position, self._resume_position = self._resume_position, None
        if not position or position.get("epoch") != self._epoch:
            return
        samples = int(position.get("batches_in_epoch", 0)) * int(position.get("batch_size", self.batch_size))
        if samples > 0:
            sampler.skip_once(samples)
            log.info("resuming epoch %d after %d training batches (%d superpatches already used)",
                     self._epoch, position["batches_in_epoch"], samples)

    def _preprocessed_subjects(self, records: Sequence[SubjectRecord]) -> list[tio.Subject]:
        """Whole preprocessed (and padded to one superpatch) volumes, from the cache or the files."""
        with_label = self.task.requires_labels
        if self._cache is not None:
            pad = PadToMinShape(self.superpatch_size, padding_value(self.modality))
            return [pad(load_cached_subject(self._cache, r.subject_id, with_label=with_label)) for r in records]
        dataset = tio.SubjectsDataset([self._make_subject(r) for r in records], transform=self.preprocessing(),
                                      load_getitem=False)
        return list(DataLoader(dataset, batch_size=1, num_workers=self.num_workers, collate_fn=_first))

    def whole_volumes(self, split: Literal["val", "test"]) -> list[tio.Subject]:
        """The whole preprocessed volumes of ``split`` (labels included when the task needs them),
        preprocessed once and kept in memory (validation runs many times), from the cache or the
        files like :meth:`val_patches`. Volumes smaller than a superpatch are padded up to it, as
        for training.

        Raises:
            DataError: when the task needs labels and a subject of ``split`` has none (a
                manifest's test subjects may have no label: predict them instead).
        """
        self._require_setup()
        if split not in ("val", "test"):
            raise ValueError(f"split must be 'val' or 'test', got {split!r}")
        if split not in self._whole_volumes:
            records = self.val_records if split == "val" else self.test_records
            if self.task.requires_labels:
                unlabeled = [r for r in records if r.label is None]
                if unlabeled:
                    raise DataError([f"{r.image}: subject {r.subject_id!r} has no label" for r in unlabeled],
                                    header=f"Task {self.task_name!r} scores {split} subjects against their labels;"
                                    f" {len(unlabeled)} have none (use predict for unlabelled images)")
            self._whole_volumes[split] = self._preprocessed_subjects(records)
        return self._whole_volumes[split]

    def _volume_dataloader(self, subjects: list[tio.Subject], name: str) -> DataLoader:
        """One whole in-memory volume per batch; sharded (with repeats) over ranks when distributed."""
        sampler = DistributedSampler(subjects, shuffle=False) if is_distributed() else None
        _silence_worker_warning(name)
        return DataLoader(
            subjects,  # type: ignore[arg-type]
            batch_size=1,
            shuffle=False,
            sampler=sampler,
            num_workers=0,  # in memory already
            collate_fn=self.task.volume_collate,
            pin_memory=False,  # pinning would rebuild the tio.Subject dicts of the batch
        )

    def val_patches(self) -> Dataset:
        """Non-overlapping grid patches of the validation volumes, preprocessed once and kept
        in memory (validation runs many times; volumes are small after resampling)."""
        self._require_setup()
        if self._val_patches is None:
            subjects = self._preprocessed_subjects(self.val_records)
            self._val_patches = grid_patches(subjects, self.superpatch_size, padding_value(self.modality))
        return self._val_patches

    def test_patches(self) -> Dataset:
        """Grid patches of the test subjects (manifest ``split: test``), like :meth:`val_patches`."""
        self._require_setup()
        if self._test_patches is None:
            subjects = self._preprocessed_subjects(self.test_records)
            self._test_patches = grid_patches(subjects, self.superpatch_size, padding_value(self.modality))
        return self._test_patches

    def val_dataloader(self) -> DataLoader | list:
        """Every voxel of every validation volume once (sharded over ranks when distributed;
        ``DistributedSampler`` then repeats a few patches to even out the ranks): a patch grid, or
        whole volumes one per batch for tasks with ``whole_volume_evaluation`` (see the class
        docstring)."""
        self._require_setup()
        if not self.val_records:
            return []
        if self.task.whole_volume_evaluation:
            return self._volume_dataloader(self.whole_volumes("val"), "val_dataloader")
        return self._grid_dataloader(self.val_patches())

    def _grid_dataloader(self, patches: Dataset) -> DataLoader:
        sampler = DistributedSampler(patches, shuffle=False) if is_distributed() else None
        _silence_worker_warning("val_dataloader")
        return DataLoader(
            patches,
            batch_size=self.val_batch_size,
            shuffle=False,
            sampler=sampler,
            num_workers=0,  # patches are in memory already
            collate_fn=self.task.val_collate,
            pin_memory=torch.cuda.is_available(),
        )

    def test_dataloader(self) -> DataLoader | list:
        """For ``python -m maesil test``: the manifest's ``test`` subjects as a whole-volume grid, or,
        when there are none (a folder has no test split), the validation subjects."""
        self._require_setup()
        if not self.test_records:
            return self.val_dataloader()
        if self.task.whole_volume_evaluation:
            return self._volume_dataloader(self.whole_volumes("test"), "test_dataloader")
        return self._grid_dataloader(self.test_patches())

    # ---------------------------------------------------------------- prediction
    def setup_predict(self) -> None:
        """List every image of ``data_dir`` (all records, whatever their split) for prediction.

        Labels are ignored (not required, not read). When ``data_dir`` is a prepared cache, its
        subjects' original images are predicted (they must still exist): predictions are mapped
        back onto those images' grids. Headers (and, with ``check_voxels``, voxels) are checked as
        in :meth:`setup`. Idempotent; called by :meth:`predict_dataloader` if needed.
        """
        data_dir = self.resolved_data_dir
        if self.data_dir is None and not data_dir.exists():
            self.prepare_data()
        key = (str(data_dir), self.exclude)
        if self._predict_key == key:
            return
        if is_cache(data_dir):
            index = CacheIndex.load(data_dir)
            records = [SubjectRecord(sid, Path(e.source.image), None, series_uid=e.source.series_uid)
                       for sid, e in sorted(index.entries.items())]
            missing = [r for r in records if not r.image.exists()]
            if missing:
                raise DataError([f"{r.image}: original image of cached subject {r.subject_id!r} not found"
                                 for r in missing], header=f"Cannot predict the cache {data_dir}")
        else:
            records = [dataclasses.replace(r, label=None) for r in discover_subjects(data_dir, exclude=self.exclude)]
        problems = check_records(records, target_spacing=self.target_spacing, read_voxels=self.check_voxels,
                                 workers=max(2, self.num_workers))
        raise_on_errors(problems, what=f"data of {data_dir}")
        self.predict_records = records
        self._predict_key = key
        log.info("%d image(s) to predict in %s", len(records), data_dir)

    def _make_predict_subject(self, record: SubjectRecord) -> tio.Subject:
        image = subject_from_record(record, with_label=False)["image"]
        return tio.Subject(subject_id=record.subject_id, source=str(record.image), image=image)

    def predict_dataloader(self) -> DataLoader:
        """Every image of ``data_dir``, preprocessed as for training, one whole volume per batch
        (:func:`~maesil.data.sampling.collate_volumes` without label, plus ``source``).

        Volumes are read and preprocessed lazily in ``num_workers`` processes, so memory does not
        grow with the number of images. Sharded without repetition over ranks when distributed.
        """
        self.setup_predict()
        dataset = tio.SubjectsDataset([self._make_predict_subject(r) for r in self.predict_records],
                                      transform=self.preprocessing(), load_getitem=False)
        sampler = None
        if is_distributed():
            from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

            sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
        return DataLoader(
            dataset,
            batch_size=1,
            shuffle=False,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_volumes,
            pin_memory=False,  # pinning would rebuild the tio.Subject dicts of the batch
        )

    def source_image(self, subject_id: str) -> tio.ScalarImage:
        """The original (unpreprocessed) image of a subject, lazily read with the project's reader:
        the target grid of :func:`~maesil.evaluation.segmentation.to_original_geometry`."""
        records = {r.subject_id: r for r in (*self.train_records, *self.val_records, *self.test_records)}
        if self._cache is not None:  # the records point into the cache: use the sources it recorded
            records = {sid: SubjectRecord(sid, Path(self._cache.entries[sid].source.image),
                                          series_uid=self._cache.entries[sid].source.series_uid)
                       for sid in records if sid in self._cache.entries}
        records.update((r.subject_id, r) for r in self.predict_records)
        try:
            record = records[subject_id]
        except KeyError:
            raise KeyError(f"unknown subject {subject_id!r} (call setup() or setup_predict() first)") from None
        return tio.ScalarImage(record.image, reader=partial(read_volume, series_uid=record.series_uid))

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle the training subject order for ``epoch`` (forwarded to the queue's
        ``DistributedSampler``; Lightning already does this through the train sampler)."""
        self._epoch = int(epoch)
        if self._queue is not None:
            set_queue_epoch(self._queue, self._epoch)
        if self._train_dataset is not None:
            self._train_dataset.set_epoch(self._epoch)


class _EpochForwardingSampler(ResumableSampler):
    """The cached loader's sampler: Lightning calls ``set_epoch`` on it every epoch, and the epoch
    must reach the dataset too (it seeds the superpatch locations) before the workers start."""

    def __init__(self, inner: DistributedSampler, dataset: CachedPatchDataset) -> None:  # noqa: D107
        self.__dict__.update(inner.__dict__)
        self.inner = inner
        self.cached_dataset = dataset

    def __iter__(self):
        return iter(self.inner)

    def __len__(self) -> int:
        return len(self.inner)

    def skip_once(self, count: int) -> None:
        self.inner.skip_once(count)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.inner.set_epoch(epoch)
        self.cached_dataset.set_epoch(epoch)


def _silence_worker_warning(name: str) -> None:
    """The batch loaders have 0 workers by design (the queue has its own); Lightning's advice to
    add workers would be wrong here."""
    warnings.filterwarnings("ignore", message=f"The '{name}' does not have many workers")
