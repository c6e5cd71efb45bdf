"""The one LightningDataModule: a folder of 3D CT/MRI volumes -> batches of superpatches.

It validates its settings, lists and splits the subjects, and hands everything that depends on how
volumes are read to one back-end (:mod:`maesil.data.backends`): the TorchIO queue over the source
files, or a prepared cache. Methods read what they need from :attr:`VolumeDataModule.spec`.
"""

from __future__ import annotations

import logging
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torchio as tio
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from maesil.data.backends import Backend, CacheBackend, LoaderSettings, QueueBackend
from maesil.data.cache import is_cache
from maesil.data.checks import check_records, raise_on_errors
from maesil.data.grid import grid_patches
from maesil.data.io import read_volume, subject_from_record
from maesil.data.manifest import declared_classes
from maesil.data.preprocess import PreprocessSettings, padding_value
from maesil.data.sampling import is_distributed
from maesil.data.records import DataError, SubjectRecord
from maesil.data.sources import DEFAULT_EXCLUDE
from maesil.data.spec import DataSpec
from maesil.data.splits import split_by_manifest
from maesil.data.tasks import PatchTask, get_task, task_options
from maesil.data.views import ViewSettings  # also registers the task "two_view"
from maesil.shapes import as_triple

__all__ = ["VolumeDataModule"]

log = logging.getLogger(__name__)


