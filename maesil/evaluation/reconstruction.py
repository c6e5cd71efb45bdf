"""Whole-volume reconstruction evaluation: grid reconstruction, body mask, metrics, slice-wise LPIPS.

A held-out volume is scored as a whole rather than superpatch by superpatch:

1. :func:`reconstruct_volume` pads the preprocessed volume (centred) to a multiple of the superpatch,
   partitions it with ``tio.GridSampler`` (no overlap), reconstructs every superpatch with
   ``model.reconstruct_for_evaluation`` (masked methods draw their masks from a seed fixed per subject
   and location, so every run sees the same masks), reassembles reconstruction and hidden-voxel mask
   with ``tio.GridAggregator`` and crops the padding off again.
2. :func:`body_mask` marks the patient (lungs included), so that scores are not dominated by air.
3. :func:`volume_metrics` gives PSNR and 3D SSIM over the whole volume, the body and the masked
   voxels. PSNR of an exact reconstruction is ``+inf`` (not capped). The data range is 1 for CT
   windowed to [0, 1] and, for z-normalised MRI, the volume's own max − min, unless fixed
   (:func:`maesil.evaluation.metrics.normalise_intensities`).
4. :class:`LPIPS2D` optionally adds slice-wise LPIPS (AlexNet variant), built only from local weights.

:func:`maesil.evaluation.figures.comparison_figure` pictures the reconstructions of several methods side by side.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torchio as tio
from scipy import ndimage
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchmetrics.functional.image import peak_signal_noise_ratio

from maesil.data.collate import collate_patches
from maesil.data.grid import pad_to_multiple
from maesil.evaluation.metrics import Modality, normalise_intensities, ssim_map_3d
from maesil.shapes import as_triple

#: Default threshold of :func:`body_mask` on windowed CT in [0, 1]: 0.05 is ≈ −154 HU for the
#: default window [−175, 250] HU, below fat (≈ −100 HU) and above air (clipped to exactly 0).
BODY_THRESHOLD = 0.05


# --------------------------------------------------------------------------------------------
# Grid reconstruction
# --------------------------------------------------------------------------------------------


@dataclass
class VolumeReconstruction:
    """A reconstructed volume in the preprocessed volume's own (unpadded) grid.

    Attributes:
        subject_id: the subject's id.
        image: the preprocessed input, float32 (X, Y, Z).
        reconstruction: the model's reconstruction, float32 (X, Y, Z).
        hidden_mask: bool (X, Y, Z), True where the model did not see the input; ``None`` for methods
            that see the whole input (autoencoders).
        spacing: voxel size in mm (X, Y, Z).
    """

    subject_id: str
    image: Tensor
    reconstruction: Tensor
    hidden_mask: Tensor | None
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)


def _model_device(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@torch.no_grad()
def reconstruct_volume(
    model: nn.Module,
    subject: tio.Subject,
    superpatch_size: int | Sequence[int],
    padding_value: float | str = 0.0,
    batch_size: int = 2,
    masked: bool = True,
) -> VolumeReconstruction:
    """Reconstructs a whole preprocessed volume superpatch by superpatch.

    The volume is padded (centred) to a multiple of ``superpatch_size`` exactly as the DataModule's
    validation grid is, so patch locations, and hence the masks of masked methods, match validation.
    The model runs in eval mode (its previous mode is restored) without gradients, on its own device.

    Args:
        model: a :class:`~maesil.methods.base.MethodModule` (anything with ``reconstruct_for_evaluation``).
        subject: a preprocessed ``tio.Subject`` with a single-channel ``image`` and a ``subject_id``.
        superpatch_size: the superpatch size the model takes.
        padding_value: padding of the grid: 0 for windowed CT (air), ``"minimum"`` for MRI
            (see :func:`maesil.data.preprocess.padding_value`).
        batch_size: superpatches per forward pass.
        masked: True (default): ``model.reconstruct_for_evaluation``, masked methods hide voxels and report
            them; False: ``model.reconstruct_unmasked``, masking off (every voxel seen and predicted, nothing
            pasted back; ``hidden_mask`` is None).

    Returns:
        The input, the reconstruction and the hidden-voxel mask (or ``None``), cropped to the volume.
    """
    superpatch_size = as_triple(superpatch_size, "superpatch_size")
    image = subject["image"]
    if image.data.shape[0] != 1:
        raise ValueError(f"expected a single-channel image, got shape {tuple(image.data.shape)}")
    shape = tuple(int(s) for s in image.spatial_shape)
    subject_id = str(subject.get("subject_id", "?"))
    # A fresh subject: padding works in place, and other images (labels) need no reconstruction.
    grid_subject = tio.Subject(image=tio.ScalarImage(tensor=image.data.float().clone(), affine=image.affine),
                               subject_id=subject_id)
    padded = pad_to_multiple(grid_subject, superpatch_size, padding_value)
    padded_shape = tuple(int(s) for s in padded.spatial_shape)
    expected = tuple(math.ceil(s / p) * p for s, p in zip(shape, superpatch_size))
    if padded_shape != expected:
        raise RuntimeError(f"padding to a multiple of {superpatch_size} gave {padded_shape}, expected {expected}")
    start = tuple((p - s) // 2 for p, s in zip(padded_shape, shape))  # pad_to_multiple pads centred

    sampler = tio.GridSampler(padded, patch_size=superpatch_size, patch_overlap=0)
    loader = DataLoader(sampler, batch_size=max(1, int(batch_size)), shuffle=False, num_workers=0,
                        collate_fn=collate_patches)
    recon_aggregator = tio.GridAggregator(sampler)
    mask_aggregator: tio.GridAggregator | None = None
    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            locations = batch["location"]
            batch["image"] = batch["image"].to(device)
            if masked:
                reconstruction, hidden = model.reconstruct_for_evaluation(batch)
            else:
                reconstruction, hidden = model.reconstruct_unmasked(batch), None
            if tuple(reconstruction.shape) != tuple(batch["image"].shape):
                raise ValueError(f"{type(model).__name__}.reconstruct_for_evaluation returned shape "
                                 f"{tuple(reconstruction.shape)} for input {tuple(batch['image'].shape)}")
            recon_aggregator.add_batch(reconstruction.detach().float().cpu(), locations)
            if hidden is not None:
                if mask_aggregator is None:
                    mask_aggregator = tio.GridAggregator(sampler)
                hidden = hidden.expand_as(reconstruction)
                mask_aggregator.add_batch(hidden.detach().float().cpu(), locations)
    finally:
        model.train(was_training)

    crop = tuple(slice(b, b + s) for b, s in zip(start, shape))
    reconstruction = recon_aggregator.get_output_tensor()[0][crop].contiguous()
    hidden_mask = None
    if mask_aggregator is not None:
        hidden_mask = (mask_aggregator.get_output_tensor()[0][crop] > 0.5).contiguous()
    spacing = tuple(float(s) for s in image.spacing)
    return VolumeReconstruction(
        subject_id=subject_id,
        image=image.data[0].float().clone(),
        reconstruction=reconstruction,
        hidden_mask=hidden_mask,
        spacing=spacing,  # type: ignore[arg-type]
    )


# --------------------------------------------------------------------------------------------
# Body mask
# --------------------------------------------------------------------------------------------


def body_mask(
    image: Tensor | np.ndarray,
    threshold: float = BODY_THRESHOLD,
    modality: Literal["ct", "mri"] = "ct",
    largest_component: bool = False,
) -> Tensor:
    """The patient's body in a preprocessed (X, Y, Z) volume, as a bool tensor.

    CT (windowed to [0, 1], air = 0): voxels above ``threshold`` (default 0.05 ≈ −154 HU for the
    default window), then holes filled slice by slice in the axial (X, Y) plane, so that lungs and
    airways (below the window, hence 0) count as body: in an axial slice they are enclosed by the
    chest wall, whereas in 3D the airways may open to the outside. Lungs cut by the field of view
    (touching the volume border in a slice) are not enclosed and stay outside the mask. MRI: voxels
    above the volume mean, holes filled the same way.

    Args:
        image: the preprocessed volume (X, Y, Z).
        threshold: CT only: intensity above which a voxel is tissue.
        modality: ``"ct"`` or ``"mri"``.
        largest_component: keep only the largest 3D connected component (drops a detached table).
    """
    volume = torch.as_tensor(np.asarray(image) if isinstance(image, np.ndarray) else image).detach().cpu()
    if volume.ndim != 3:
        raise ValueError(f"expected an (X, Y, Z) volume, got shape {tuple(volume.shape)}")
    volume = volume.float()
    tissue = (volume > threshold) if modality == "ct" else (volume > volume.mean())
    mask = tissue.numpy()
    if largest_component and mask.any():
        labels, count = ndimage.label(mask)
        if count > 1:
            sizes = np.bincount(labels.ravel())[1:]
            mask = labels == (int(np.argmax(sizes)) + 1)
    filled = np.empty_like(mask)
    for z in range(mask.shape[2]):
        filled[:, :, z] = ndimage.binary_fill_holes(mask[:, :, z])
    return torch.from_numpy(filled)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def _psnr(reconstruction: Tensor, target: Tensor, data_range: float) -> float:
    if target.numel() == 0:
        return float("nan")
    value = peak_signal_noise_ratio(reconstruction.double(), target.double(), data_range=data_range)
    return float(value)


def volume_metrics(
    image: Tensor,
    reconstruction: Tensor,
    hidden_mask: Tensor | None = None,
    body: Tensor | None = None,
    data_range: float | None = None,
    reference_mask: Tensor | None = None,
    modality: Modality = "ct",
) -> dict[str, float]:
    """PSNR and 3D SSIM of one reconstructed (X, Y, Z) volume, overall and in regions.

    PSNR pools the squared error over the region's voxels (torchmetrics, one data range per volume); an
    exact reconstruction gives ``inf`` (reported as such, not capped). SSIM is the 3D SSIM map
    (torchmetrics' numbers, Gaussian window 11, σ 1.5, the same data range; :func:`ssim_map_3d`, separable)
    computed once on the whole volume
    and averaged over the region's voxels, so that the regions' structure comparisons see the same
    neighbourhoods.

    Args:
        image: the input volume.
        reconstruction: the reconstruction, same shape.
        hidden_mask: voxels the model did not see (its own masks), or ``None``.
        body: the body mask (:func:`body_mask`), or ``None`` to skip the body scores.
        data_range: intensity range; ``None`` (default) follows ``modality``: 1.0 for CT windowed to
            [0, 1], the input volume's max − min for z-normalised MRI.
        reference_mask: voxels to score as "masked" when the model has no mask of its own, e.g. the
            masks of a masked method, so that every method is scored on the same voxels.
        modality: ``"ct"`` or ``"mri"``, the preprocessing of ``image``.

    Returns:
        ``psnr``, ``ssim`` (whole volume); ``psnr_body``, ``ssim_body`` when ``body`` is given;
        ``psnr_masked``, ``ssim_masked`` over ``hidden_mask``, else over ``reference_mask``, when
        either is given. A region without any voxel scores NaN.
    """
    if image.shape != reconstruction.shape or image.ndim != 3:
        raise ValueError(f"expected two (X, Y, Z) volumes of one shape, got {tuple(image.shape)} and "
                         f"{tuple(reconstruction.shape)}")
    reconstruction, image = normalise_intensities(reconstruction.cpu()[None], image.cpu()[None], data_range, modality)
    reconstruction, image, data_range = reconstruction[0], image[0], 1.0  # in units of the data range
    ssim_map = ssim_map_3d(reconstruction[None, None], image[None, None], data_range=data_range, sigma=1.5)[0, 0]
    results = {"psnr": _psnr(reconstruction, image, data_range), "ssim": float(ssim_map.double().mean())}
    regions: dict[str, Tensor] = {}
    if body is not None:
        regions["body"] = body
    masked = hidden_mask if hidden_mask is not None else reference_mask
    if masked is not None:
        regions["masked"] = masked
    for name, region in regions.items():
        region = region.detach().cpu().bool()
        if region.shape != image.shape:
            raise ValueError(f"{name} mask has shape {tuple(region.shape)}, the volume {tuple(image.shape)}")
        results[f"psnr_{name}"] = _psnr(reconstruction[region], image[region], data_range)
        results[f"ssim_{name}"] = float(ssim_map[region].double().mean()) if region.any() else float("nan")
    return results


# --------------------------------------------------------------------------------------------
# LPIPS
# --------------------------------------------------------------------------------------------

#: AlexNet conv layers of LPIPS: (slice, index in torchvision's ``features``, in, out, kernel, stride, padding).
_ALEX_CONVS = (
    (1, 0, 3, 64, 11, 4, 2),
    (2, 3, 64, 192, 5, 1, 2),
    (3, 6, 192, 384, 3, 1, 1),
    (4, 8, 384, 256, 3, 1, 1),
    (5, 10, 256, 256, 3, 1, 1),
)
_SLICE_OF_FEATURE = {index: slice_ for slice_, index, *_ in _ALEX_CONVS}


class _AlexFeatures(nn.Module):
    """The five ReLU outputs of AlexNet's convolutional trunk, as LPIPS taps them."""

    def __init__(self) -> None:
        super().__init__()
        for slice_, index, c_in, c_out, kernel, stride, padding in _ALEX_CONVS:
            layers: OrderedDict[str, nn.Module] = OrderedDict()
            if index in (3, 6):  # a max-pool precedes conv2 and conv3
                layers[str(index - 1)] = nn.MaxPool2d(kernel_size=3, stride=2)
            layers[str(index)] = nn.Conv2d(c_in, c_out, kernel_size=kernel, stride=stride, padding=padding)
            layers[str(index + 1)] = nn.ReLU(inplace=False)
            setattr(self, f"slice{slice_}", nn.Sequential(layers))

    def forward(self, x: Tensor) -> list[Tensor]:
        outputs = []
        for slice_ in range(1, 6):
            x = getattr(self, f"slice{slice_}")(x)
            outputs.append(x)
        return outputs


class _LinearHead(nn.Module):
    """LPIPS's per-layer 1×1 convolution (weights the channels of a squared feature difference)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class LPIPS2D(nn.Module):
    """LPIPS (v0.1, AlexNet variant) in plain torch, for slice-wise scores of 3D volumes.

    Grey-level slices in ``[0, data_range]`` are mapped to [-1, 1], repeated to three channels, shifted
    and scaled like LPIPS's ``ScalingLayer``, passed through AlexNet's five conv+ReLU stages; each stage's
    features are normalised to unit length over channels, the squared difference is weighted by a 1×1
    conv and averaged over space, and the five terms are summed.

    Build it with :meth:`from_weights`: there is no download. Expected state-dict keys (one file or
    several merged, e.g. torchvision's AlexNet weights plus LPIPS's ``weights/v0.1/alex.pth``)::

        net.slice1.0.{weight,bias}   (64, 3, 11, 11)   or  features.0.{weight,bias}
        net.slice2.3.{weight,bias}   (192, 64, 5, 5)   or  features.3.{weight,bias}
        net.slice3.6.{weight,bias}   (384, 192, 3, 3)  or  features.6.{weight,bias}
        net.slice4.8.{weight,bias}   (256, 384, 3, 3)  or  features.8.{weight,bias}
        net.slice5.10.{weight,bias}  (256, 256, 3, 3)  or  features.10.{weight,bias}
        lin{k}.model.1.weight        (C_k, …) = (1, C_k, 1, 1), k = 0..4, C = 64, 192, 384, 256, 256
                                     (also ``lins.{k}.model.1.weight``)

    ``scaling_layer.*`` and AlexNet's ``classifier.*`` keys are ignored; a ``module.`` prefix and a
    ``state_dict`` wrapper are accepted. The full state dict of the ``lpips`` package's
    ``LPIPS(net="alex")`` thus loads as it is.
    """

    channels: tuple[int, ...] = (64, 192, 384, 256, 256)

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.net = _AlexFeatures()
        for k, channels in enumerate(self.channels):
            setattr(self, f"lin{k}", _LinearHead(channels))
        self.eval()
        self.requires_grad_(False)

    @classmethod
    def from_weights(cls, paths: str | Path | Sequence[str | Path]) -> LPIPS2D:
        """Builds the network from local weight files (``torch.load(weights_only=True)`` or
        ``.safetensors``), merged in order. Raises ``ValueError`` naming the files when keys or
        shapes do not match the layout in the class docstring."""
        paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
        if not paths:
            raise ValueError("no LPIPS weight file given")
        merged: dict[str, Tensor] = {}
        for path in paths:
            merged.update(_normalise_lpips_keys(_read_state_dict(path), path))
        model = cls()
        names = ", ".join(str(p) for p in paths)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(merged))
        unexpected = sorted(set(merged) - set(expected))
        wrong = sorted(k for k in set(expected) & set(merged) if tuple(merged[k].shape) != tuple(expected[k].shape))
        if missing or unexpected or wrong:
            problems = []
            if missing:
                problems.append(f"missing keys {missing}")
            if unexpected:
                problems.append(f"unexpected keys {unexpected[:10]}{' …' if len(unexpected) > 10 else ''}")
            if wrong:
                problems.append("wrong shapes " + ", ".join(
                    f"{k}: {tuple(merged[k].shape)} instead of {tuple(expected[k].shape)}" for k in wrong))
            raise ValueError(f"LPIPS weights {names} do not fit the AlexNet LPIPS layout ({'; '.join(problems)});"
                             " see maesil.evaluation.reconstruction.LPIPS2D for the expected keys")
        model.load_state_dict({k: v.float() for k, v in merged.items()})
        return model

    def forward(self, x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
        """LPIPS of two batches of grey-level images (N, 1, H, W) or (N, 3, H, W) in ``[0, data_range]``:
        one distance per image, shape (N,)."""
        features = []
        for images in (x, y):
            images = (images.float() / data_range).clamp(0.0, 1.0) * 2.0 - 1.0
            if images.shape[1] == 1:
                images = images.expand(-1, 3, -1, -1)
            outputs = self.net((images - self.shift) / self.scale)
            features.append([f / (torch.sqrt(torch.sum(f * f, dim=1, keepdim=True)) + 1e-10) for f in outputs])
        total = torch.zeros(x.shape[0], device=x.device)
        for k, (a, b) in enumerate(zip(*features)):
            total = total + getattr(self, f"lin{k}")((a - b) ** 2).mean(dim=(1, 2, 3))
        return total


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise ValueError(f"LPIPS weights {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            try:
                from safetensors.torch import load_file
            except ImportError:
                raise ValueError(f"LPIPS weights {path}: reading .safetensors needs the safetensors package; "
                                 "install it or convert the file with torch.save") from None
            data = load_file(str(path), device="cpu")
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except ValueError:
        raise
    except Exception as error:  # noqa: BLE001 - any reader error
        raise ValueError(f"LPIPS weights {path}: cannot be read ({type(error).__name__}: {error})") from error
    if isinstance(data, Mapping) and "state_dict" in data and isinstance(data["state_dict"], Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping) or not all(isinstance(v, Tensor) for v in data.values()):
        raise ValueError(f"LPIPS weights {path}: not a state dict of tensors")
    return dict(data)


def _normalise_lpips_keys(state: Mapping[str, Tensor], path: Path) -> dict[str, Tensor]:
    """Maps the accepted key spellings onto :class:`LPIPS2D`'s own."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith(("scaling_layer.", "classifier.")):
            continue
        match = re.fullmatch(r"features\.(\d+)\.(weight|bias)", key)
        if match and int(match.group(1)) in _SLICE_OF_FEATURE:
            key = f"net.slice{_SLICE_OF_FEATURE[int(match.group(1))]}.{match.group(1)}.{match.group(2)}"
        match = re.fullmatch(r"lins\.(\d+)\.(.+)", key)
        if match:
            key = f"lin{match.group(1)}.{match.group(2)}"
        out[key] = value
    return out


@torch.no_grad()
def lpips_volume(network: LPIPS2D, image: Tensor, reconstruction: Tensor, data_range: float = 1.0,
                 batch_size: int = 16, low: float = 0.0) -> float:
    """Mean LPIPS over the axial (X, Y) slices of two (X, Y, Z) volumes, on the network's device.

    Grey levels in ``[low, low + data_range]`` are shown to the network ([0, 1] for windowed CT; for
    z-normalised MRI, e.g. the input volume's min and max − min)."""
    device = next(network.parameters()).device
    image = image.detach().float() - low
    reconstruction = reconstruction.detach().float() - low
    values = []
    for z0 in range(0, image.shape[2], batch_size):
        a = image[:, :, z0:z0 + batch_size].permute(2, 0, 1)[:, None].to(device)
        b = reconstruction[:, :, z0:z0 + batch_size].permute(2, 0, 1)[:, None].to(device)
        values.append(network(b, a, data_range=data_range).cpu())
    return float(torch.cat(values).double().mean())
