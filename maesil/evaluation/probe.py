"""A light probe on frozen encoder features: how well do a pretrained encoder's features separate organs?

:func:`linear_probe` takes the feature maps (B, C, x, y, z) of labelled superpatches and their label maps
(B, X, Y, Z) at full resolution, fits a linear classifier per feature voxel on the probe-train superpatches and
scores it on the probe-test superpatches:

* **Targets**: the labels pooled to the feature grid as class fractions (the average of the one-hot labels over
  the voxels a feature voxel covers, :func:`label_fractions`), so the probe is fitted at the features' own
  resolution with soft targets at organ borders, and never needs the features upsampled to every voxel.
* **Classifier**: multinomial logistic regression (soft cross-entropy plus a small L2 penalty) on features
  whitened with the training statistics, fitted by full-batch L-BFGS (:func:`fit_probe`). Whitening makes the fit
  well conditioned whatever the encoder's feature scales and correlations, so a few tens of iterations converge
  and the score reflects the features rather than the optimiser. It starts at zero and draws no random
  number, so the same features always give the same probe.
* **Prediction**: the test logits upsampled trilinearly to the label resolution, then the most likely class.
* **Score**: Dice per foreground class pooled over all test superpatches (from torchmetrics' confusion matrix,
  the values of its ``dice_score`` that :mod:`maesil.evaluation.segmentation` uses): NaN for a class in neither
  prediction nor target, 0 for a class on one side only (the conventions of that module); the mean skips NaN.

The feature maps come from each method's ``probe_features``; :func:`token_feature_map` (ViT tokens) and
:func:`mid_and_deepest` (convolutional encoders) build them. :func:`probe_figure` draws one test superpatch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor, nn
from torchmetrics.functional.classification import multiclass_confusion_matrix

from maesil.evaluation.figures import VIEWS, orthogonal_slices, plt

__all__ = [
    "ProbeHead",
    "ProbeResult",
    "fit_probe",
    "label_fractions",
    "linear_probe",
    "mid_and_deepest",
    "predict_labels",
    "probe_dice",
    "probe_figure",
    "stage_outputs",
    "token_feature_map",
    "whitening",
]


# --------------------------------------------------------------------------------------------
# Feature maps
# --------------------------------------------------------------------------------------------


def token_feature_map(tokens: Tensor, grid: Sequence[int]) -> Tensor:
    """ViT tokens ``(B, N, D)`` in grid order (z fastest, as :func:`maesil.models.vit3d.patchify` orders them)
    → a feature map ``(B, D, gx, gy, gz)``."""
    gx, gy, gz = (int(g) for g in grid)
    if tokens.ndim != 3 or tokens.shape[1] != gx * gy * gz:
        raise ValueError(f"tokens of shape {tuple(tokens.shape)} do not fill the token grid {(gx, gy, gz)}")
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], gx, gy, gz)


def stage_outputs(blocks: Iterable[nn.Module], x: Tensor) -> list[Tensor]:
    """The output of every block of a sequential encoder applied to ``x``, in order."""
    outputs = []
    for block in blocks:
        x = block(x)
        outputs.append(x)
    return outputs


def mid_and_deepest(stages: Sequence[Tensor]) -> Tensor:
    """The probe features of a convolutional encoder: a middle stage and the deepest one, upsampled
    (trilinearly) to the middle stage's grid, concatenated along channels.

    ``stages`` are the encoder's outputs from finest to coarsest; of consecutive outputs at one resolution the
    last counts. The middle stage is number ``len // 2`` of the resolutions (stride 4 of the 4-stage CPU U-Net,
    stride 8 of ResEnc-L and of the autoencoders): fine enough for a voxel probe to find small organs, which the
    deepest stage alone (stride 8 to 32) is too coarse for, and far enough from the input that the probe reads
    what pretraining learnt rather than raw intensities. The deepest stage adds the most abstract features.
    """
    levels: list[Tensor] = []
    for output in stages:
        if output.ndim != 5:
            raise ValueError(f"encoder stages must be (B, C, x, y, z), got shape {tuple(output.shape)}")
        if levels and levels[-1].shape[2:] == output.shape[2:]:
            levels[-1] = output
        else:
            levels.append(output)
    if not levels:
        raise ValueError("no encoder stage to probe")
    middle, deepest = levels[len(levels) // 2], levels[-1]
    if deepest is middle:
        return middle
    upsampled = F.interpolate(deepest, size=middle.shape[2:], mode="trilinear", align_corners=False)
    return torch.cat([middle, upsampled.to(middle.dtype)], dim=1)


# --------------------------------------------------------------------------------------------
# The probe
# --------------------------------------------------------------------------------------------


def _check_pair(features: Tensor, labels: Tensor, name: str, num_classes: int) -> None:
    if features.ndim != 5:
        raise ValueError(f"{name} features must be (B, C, x, y, z), got shape {tuple(features.shape)}")
    if labels.ndim != 4:
        raise ValueError(f"{name} labels must be (B, X, Y, Z), got shape {tuple(labels.shape)}")
    if features.shape[0] != labels.shape[0] or features.shape[0] == 0:
        raise ValueError(f"{name}: {features.shape[0]} feature maps for {labels.shape[0]} label maps; need the same "
                         "number, at least one")
    if torch.is_floating_point(labels) or labels.dtype == torch.bool:
        raise ValueError(f"{name} labels must be integers, got {labels.dtype}")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"{name} labels lie in [{int(labels.min())}, {int(labels.max())}], outside "
                         f"0..{num_classes - 1} (num_classes={num_classes})")


def label_fractions(labels: Tensor, grid: Sequence[int], num_classes: int) -> Tensor:
    """Label maps ``(B, X, Y, Z)`` pooled to ``grid`` as class fractions ``(B, K, gx, gy, gz)`` (float32): each
    grid voxel holds the share of every class among the label voxels it covers (adaptive average pooling of the
    one-hot labels; the shares sum to 1)."""
    pooled = []
    for label in labels:  # one superpatch at a time: the one-hot volume is K times the label map
        one_hot = F.one_hot(label.long(), num_classes).movedim(-1, 0)[None].float()
        pooled.append(F.adaptive_avg_pool3d(one_hot, tuple(int(g) for g in grid)))
    return torch.cat(pooled)


@dataclass(frozen=True)
class ProbeHead:
    """A fitted linear probe, ``logits = weight · features + bias`` per feature voxel (the whitening it was fitted
    with folded in).

    Attributes:
        weight: (K, C); bias: (K,).
    """

    weight: Tensor
    bias: Tensor

    def logits(self, features: Tensor) -> Tensor:
        """Class scores ``(B, K, x, y, z)`` of feature maps ``(B, C, x, y, z)``."""
        return torch.einsum("bcxyz,kc->bkxyz", features.float(), self.weight) + self.bias.view(1, -1, 1, 1, 1)


def whitening(x: Tensor, shrinkage: float = 1e-3) -> tuple[Tensor, Tensor]:
    """Mean ``(C,)`` and whitening matrix ``(C, C)`` of samples ``x`` (N, C): ``(x − mean) @ matrix`` has identity
    covariance, up to ``shrinkage`` × the largest eigenvalue added to every eigenvalue (so that directions of
    almost no variance are not blown up into noise)."""
    mean = x.mean(dim=0)
    centred = x - mean
    eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred / x.shape[0])
    eigenvalues = eigenvalues.clamp_min(0.0)
    eigenvalues = eigenvalues + shrinkage * eigenvalues.max().clamp_min(1e-12)
    return mean, eigenvectors / eigenvalues.sqrt()


def fit_probe(features: Tensor, fractions: Tensor, iterations: int = 50, weight_decay: float = 1e-4) -> ProbeHead:
    """Fits a :class:`ProbeHead` to feature maps ``(B, C, x, y, z)`` and class fractions ``(B, K, x, y, z)`` on
    the same grid: soft cross-entropy + ``weight_decay`` · ‖w‖², minimised by full-batch L-BFGS (``iterations``,
    strong Wolfe line search) on whitened features (:func:`whitening`), where the problem is well conditioned and
    L-BFGS converges in tens of iterations whatever the encoder's feature scales and correlations. It starts from
    zero weights and draws no random number, so the same features always give the same probe. The inputs are
    detached and gradients are enabled for the fit only, so it runs under ``torch.no_grad`` too and nothing
    outside the probe receives a gradient."""
    if features.shape[0] != fractions.shape[0] or features.shape[2:] != fractions.shape[2:]:
        raise ValueError(f"features {tuple(features.shape)} and fractions {tuple(fractions.shape)} must share the "
                         "batch and the grid")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    channels, classes = features.shape[1], fractions.shape[1]
    x = features.detach().float().movedim(1, -1).reshape(-1, channels)
    y = fractions.detach().float().movedim(1, -1).reshape(-1, classes).to(x.device)
    mean, matrix = whitening(x)
    white = (x - mean) @ matrix
    with torch.enable_grad():
        weight = torch.zeros(classes, channels, device=x.device, requires_grad=True)
        bias = torch.zeros(classes, device=x.device, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], max_iter=iterations, history_size=20,
                                      line_search_fn="strong_wolfe")

        def loss() -> Tensor:
            optimizer.zero_grad(set_to_none=True)
            log_probabilities = F.log_softmax(white @ weight.T + bias, dim=1)
            value = -(y * log_probabilities).sum(dim=1).mean() + weight_decay * weight.pow(2).sum()
            value.backward()
            return value

        optimizer.step(loss)
    raw_weight = weight.detach() @ matrix.T  # the whitening folded into the weights: logits of raw features
    return ProbeHead(weight=raw_weight, bias=bias.detach() - raw_weight @ mean)


def predict_labels(head: ProbeHead, features: Tensor, size: Sequence[int]) -> Tensor:
    """Labels ``(B, X, Y, Z)`` (int64) of feature maps ``(B, C, x, y, z)``: the logits upsampled trilinearly to
    ``size``, then the most likely class; one superpatch at a time, so memory holds one full-size logit map."""
    size = tuple(int(s) for s in size)
    predictions = []
    for sample in features:
        logits = F.interpolate(head.logits(sample[None]), size=size, mode="trilinear", align_corners=False)
        predictions.append(logits.argmax(dim=1))
    return torch.cat(predictions)


def probe_dice(prediction: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """Dice ``(K - 1,)`` of every foreground class, pooled over all superpatches of ``prediction`` and ``target``
    (``(B, X, Y, Z)`` labels): ``2·TP / (predicted + true voxels)`` from torchmetrics' confusion matrix (the
    values of its ``dice_score``, at a tenth of the time on superpatches); NaN for a class in neither, 0 for a
    class on one side only."""
    confusion = multiclass_confusion_matrix(prediction.reshape(-1).long(), target.reshape(-1).long().to(
        prediction.device), num_classes=num_classes, validate_args=False).double()
    overlap = 2.0 * confusion.diagonal()
    sizes = confusion.sum(dim=0) + confusion.sum(dim=1)  # predicted + true voxels of each class
    dice = torch.where(sizes > 0, overlap / sizes.clamp_min(1.0), torch.full_like(sizes, float("nan")))
    return dice[1:].float().cpu()


@dataclass(frozen=True)
class ProbeResult:
    """What :func:`linear_probe` found.

    Attributes:
        dice: mean foreground Dice over the classes with a defined Dice (NaN when none is).
        class_dice: (K - 1,) Dice of classes 1..K-1 (entry ``c - 1`` is class ``c``), NaN where undefined.
        prediction: (B, X, Y, Z) int64 labels the probe predicts for the test superpatches.
        head: the fitted probe.
    """

    dice: float
    class_dice: Tensor
    prediction: Tensor
    head: ProbeHead


def linear_probe(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
                 num_classes: int, iterations: int = 50, weight_decay: float = 1e-4) -> ProbeResult:
    """Fits a linear probe on the training feature maps (labels pooled to their grid) and scores its predictions
    on the test superpatches at full label resolution (see the module docstring).

    Args:
        train_features, test_features: ``(B, C, x, y, z)`` feature maps, the same channels and grid.
        train_labels, test_labels: ``(B, X, Y, Z)`` integer labels in ``0..num_classes-1``.
        num_classes: classes including the background 0.
        iterations, weight_decay: the fit (:func:`fit_probe`).
    """
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2 (background and one class), got {num_classes}")
    _check_pair(train_features, train_labels, "probe-train", num_classes)
    _check_pair(test_features, test_labels, "probe-test", num_classes)
    if train_features.shape[1:] != test_features.shape[1:]:
        raise ValueError(f"probe-train features {tuple(train_features.shape[1:])} and probe-test features "
                         f"{tuple(test_features.shape[1:])} differ in channels or grid")
    fractions = label_fractions(train_labels, train_features.shape[2:], num_classes)
    head = fit_probe(train_features, fractions, iterations=iterations, weight_decay=weight_decay)
    prediction = predict_labels(head, test_features, test_labels.shape[1:])
    class_dice = probe_dice(prediction, test_labels, num_classes)
    defined = class_dice[~class_dice.isnan()]
    dice = float(defined.mean()) if defined.numel() else float("nan")
    return ProbeResult(dice=dice, class_dice=class_dice, prediction=prediction.cpu(), head=head)


# --------------------------------------------------------------------------------------------
# Picture
# --------------------------------------------------------------------------------------------


def probe_figure(image: np.ndarray, label: np.ndarray, prediction: np.ndarray, class_names: Mapping[int, str],
                 title: str = "", value_range: tuple[float, float] = (0.0, 1.0)) -> Figure:
    """One (X, Y, Z) superpatch in three views: the image, the reference labels and the probe's prediction over
    it (one colour per class, background clear), with a legend of the classes shown."""
    num_classes = max(class_names) + 1 if class_names else int(max(label.max(), prediction.max())) + 1
    colours = plt.get_cmap("tab10" if num_classes <= 11 else "tab20")
    palette = np.array([(0.0, 0.0, 0.0, 0.0)] + [(*colours((c - 1) % colours.N)[:3], 0.55)
                                                  for c in range(1, num_classes)])
    rows = {"image": None, "reference": np.asarray(label), "probe": np.asarray(prediction)}
    image_slices = orthogonal_slices(np.asarray(image, dtype=np.float32))
    figure, axes = plt.subplots(len(rows), len(VIEWS), figsize=(3.2 * len(VIEWS), 3.2 * len(rows)), squeeze=False)
    for row, (name, labels) in enumerate(rows.items()):
        label_slices = orthogonal_slices(labels.astype(np.int64)) if labels is not None else None
        for column, view in enumerate(VIEWS):
            axis = axes[row, column]
            axis.imshow(image_slices[view], cmap="gray", vmin=value_range[0], vmax=value_range[1], origin="lower",
                        interpolation="nearest")
            if label_slices is not None:
                axis.imshow(palette[np.clip(label_slices[view], 0, num_classes - 1)], origin="lower",
                            interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(view)
            if column == 0:
                axis.set_ylabel(name)
    shown = sorted((set(np.unique(label).tolist()) | set(np.unique(prediction).tolist())) - {0})
    handles = [plt.Rectangle((0, 0), 1, 1, color=palette[c][:3]) for c in shown if 0 < c < num_classes]
    if handles:
        figure.legend(handles, [class_names.get(c, f"class_{c}") for c in shown if 0 < c < num_classes],
                      loc="lower center", ncol=min(len(handles), 4), fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout(rect=(0, 0.06 if handles else 0, 1, 1))
    return figure