class VolumeDataModule(L.LightningDataModule):
    """Patches of 3D CT/MRI volumes for self-supervised pretraining and segmentation.

    Every batch is a dict: ``image`` float32 (B, 1, X, Y, Z) in RAS (Z axial), ``subject_id``
    list[str], ``location`` int64 (B, 6) (patch bounds i0, j0, k0, i1, j1, k1 in the
    preprocessed volume) and, for ``task="segment"``, ``label`` int64 (B, 1, X, Y, Z); for
    ``task="two_view"``, two augmented views and their geometry (``view1``, ``view2``, ``box1``,
    ``box2``, ``flip1``, ``flip2``, ``overlap``; see :mod:`maesil.data.views`).
    Training draws ``samples_per_volume`` random patches from each volume, placed by the task's
    sampling policy (:mod:`maesil.data.sampling`), through a ``tio.Queue`` or from a prepared
    cache (``cache_dir``); validation covers every voxel of every validation volume exactly once
    with a non-overlapping grid.

    Whole volumes: for tasks with ``whole_volume_evaluation`` (``"segment"``), validation and
    test batches are instead one whole preprocessed volume each (:meth:`whole_volumes`,
    :func:`~maesil.data.collate.collate_volumes`): ``image`` (1, C, X, Y, Z), ``label``
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
    sampler each epoch, which reaches the subject order and the superpatch locations;
    :meth:`set_epoch` does the same by hand. Whole-volume validation/test
    loaders shard subjects with ``DistributedSampler(shuffle=False)``, which repeats a few
    subjects so that every rank gets as many: per-volume scores should be de-duplicated by
    ``subject_id`` when gathered (:class:`~maesil.evaluation.segmentation.SegmentationScoreboard`
    does). The predict loader shards without repetition.

    Resuming: :meth:`state_dict` saves the epoch and the training batches already used in it, counted
    in :meth:`on_before_batch_transfer` (so the DataModule's implementation of that hook is the one
    Lightning runs), and ``--ckpt_path`` continues the epoch there instead of restarting it.

    The batch loaders of the queue and of in-memory validation volumes have 0 workers by design
    (``tio.Queue`` has its own); Lightning's advice to add workers does not apply to them.

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
        cache_format: how ``prepare_data`` stores the cache's volumes: ``"npy"`` (uncompressed
            float32, memory-mapped) or ``"blosc2"`` (chunked and compressed, CT quantised to 0.1 HU,
            about 4x smaller; :mod:`~maesil.data.cache.volumes`). A cache is read in whatever format
            it holds.
        prepare_data_per_node: Lightning's switch for multi-node jobs. ``False`` (default): the data
            (cache, phantoms) lie on a file system all nodes share, so ``prepare_data`` runs once for the
            whole job, on global rank 0, and every rank of every node waits for it. ``True``: each node
            prepares its own copy (node-local ``cache_dir``), on its local rank 0.
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
        cache_format: Literal["npy", "blosc2"] = "npy",
        prepare_data_per_node: bool = False,
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
        if num_classes is not None and int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.data_dir = data_dir
        self.task_name = task
        self.modality = modality
        self._superpatch_size = as_triple(superpatch_size, "superpatch_size")
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
        if cache_format not in ("npy", "blosc2"):
            raise ValueError(f"cache_format must be 'npy' or 'blosc2', got {cache_format!r}")
        self.cache_format = cache_format
        self.prepare_data_per_node = bool(prepare_data_per_node)
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
        self.predict_records: list[SubjectRecord] = []
        self._backend: Backend | None = None
        self._setup_key: tuple | None = None
        self._predict_backend: Backend | None = None
        self._predict_key: tuple | None = None
        self._val_patches: Dataset | None = None
        self._test_patches: Dataset | None = None
        self._whole_volumes: dict[str, list[tio.Subject]] = {}
        self._epoch = 0
        self._resume_position: dict[str, Any] | None = None
        self._batches_used = (0, 0)  # (epoch, training batches of that epoch handed to the model)

    # ---------------------------------------------------------------- properties
    @property
    def superpatch_size(self) -> tuple[int, int, int]:
        """Patch size (X, Y, Z) in voxels of every training and validation sample."""
        return self._superpatch_size

    @property
    def spec(self) -> DataSpec:
        """What methods may know about the data (:class:`~maesil.data.spec.DataSpec`): the task and how
        the volumes are preprocessed; ``num_classes`` is the declared one (``num_classes`` or a
        manifest's classes), ``None`` when nothing declares it."""
        classes = self.label_classes()
        return DataSpec(
            task=self.task_name,
            modality=self.modality,
            superpatch_size=self.superpatch_size,
            target_spacing=self.settings.target_spacing,
            hu_window=self.settings.hu_window,
            num_classes=max(classes) + 1 if classes else None,
            batch_size=self.batch_size,
        )

    @property
    def resolved_data_dir(self) -> Path:
        """The folder actually read: ``data_dir`` or, if ``None``, ``phantom_dir``."""
        return Path(self.data_dir if self.data_dir is not None else self.phantom_dir).expanduser()

    def preprocessing(self) -> tio.Compose:
        """The per-volume preprocessing (canonical, resample, intensity, pad to the patch)."""
        return self.settings.transform(min_shape=self.superpatch_size)

    def label_classes(self) -> list[int] | None:
        """The declared label values: ``range(num_classes)``, else a JSON manifest's, else ``None``."""
        if self.num_classes is not None:
            return list(range(self.num_classes))
        return declared_classes(self.resolved_data_dir)

    # ---------------------------------------------------------------- back-end
    def _make_backend(self) -> Backend:
        """The back-end these settings call for: the cache when ``data_dir`` is one or ``cache_dir`` is
        set, else the TorchIO queue over the source files."""
        data_dir = self.resolved_data_dir
        settings = LoaderSettings(
            data_dir=data_dir, task=self.task, preprocess=self.settings, superpatch_size=self.superpatch_size,
            batch_size=self.batch_size, samples_per_volume=self.samples_per_volume, num_workers=self.num_workers,
            seed=self.split_seed, exclude=self.exclude, classes=self.label_classes(), check_voxels=self.check_voxels,
            cache_format=self.cache_format,
        )
        if is_cache(data_dir):
            return CacheBackend(settings, data_dir, source_dir=None)
        if self.cache_dir is not None:
            return CacheBackend(settings, Path(self.cache_dir), source_dir=data_dir)
        return QueueBackend(settings, self.queue_length)

    def _make_subject(self, record: SubjectRecord) -> tio.Subject:
        """The lazily read source subject of ``record`` (labels when the task needs them)."""
        return subject_from_record(record, with_label=self.task.requires_labels)

    # ---------------------------------------------------------------- lightning hooks
    def prepare_data(self) -> None:
        """Once per job (global rank 0; per node with ``prepare_data_per_node``), via Lightning, which
        makes every rank wait for it: write the demo phantoms when ``data_dir`` is ``None``, and prepare
        the cache when ``cache_dir`` is set (idempotent: unchanged subjects are skipped)."""
        if self.data_dir is None:
            from maesil.phantoms import default_workers, write_phantoms

            log.info("data_dir is None: writing %d demo phantoms to %s", self.phantom_count, self.phantom_dir)
            write_phantoms(self.phantom_dir, count=self.phantom_count, workers=default_workers(self.phantom_count))
        self._make_backend().prepare()

    def setup(self, stage: str | None = None) -> None:
        """Discover and check all subjects (every problem in one ``DataError``), split them and
        pick the back-end. Idempotent. Reads the cache when ``data_dir`` is one or
        ``cache_dir`` is set (call ``prepare_data`` first, as Lightning does).

        ``stage="predict"`` only lists the images to predict (:meth:`setup_predict`): labels are
        neither needed nor read, and there is no split."""
        if stage == "predict":
            self.setup_predict()
            return
        data_dir = self.resolved_data_dir
        if self.data_dir is None and not data_dir.exists():
            self.prepare_data()
        key = (str(data_dir), is_cache(data_dir), self.cache_dir, self.exclude, self.task_name, self.val_fraction,
               self.split_seed)
        if self._setup_key == key:
            return
        self._val_patches = self._test_patches = None
        self._whole_volumes = {}
        self._backend = self._make_backend()
        records = self._backend.subjects()
        self.train_records, self.val_records, self.test_records = split_by_manifest(
            records, self.val_fraction, self.split_seed)
        log.info("%d subjects: %d train, %d val (%s)%s", len(records), len(self.train_records),
                 len(self.val_records), ", ".join(r.subject_id for r in self.val_records),
                 f", {len(self.test_records)} test" if self.test_records else "")
        self._setup_key = key

    def _require_setup(self) -> Backend:
        if self._setup_key is None or self._backend is None:
            raise RuntimeError("call setup() before requesting a dataloader")
        return self._backend

    def train_dataloader(self) -> DataLoader:
        """Batches from a DDP-aware ``tio.Queue`` (the DataLoader itself has 0 workers), or from the
        cache: a plain DataLoader with ``num_workers`` workers over random superpatch reads."""
        backend = self._require_setup()
        return backend.train_loader(self.train_records, self._epoch, skip=self._resume_skip())

    # ---------------------------------------------------------------- resuming
    def state_dict(self) -> dict[str, Any]:
        """The data position, saved in every checkpoint: the epoch and the training batches already
        used in it, so that ``--ckpt_path last`` continues the epoch instead of restarting it."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit":
            return {}
        epoch, used = self._batches_used
        return {"epoch": int(trainer.current_epoch), "batches_in_epoch": used if epoch == trainer.current_epoch else 0,
                "batch_size": int(self.batch_size)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Remembers a checkpoint's data position for the next :meth:`train_dataloader`, and its epoch:
        the training loader is built before Lightning starts the resumed epoch, and its subject order and
        superpatch locations depend on the epoch."""
        self._resume_position = dict(state_dict) if state_dict else None
        if self._resume_position and "epoch" in self._resume_position:
            self._epoch = int(self._resume_position["epoch"])
            self._batches_used = (self._epoch, int(self._resume_position.get("batches_in_epoch", 0)))

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Counts the training batches of the current epoch (for :meth:`state_dict`); the batch is unchanged."""
        trainer = self.trainer
        if trainer is not None and trainer.training:
            epoch, used = self._batches_used
            self._batches_used = (trainer.current_epoch, used + 1 if epoch == trainer.current_epoch else 1)
        return batch

    def _resume_skip(self) -> int:
        """How many superpatches the first pass of a resumed run's training loader skips: those the
        checkpointed run already used in this epoch (0 when not resuming, or resuming another epoch).

        With a prepared cache the resumed epoch continues at the exact superpatch (locations are seeded
        by epoch and index). With the TorchIO queue it continues after the last whole subject used
        (patches of a subject still in the queue at the checkpoint are drawn again).
        """
        position, self._resume_position = self._resume_position, None
        if not position or position.get("epoch") != self._epoch:
            return 0
        samples = int(position.get("batches_in_epoch", 0)) * int(position.get("batch_size", self.batch_size))
        if samples > 0:
            log.info("resuming epoch %d after %d training batches (%d superpatches already used)",
                     self._epoch, position["batches_in_epoch"], samples)
        return samples

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle the training subject order and redraw the superpatch locations for ``epoch``
        (Lightning already does this through the training loader's sampler)."""
        self._epoch = int(epoch)
        if self._backend is not None:
            self._backend.set_epoch(self._epoch)

    # ---------------------------------------------------------------- validation and test
    def whole_volumes(self, split: Literal["val", "test"]) -> list[tio.Subject]:
        """The whole preprocessed volumes of ``split`` (labels included when the task needs them),
        preprocessed once and kept in memory (validation runs many times), from the cache or the
        files like :meth:`val_patches`. Volumes smaller than a superpatch are padded up to it, as
        for training.

        Raises:
            DataError: when the task needs labels and a subject of ``split`` has none (a
                manifest's test subjects may have no label: predict them instead).
        """
        backend = self._require_setup()
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
            self._whole_volumes[split] = backend.whole_volumes(records)
        return self._whole_volumes[split]

    def val_patches(self) -> Dataset:
        """Non-overlapping grid patches of the validation volumes, preprocessed once and kept
        in memory (validation runs many times; volumes are small after resampling)."""
        backend = self._require_setup()
        if self._val_patches is None:
            self._val_patches = grid_patches(backend.whole_volumes(self.val_records), self.superpatch_size,
                                             padding_value(self.modality))
        return self._val_patches

    def test_patches(self) -> Dataset:
        """Grid patches of the test subjects (manifest ``split: test``), like :meth:`val_patches`."""
        backend = self._require_setup()
        if self._test_patches is None:
            self._test_patches = grid_patches(backend.whole_volumes(self.test_records), self.superpatch_size,
                                              padding_value(self.modality))
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
            return self._volume_dataloader(self.whole_volumes("val"))
        return self._grid_dataloader(self.val_patches())

    def test_dataloader(self) -> DataLoader | list:
        """For ``python -m maesil test``: the manifest's ``test`` subjects as a whole-volume grid, or,
        when there are none (a folder has no test split), the validation subjects."""
        self._require_setup()
        if not self.test_records:
            return self.val_dataloader()
        if self.task.whole_volume_evaluation:
            return self._volume_dataloader(self.whole_volumes("test"))
        return self._grid_dataloader(self.test_patches())

    def _volume_dataloader(self, subjects: list[tio.Subject]) -> DataLoader:
        """One whole in-memory volume per batch; sharded (with repeats) over ranks when distributed."""
        return DataLoader(
            subjects,  # type: ignore[arg-type]
            batch_size=1,
            shuffle=False,
            sampler=DistributedSampler(subjects, shuffle=False) if is_distributed() else None,
            num_workers=0,  # in memory already
            collate_fn=self.task.volume_collate,
            pin_memory=False,  # pinning would rebuild the tio.Subject dicts of the batch
        )

    def _grid_dataloader(self, patches: Dataset) -> DataLoader:
        return DataLoader(
            patches,
            batch_size=self.val_batch_size,
            shuffle=False,
            sampler=DistributedSampler(patches, shuffle=False) if is_distributed() else None,
            num_workers=0,  # patches are in memory already
            collate_fn=self.task.val_collate,
            pin_memory=torch.cuda.is_available(),
        )

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
        backend = self._make_backend()
        records = backend.predict_records()
        problems = check_records(records, target_spacing=self.target_spacing, read_voxels=self.check_voxels,
                                 workers=max(2, self.num_workers))
        raise_on_errors(problems, what=f"data of {data_dir}")
        self.predict_records = records
        self._predict_backend = backend
        self._predict_key = key
        log.info("%d image(s) to predict in %s", len(records), data_dir)

    def predict_dataloader(self) -> DataLoader:
        """Every image of ``data_dir``, preprocessed as for training, one whole volume per batch
        (:func:`~maesil.data.collate.collate_volumes` without label, plus ``source``).

        Volumes are read and preprocessed lazily in ``num_workers`` processes, so memory does not
        grow with the number of images. Sharded without repetition over ranks when distributed.
        """
        self.setup_predict()
        assert self._predict_backend is not None
        return self._predict_backend.predict_loader(self.predict_records)

    def source_image(self, subject_id: str) -> tio.ScalarImage:
        """The original (unpreprocessed) image of a subject, lazily read with the project's reader:
        the target grid of :func:`~maesil.evaluation.segmentation.to_original_geometry`."""
        records: dict[str, SubjectRecord] = {}
        if self._backend is not None:
            records = {r.subject_id: self._backend.source_record(r)
                       for r in (*self.train_records, *self.val_records, *self.test_records)}
        records.update((r.subject_id, r) for r in self.predict_records)
        try:
            record = records[subject_id]
        except KeyError:
            raise KeyError(f"unknown subject {subject_id!r} (call setup() or setup_predict() first)") from None
        return tio.ScalarImage(record.image, reader=partial(read_volume, series_uid=record.series_uid))
