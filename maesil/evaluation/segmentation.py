"""Whole-volume segmentation inference and its scores.

1. :func:`sliding_window_probabilities` runs a patch model over a whole preprocessed volume:
   ``tio.GridSampler`` partitions it into overlapping patches, the model predicts them in small
   batches on its device, and ``tio.inference.GridAggregator`` blends the per-patch softmax
   probabilities on the CPU (Hann-weighted or plain average), so device memory holds one batch
   of patches only, whatever the volume size.
2. :func:`segmentation_scores` gives per-organ Dice (torchmetrics) and HD95 in mm (MONAI) of one
   volume; :class:`SegmentationScoreboard` averages them over volumes, skipping undefined values.
3. :func:`to_original_geometry` maps the probabilities of a preprocessed volume back onto the
   original image's voxel grid (undoing reorientation, resampling, foreground crop and padding,
   which TorchIO all keep in physical space) and :func:`write_label_map` writes the result.

Edge-case conventions (those of nnU-Net's evaluation for Dice):

* **Dice** of a class absent from both prediction and target is ``NaN`` and is left out of every
  mean (there is nothing to segment, so neither 0 nor 1 would be honest). A class predicted but
  absent from the target (or the reverse) has Dice 0.
* **HD95** is only defined when both prediction and target contain the class. Absent from both:
  ``NaN``, left out. Present on one side only (a missed or a spurious organ): also ``NaN`` and left
  out of the mean, because no finite distance exists, but counted (``hd95_one_sided``) and shown
  next to the mean, which is otherwise optimistic about such failures; Dice (0) penalises them.

Example:
    >>> import torch
    >>> image = torch.rand(1, 20, 18, 9)
    >>> predict = lambda x: torch.cat([x, 1 - x], dim=1)  # (B, 1, ...) -> two-class logits
    >>> probs = sliding_window_probabilities(predict, image, superpatch_size=(8, 8, 8))
    >>> probs.shape
    torch.Size([2, 20, 18, 9])
    >>> scores = segmentation_scores(probs.argmax(0), probs.argmax(0), 2, spacing=(1.0, 1.0, 2.0))
    >>> float(scores["dice"][0]), float(scores["hd95"][0])
    (1.0, 0.0)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
import torch
import torchio as tio
from monai.metrics import compute_hausdorff_distance
from torch import Tensor
from torchmetrics.functional.segmentation import dice_score

from maesil.shapes import as_triple

__all__ = [
    "SegmentationScoreboard",
    "grid_overlap",
    "segmentation_scores",
    "sliding_window_probabilities",
    "to_original_geometry",
    "write_label_map",
]


# --------------------------------------------------------------------------------------------
# Sliding-window inference
# --------------------------------------------------------------------------------------------


def grid_overlap(superpatch_size: int | Sequence[int], overlap: float) -> tuple[int, int, int]:
    """Overlap in voxels between neighbouring grid patches, for a fraction ``overlap`` of the patch
    (``superpatch_size``, the cube the model takes).

    ``tio.GridSampler`` needs an even overlap smaller than the patch along every axis, so the
    fraction is rounded to the nearest even number of voxels (and lowered by 2 if it reaches the
    patch size). ``grid_overlap(96, 0.5) == (48, 48, 48)``; ``grid_overlap((15, 3, 1), 0.5) ==
    (8, 2, 0)``.
    """
    if not 0.0 <= float(overlap) < 1.0:
        raise ValueError(f"overlap must be a fraction in [0, 1), got {overlap}")
    result = []
    for size in as_triple(superpatch_size, "superpatch_size"):
        voxels = 2 * int(math.floor(float(overlap) * size / 2 + 0.5))
        while voxels >= size:
            voxels -= 2
        result.append(max(0, voxels))
    return tuple(result)  # type: ignore[return-value]


@torch.no_grad()
def sliding_window_probabilities(
    predict_fn: Callable[[Tensor], Tensor],
    image: tio.ScalarImage | Tensor,
    superpatch_size: int | tuple[int, int, int],
    overlap: float = 0.5,
    blend: Literal["hann", "average"] = "hann",
    batch_size: int = 2,
    device: torch.device | str = "cpu",
    padding_value: float = 0.0,
) -> Tensor:
    """Softmax probabilities of a whole volume, predicted patch by patch.

    The volume is padded (centred, with ``padding_value``) along any axis shorter than the patch,
    partitioned by ``tio.GridSampler`` with :func:`grid_overlap` voxels of overlap, predicted
    ``batch_size`` patches at a time on ``device`` under ``torch.no_grad()``, and blended by
    ``tio.inference.GridAggregator`` on the CPU; the padding is cropped off again.

    The softmax is taken per patch, *before* blending: overlapping patches are blended as
    probabilities, which are comparable between patches, whereas logits have a per-patch scale
    (one confident patch with large logits would dominate an average of logits, and averaging
    logits is not an average of the patches' predictions). The blend of probabilities is again a
    probability distribution at every voxel.

    Args:
        predict_fn: maps a (B, C, *superpatch_size) float32 batch on ``device`` to logits
            (B, K, *superpatch_size), e.g. ``model`` (put it in eval mode first) or a wrapper with
            autocast. Logits are converted to float32.
        image: the preprocessed volume, a ``tio.ScalarImage`` or a (C, X, Y, Z) tensor (on any
            device; it is partitioned on the CPU).
        superpatch_size: the cube the model takes, in voxels (X, Y, Z).
        overlap: fraction of the patch shared by neighbouring patches, in [0, 1).
        blend: ``"hann"`` weights each patch by a Hann window (patch borders, where the model saw
            least context, count least; no seams); ``"average"`` weights all voxels equally.
        batch_size: patches per forward pass (device memory scales with it).
        device: where ``predict_fn`` runs.
        padding_value: intensity used to pad volumes smaller than the patch (0 = air for
            windowed CT; the volume minimum for z-normalised MRI).

    Returns:
        float32 (K, X, Y, Z) probabilities on the CPU, with exactly the input's spatial shape and
        voxel grid (wrap it with the input's affine).
    """
    if blend not in ("hann", "average"):
        raise ValueError(f"blend must be 'hann' or 'average', got {blend!r}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    patch = as_triple(superpatch_size, "superpatch_size")
    patch_overlap = grid_overlap(patch, overlap)
    if isinstance(image, tio.Image):
        data, affine = image.data, image.affine
    else:
        data, affine = torch.as_tensor(image), np.eye(4)
    if data.ndim != 4:
        raise ValueError(f"expected a (C, X, Y, Z) volume, got shape {tuple(data.shape)}")
    data = data.detach().to("cpu", torch.float32)
    shape = tuple(int(s) for s in data.shape[1:])
    padding = []
    for size, p in zip(shape, patch):
        missing = max(0, p - size)
        padding += [missing // 2, missing - missing // 2]
    subject = tio.Subject(image=tio.ScalarImage(tensor=data, affine=affine))
    if any(padding):
        subject = tio.Pad(tuple(padding), padding_mode=float(padding_value))(subject)
    padded = subject["image"].data

    sampler = tio.GridSampler(subject, patch_size=patch, patch_overlap=patch_overlap)
    aggregator = tio.inference.GridAggregator(sampler, overlap_mode=blend)
    locations = torch.as_tensor(np.asarray(sampler.locations), dtype=torch.long)
    device = torch.device(device)
    for start in range(0, len(locations), int(batch_size)):
        batch_locations = locations[start:start + int(batch_size)]
        # Patches are sliced from the (CPU) volume directly: the same boxes as sampler[i], without
        # building one tio.Subject per patch.
        patches = torch.stack([padded[:, i0:i1, j0:j1, k0:k1] for i0, j0, k0, i1, j1, k1 in batch_locations.tolist()])
        logits = predict_fn(patches.to(device))
        expected = (patches.shape[0], *patch)
        if logits.ndim != 5 or (logits.shape[0], *logits.shape[2:]) != expected:
            raise ValueError(f"predict_fn returned shape {tuple(logits.shape)} for a batch of shape "
                             f"{tuple(patches.shape)}; expected (B, K, *superpatch_size) = "
                             f"({expected[0]}, K, {', '.join(map(str, patch))})")
        probabilities = torch.softmax(logits.float(), dim=1)
        aggregator.add_batch(probabilities.cpu(), batch_locations)
    output = aggregator.get_output_tensor().to(torch.float32)
    if any(padding):
        x0, _, y0, _, z0, _ = padding
        output = output[:, x0:x0 + shape[0], y0:y0 + shape[1], z0:z0 + shape[2]]
    return output.contiguous()


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


def _check_label_volume(volume: Tensor, name: str, num_classes: int) -> Tensor:
    volume = torch.as_tensor(volume).detach()
    if volume.ndim != 3:
        raise ValueError(f"{name} must be an (X, Y, Z) label volume, got shape {tuple(volume.shape)}")
    if torch.is_floating_point(volume) or volume.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer labels, got {volume.dtype}")
    if volume.numel() and (int(volume.min()) < 0 or int(volume.max()) >= num_classes):
        raise ValueError(f"{name} has labels in [{int(volume.min())}, {int(volume.max())}], outside "
                         f"0..{num_classes - 1} (num_classes={num_classes})")
    return volume


def segmentation_scores(
    prediction: Tensor,
    target: Tensor,
    num_classes: int,
    spacing: tuple[float, float, float],
) -> dict[str, Tensor]:
    """Per foreground class Dice and HD95 (mm) of one volume.

    Dice comes from ``torchmetrics.functional.segmentation.dice_score``, HD95 from MONAI's
    ``compute_hausdorff_distance(percentile=95, spacing=spacing)`` (symmetric, on the masks'
    surfaces), both one binary class at a time so that memory stays at two boolean volumes.
    Undefined values are ``NaN`` (see the module docstring for the conventions).

    Args:
        prediction: predicted labels (X, Y, Z), integers in ``0..num_classes-1``.
        target: reference labels, same shape.
        num_classes: number of classes including the background 0.
        spacing: voxel size in mm (X, Y, Z), so HD95 is in mm.

    Returns:
        float32 ``"dice"`` and ``"hd95"`` of shape (num_classes - 1,) (entry ``c - 1`` is class
        ``c``), and bool ``"target_present"`` / ``"prediction_present"`` (same shape), which tell
        why a value is undefined.
    """
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2 (background and one class), got {num_classes}")
    num_classes = int(num_classes)
    prediction = _check_label_volume(prediction, "prediction", num_classes)
    target = _check_label_volume(target, "target", num_classes).to(prediction.device)
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or any(not s > 0 for s in spacing):
        raise ValueError(f"spacing must be 3 positive numbers (mm), got {spacing}")
    classes = num_classes - 1
    dice = torch.full((classes,), float("nan"), dtype=torch.float32)
    hd95 = torch.full((classes,), float("nan"), dtype=torch.float32)
    target_present = torch.zeros(classes, dtype=torch.bool)
    prediction_present = torch.zeros(classes, dtype=torch.bool)
    for c in range(1, num_classes):
        pred_mask = (prediction == c)[None, None].to(torch.uint8)
        true_mask = (target == c)[None, None].to(torch.uint8)
        in_pred, in_true = bool(pred_mask.any()), bool(true_mask.any())
        prediction_present[c - 1], target_present[c - 1] = in_pred, in_true
        if not (in_pred or in_true):
            continue  # absent from both: Dice and HD95 undefined (NaN)
        dice[c - 1] = dice_score(pred_mask, true_mask, num_classes=1, include_background=True, average="none",
                                 input_format="one-hot").reshape(()).float().cpu()
        if in_pred and in_true:
            with warnings.catch_warnings():  # MONAI 1.5+ warns about an argument it passes itself
                warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
                hd95[c - 1] = compute_hausdorff_distance(pred_mask.cpu(), true_mask.cpu(), include_background=True,
                                                         percentile=95, spacing=spacing).reshape(()).float()
    return {"dice": dice, "hd95": hd95, "target_present": target_present, "prediction_present": prediction_present}


ClassNames = Mapping[int, str] | Sequence[str] | None


class SegmentationScoreboard:
    """Per-volume, per-class Dice and HD95, and their means over volumes.

    Means skip undefined (NaN) values: a class's mean is over the volumes where it is defined,
    the overall mean is the mean of the class means that are defined (the nnU-Net "foreground
    mean"). :meth:`counts` tells how many values each mean rests on.

    Under DDP the validation loader repeats a few subjects to even out the ranks: gather the
    boards (e.g. ``torch.distributed.all_gather_object``) and :meth:`merge` them; a subject id
    already on the board is not added again.

    Args:
        num_classes: number of classes including the background 0.

    Example:
        >>> board = SegmentationScoreboard(num_classes=3)
        >>> label = torch.zeros(8, 8, 8, dtype=torch.long)
        >>> label[2:5, 2:5, 2:5] = 1
        >>> _ = board.update(label, label, spacing=(1.0, 1.0, 1.0), subject_id="a")
        >>> board.mean()["dice"].item(), board.counts()["absent"].tolist()
        (1.0, [0, 1])
    """

    def __init__(self, num_classes: int) -> None:
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = int(num_classes)
        self.reset()

    def reset(self) -> None:
        """Forget every volume (e.g. at the start of each validation epoch)."""
        self._rows: list[dict[str, Tensor]] = []
        self.subject_ids: list[str | None] = []

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, scores: Mapping[str, Tensor], subject_id: str | None = None) -> bool:
        """Add one volume's :func:`segmentation_scores`; returns ``False`` (and adds nothing) when
        ``subject_id`` is already on the board."""
        if subject_id is not None and subject_id in self.subject_ids:
            return False
        classes = self.num_classes - 1
        row = {}
        for key in ("dice", "hd95", "target_present", "prediction_present"):
            if key not in scores:
                raise KeyError(f"scores lack {key!r} (expected the output of segmentation_scores)")
            value = torch.as_tensor(scores[key]).detach().cpu().reshape(-1)
            if value.numel() != classes:
                raise ValueError(f"scores[{key!r}] has {value.numel()} values, expected {classes} "
                                 f"(num_classes={self.num_classes} minus the background)")
            row[key] = value.to(torch.bool if key.endswith("present") else torch.float32)
        self._rows.append(row)
        self.subject_ids.append(subject_id)
        return True

    def update(self, prediction: Tensor, target: Tensor, spacing: tuple[float, float, float],
               subject_id: str | None = None) -> dict[str, Tensor]:
        """Score one volume (:func:`segmentation_scores`), add it and return its scores."""
        scores = segmentation_scores(prediction, target, self.num_classes, spacing)
        self.add(scores, subject_id)
        return scores

    def merge(self, other: SegmentationScoreboard) -> None:
        """Add the volumes of another board (e.g. another rank's); known subject ids are skipped."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge a board of {other.num_classes} classes into one of {self.num_classes}")
        for row, subject_id in zip(other._rows, other.subject_ids):
            self.add(row, subject_id)

    def values(self) -> dict[str, Tensor]:
        """Every volume's scores stacked: (N, num_classes - 1) per key of :func:`segmentation_scores`."""
        classes = self.num_classes - 1
        out = {}
        for key, dtype in (("dice", torch.float32), ("hd95", torch.float32), ("target_present", torch.bool),
                           ("prediction_present", torch.bool)):
            out[key] = (torch.stack([r[key] for r in self._rows]) if self._rows
                        else torch.empty((0, classes), dtype=dtype))
        return out

    def per_class(self) -> dict[str, Tensor]:
        """Mean ``"dice"`` and ``"hd95"`` of each foreground class over the volumes where it is
        defined, shape (num_classes - 1,); NaN where it never is."""
        values = self.values()
        return {key: _nanmean(values[key], dim=0) for key in ("dice", "hd95")}

    def mean(self) -> dict[str, Tensor]:
        """Overall ``"dice"`` and ``"hd95"``: the mean of the defined class means (scalars)."""
        return {key: _nanmean(value, dim=0) for key, value in self.per_class().items()}

    def counts(self) -> dict[str, Tensor]:
        """Per foreground class (int64, shape (num_classes - 1,)): ``"volumes"`` scored, values
        behind each mean (``"dice"``, ``"hd95"``), ``"hd95_one_sided"`` (class in only one of
        prediction and target: a missed or spurious organ, HD95 undefined) and ``"absent"`` (in
        neither: nothing to score)."""
        values = self.values()
        pred, true = values["prediction_present"], values["target_present"]
        return {
            "volumes": torch.full((self.num_classes - 1,), len(self), dtype=torch.long),
            "dice": (~values["dice"].isnan()).sum(0),
            "hd95": (~values["hd95"].isnan()).sum(0),
            "hd95_one_sided": (pred ^ true).sum(0),
            "absent": (~pred & ~true).sum(0),
        }

    def class_names(self, class_names: ClassNames = None) -> list[str]:
        """Names of the foreground classes 1..K-1: from a mapping label -> name (e.g.
        :data:`maesil.phantoms.ORGAN_LABELS`), a sequence indexed by label (length K) or of the
        foreground classes (length K - 1); ``class_<c>`` where none is given."""
        foreground = range(1, self.num_classes)
        if class_names is None:
            return [f"class_{c}" for c in foreground]
        if isinstance(class_names, Mapping):
            return [str(class_names.get(c, f"class_{c}")) for c in foreground]
        names = [str(n) for n in class_names]
        if len(names) == self.num_classes:
            return names[1:]
        if len(names) == self.num_classes - 1:
            return names
        raise ValueError(f"class_names has {len(names)} names; expected {self.num_classes} (by label value) or "
                         f"{self.num_classes - 1} (foreground classes)")

    def compute(self, class_names: ClassNames = None) -> dict[str, Tensor]:
        """Flat scalars for logging (``self.log_dict``): ``dice/mean``, ``hd95/mean`` and
        ``dice/<class>``, ``hd95/<class>`` per foreground class."""
        names = self.class_names(class_names)
        per_class, mean = self.per_class(), self.mean()
        out = {"dice/mean": mean["dice"], "hd95/mean": mean["hd95"]}
        for i, name in enumerate(names):
            out[f"dice/{name}"] = per_class["dice"][i]
            out[f"hd95/{name}"] = per_class["hd95"][i]
        return out

    def format_table(self, class_names: ClassNames = None) -> str:
        """A plain-text table: per class the mean Dice, mean HD95 (mm) and the counts, then the
        overall mean. Undefined means print as ``-``."""
        names = self.class_names(class_names)
        per_class, mean, counts = self.per_class(), self.mean(), self.counts()
        header = ("class", "Dice", "HD95 mm", "n Dice", "n HD95", "one-sided", "absent")
        rows = []
        for i, name in enumerate(names):
            rows.append((name, _fmt(per_class["dice"][i], 4), _fmt(per_class["hd95"][i], 2),
                         *(str(int(counts[k][i])) for k in ("dice", "hd95", "hd95_one_sided", "absent"))))
        rows.append(("mean", _fmt(mean["dice"], 4), _fmt(mean["hd95"], 2),
                     *(str(int(counts[k].sum())) for k in ("dice", "hd95", "hd95_one_sided", "absent"))))
        widths = [max(len(r[j]) for r in (header, *rows)) for j in range(len(header))]

        def line(cells: Sequence[str]) -> str:
            return "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths)))

        rule = "-" * len(line(header))
        body = [line(r) for r in rows[:-1]]
        return "\n".join([f"{len(self)} volume(s)", line(header), rule, *body, rule, line(rows[-1])])


def _nanmean(values: Tensor, dim: int) -> Tensor:
    """Mean over ``dim`` ignoring NaN; NaN (without a warning) where every value is NaN or none exist."""
    if values.shape[dim] == 0:
        shape = list(values.shape)
        del shape[dim]
        return torch.full(shape, float("nan"), dtype=torch.float32)
    return torch.nanmean(values.double(), dim=dim).float()


def _fmt(value: Tensor, digits: int) -> str:
    value = float(value)
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


# --------------------------------------------------------------------------------------------
# Back to the input geometry
# --------------------------------------------------------------------------------------------


def to_original_geometry(probabilities: Tensor, subject: tio.Subject, source_image: tio.ScalarImage) -> tio.LabelMap:
    """Label map on the original image's voxel grid from probabilities of the preprocessed volume.

    Preprocessing (canonical orientation, resampling, foreground crop, padding) changes the voxel
    grid but every step keeps the affine exact, so the probabilities, placed in physical space with
    the preprocessed affine, are resampled (linear interpolation, one class at a time to bound
    memory) onto the grid of ``source_image`` and the most probable class is taken. Points of the
    original grid outside the preprocessed volume (cropped-off air) get probability 0 for every
    class, hence the background 0. Interpolating probabilities rather than labels gives smooth
    organ borders when the original grid is finer.

    Args:
        probabilities: float (K, X, Y, Z) class probabilities (or any per-class scores) on the grid
            of ``subject["image"]``, e.g. from :func:`sliding_window_probabilities`.
        subject: the preprocessed subject the probabilities belong to (its ``image`` gives the affine).
        source_image: the original image (e.g. ``VolumeDataModule.source_image(subject_id)``); only
            its shape and affine are used.

    Returns:
        A ``tio.LabelMap`` with exactly ``source_image``'s spatial shape and affine (uint8 labels,
        int32 above 255 classes).
    """
    probabilities = torch.as_tensor(probabilities).detach()
    name = str(subject.get("subject_id", "?"))
    if probabilities.ndim != 4:
        raise ValueError(f"subject {name}: probabilities must be (K, X, Y, Z), got shape {tuple(probabilities.shape)}")
    image = subject["image"]
    if tuple(probabilities.shape[1:]) != tuple(image.spatial_shape):
        raise ValueError(f"subject {name}: probabilities of shape {tuple(probabilities.shape[1:])} do not match "
                         f"the preprocessed image {tuple(image.spatial_shape)}")
    target_shape = tuple(int(s) for s in source_image.spatial_shape)
    target_affine = np.asarray(source_image.affine, dtype=np.float64)
    resample = tio.Resample((target_shape, target_affine), image_interpolation="linear", copy=False)
    best: Tensor | None = None
    labels = torch.zeros(target_shape, dtype=torch.int32)
    for k in range(probabilities.shape[0]):
        channel = tio.ScalarImage(tensor=probabilities[k:k + 1].to("cpu", torch.float32).clone(), affine=image.affine)
        resampled = resample(channel).data[0].to(torch.float32)
        if tuple(resampled.shape) != target_shape:
            raise RuntimeError(f"subject {name}: resampling gave shape {tuple(resampled.shape)},"
                               f" expected {target_shape}")
        if best is None:
            best = resampled
            continue
        better = resampled > best  # ties keep the lower class, so all-zero (outside) is background
        labels[better] = k
        best = torch.where(better, resampled, best)
    dtype = torch.uint8 if probabilities.shape[0] <= 256 else torch.int32
    return tio.LabelMap(tensor=labels[None].to(dtype), affine=target_affine.copy())


def write_label_map(label: tio.LabelMap, path: str | Path) -> Path:
    """Write a label map as NIfTI (``.nii.gz`` or ``.nii``) with its affine as sform and qform.

    Labels are stored as uint8 when they fit (else int16 / int32), so viewers and evaluation tools
    read them as integers. Parent folders are created. Returns the path.
    """
    path = Path(path)
    if not path.name.lower().endswith((".nii.gz", ".nii")):
        raise ValueError(f"{path}: label maps are written as NIfTI; use a .nii.gz (or .nii) name")
    data = label.data
    if data.ndim != 4 or data.shape[0] != 1:
        raise ValueError(f"{path}: expected a single-channel label map, got shape {tuple(data.shape)}")
    array = data[0].cpu().numpy()
    if array.dtype.kind == "f":
        if not np.all(np.mod(array, 1) == 0):
            raise ValueError(f"{path}: label map holds non-integer values")
    low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
    for dtype in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            break
    affine = np.asarray(label.affine, dtype=np.float64)
    image = nib.Nifti1Image(array.astype(dtype), affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    image.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path
