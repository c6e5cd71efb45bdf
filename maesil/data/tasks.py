"""Tasks: what a batch holds for one kind of method, and where its training superpatches are cut.

The DataModule's ``task`` names a registered :class:`PatchTask`: ``"reconstruct"`` and ``"segment"``
here, ``"two_view"`` in :mod:`maesil.data.views`. A task declares whether it needs labels, how its
training superpatches are placed (a :class:`~maesil.data.sampling.SamplingPolicy`, used by both
back-ends), how patches are collated (:mod:`maesil.data.collate` describes the batch keys) and
whether validation and test run on whole volumes. A new task is a subclass registered with
:func:`register_task`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, ClassVar

import torchio as tio

from maesil.data.collate import collate_patches, collate_volumes
from maesil.data.sampling import LabelCentredPolicy, SamplingPolicy, UniformPolicy

__all__ = ["PatchTask", "ReconstructTask", "SegmentTask", "TASKS", "get_task", "register_task", "task_options"]


class PatchTask:
    """What a training/validation batch holds for one kind of method.

    Subclasses set ``name``, ``requires_labels`` and ``whole_volume_evaluation`` and may override
    :meth:`sampling_policy`, :meth:`collate` and :meth:`val_collate`. Instances must be picklable.
    ``whole_volume_evaluation = True`` makes the DataModule validate and test on whole
    preprocessed volumes, one per batch (:func:`~maesil.data.collate.collate_volumes`), instead of a
    patch grid.

    Args:
        label_probabilities: label -> relative probability of being the patch centre (tasks
            sampling around labels only).
    """

    name: ClassVar[str] = ""
    requires_labels: ClassVar[bool] = False
    whole_volume_evaluation: ClassVar[bool] = False

    def __init__(self, label_probabilities: dict[int, float] | None = None) -> None:
        self.label_probabilities = label_probabilities

    def sampling_policy(self) -> SamplingPolicy:
        """Where training superpatches lie (both back-ends draw through it): uniform by default."""
        return UniformPolicy()

    def collate(self, patches: Sequence[tio.Subject | dict[str, Any]]) -> dict[str, Any]:
        return collate_patches(patches, label_key="label" if self.requires_labels else None)

    def val_collate(self, patches: Sequence[tio.Subject | dict[str, Any]]) -> dict[str, Any]:
        return self.collate(patches)

    def volume_collate(self, subjects: Sequence[tio.Subject]) -> dict[str, Any]:
        """Whole-volume batches of validation/test (:func:`collate_volumes`, labels if required)."""
        return collate_volumes(subjects, label_key="label" if self.requires_labels else None)


TASKS: dict[str, type[PatchTask]] = {}


def register_task(cls: type[PatchTask]) -> type[PatchTask]:
    """Class decorator adding a task to :data:`TASKS` under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty `name`")
    TASKS[cls.name] = cls
    return cls


def task_options(name: str) -> frozenset[str]:
    """The keyword options the constructor of task ``name`` takes (e.g. ``label_probabilities``)."""
    try:
        cls = TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}") from None
    parameters = inspect.signature(cls.__init__).parameters.values()
    return frozenset(p.name for p in parameters if p.name != "self"
                     and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def get_task(name: str, **options: Any) -> PatchTask:
    """The registered task ``name``, built with those of ``options`` its constructor takes.

    The DataModule hands every task option it has (``label_probabilities``, ``views`` ...) and warns
    itself about the ones the chosen task ignores (see :func:`task_options`); the others are dropped,
    unless the constructor takes ``**options`` itself.
    """
    accepted = task_options(name)
    cls = TASKS[name]
    if any(p.kind is p.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values()):
        return cls(**options)
    return cls(**{key: value for key, value in options.items() if key in accepted})


@register_task
class ReconstructTask(PatchTask):
    """Masked-reconstruction pretraining: uniformly placed patches, image only."""

    name = "reconstruct"


@register_task
class SegmentTask(PatchTask):
    """Segmentation fine-tuning: patches centred on labelled voxels
    (:class:`~maesil.data.sampling.LabelCentredPolicy` with ``label_probabilities`` or, if ``None``,
    any voxel with label > 0), batches carry the label map. Validation and test are whole volumes
    (``whole_volume_evaluation``): Dice and HD95 are defined per volume and organ, and sliding-window
    inference needs the whole volume with its geometry."""

    name = "segment"
    requires_labels = True
    whole_volume_evaluation = True

    def sampling_policy(self) -> SamplingPolicy:
        return LabelCentredPolicy(self.label_probabilities)
