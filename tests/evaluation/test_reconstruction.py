"""Whole-volume reconstruction: grid reassembly, body mask, metrics and LPIPS plumbing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchio as tio

from maesil.data.io import subject_from_record
from maesil.phantoms import make_phantom
from maesil.data.preprocess import PreprocessSettings
from maesil.data.sources import discover_subjects
from maesil.evaluation.reconstruction import (
    LPIPS2D,
    body_mask,
    lpips_volume,
    reconstruct_volume,
    volume_metrics,
)
from maesil.methods.base import MethodModule

PATCH = (8, 8, 8)


class Identity(MethodModule):
    """Returns its input; sees everything."""

    def reconstruct_for_evaluation(self, batch):
        return batch["image"].clone(), None


class Noise(MethodModule):
    """Returns uniform noise."""

    def reconstruct_for_evaluation(self, batch):
        generator = torch.Generator().manual_seed(0)
        return torch.rand(batch["image"].shape, generator=generator), None


class MaskedIdentity(MethodModule):
    """Returns its input, and hides the first half along X of every superpatch whose location sum is even."""

    def reconstruct_for_evaluation(self, batch):
        images = batch["image"]
        hidden = torch.zeros_like(images, dtype=torch.bool)
        for i, location in enumerate(batch["location"]):
            if int(location[:3].sum() // PATCH[0]) % 2 == 0:
                hidden[i, :, : PATCH[0] // 2] = True
        return images.clone(), hidden


def ramp_subject(shape=(13, 10, 7)) -> tio.Subject:
    """A volume whose every voxel differs, with a shape that is no multiple of the patch."""
    data = torch.arange(math.prod(shape), dtype=torch.float32).reshape(1, *shape) / math.prod(shape)
    return tio.Subject(image=tio.ScalarImage(tensor=data), subject_id="ramp")


def test_identity_reassembly_is_exact_including_edges_and_padding():
    subject = ramp_subject()
    result = reconstruct_volume(Identity(), subject, PATCH, padding_value=0.0, batch_size=3)
    assert result.reconstruction.shape == (13, 10, 7)
    assert torch.equal(result.reconstruction, subject["image"].data[0])
    assert torch.equal(result.image, subject["image"].data[0])
    assert result.hidden_mask is None
    assert result.subject_id == "ramp"


def test_aggregated_mask_covers_exactly_the_hidden_voxels():
    subject = ramp_subject((20, 12, 9))
    result = reconstruct_volume(MaskedIdentity(), subject, PATCH, batch_size=2)
    # The grid of the padded (24, 16, 16) volume starts 2, 2, 3 voxels before the volume.
    expected = torch.zeros(24, 16, 16, dtype=torch.bool)
    for i in range(0, 24, 8):
        for j in range(0, 16, 8):
            for k in range(0, 16, 8):
                if ((i + j + k) // 8) % 2 == 0:
                    expected[i:i + 4, j:j + 8, k:k + 8] = True
    assert result.hidden_mask is not None
    assert torch.equal(result.hidden_mask, expected[2:22, 2:14, 3:12])
    assert torch.equal(result.reconstruction, subject["image"].data[0])


def test_model_mode_is_restored():
    model = Identity()
    model.train()
    reconstruct_volume(model, ramp_subject(), PATCH)
    assert model.training


@pytest.fixture(scope="module")
def phantom(tiny_ct_dir) -> tio.Subject:
    record = sorted(discover_subjects(tiny_ct_dir), key=lambda r: r.subject_id)[0]
    settings = PreprocessSettings(target_spacing=4.0)
    return settings.transform()(subject_from_record(record, with_label=True))


def test_identity_scores_infinite_psnr_and_unit_ssim_and_noise_scores_low(phantom):
    body = body_mask(phantom["image"].data[0])
    exact = reconstruct_volume(Identity(), phantom, (16, 16, 16), batch_size=4)
    scores = volume_metrics(exact.image, exact.reconstruction, exact.hidden_mask, body)
    assert scores["psnr"] == math.inf and scores["psnr_body"] == math.inf
    assert scores["ssim"] == pytest.approx(1.0, abs=1e-5)
    assert scores["ssim_body"] == pytest.approx(1.0, abs=1e-5)
    assert "psnr_masked" not in scores

    noisy = reconstruct_volume(Noise(), phantom, (16, 16, 16), batch_size=4)
    scores = volume_metrics(noisy.image, noisy.reconstruction, None, body, reference_mask=body)
    assert scores["psnr"] < 10 and scores["ssim"] < 0.2
    assert scores["psnr_masked"] == pytest.approx(scores["psnr_body"])
    assert scores["ssim_body"] < 0.2


@pytest.fixture(scope="module")
def mri_phantom(tiny_ct_dir) -> tio.Subject:
    """A tiny CT phantom z-normalised as MRI: about [−6, 7], far outside CT's [0, 1]."""
    record = sorted(discover_subjects(tiny_ct_dir), key=lambda r: r.subject_id)[0]
    settings = PreprocessSettings(modality="mri", target_spacing=4.0)
    return settings.transform()(subject_from_record(record, with_label=False))


def test_mri_volume_is_scored_on_its_own_range(mri_phantom):
    image = mri_phantom["image"].data[0]
    span = float(image.max() - image.min())
    assert float(image.min()) < -1.0 and float(image.max()) > 2.0 and span > 5.0
    exact = volume_metrics(image, image.clone(), body=body_mask(image, modality="mri"), modality="mri")
    assert exact["psnr"] == math.inf and exact["psnr_body"] == math.inf
    assert exact["ssim"] == pytest.approx(1.0, abs=1e-6) and exact["ssim_body"] == pytest.approx(1.0, abs=1e-6)
    # A uniform error of 0.1: PSNR = 20·log10(range / 0.1) with the volume's own max − min as range…
    shifted = volume_metrics(image, image + 0.1, modality="mri")
    assert shifted["psnr"] == pytest.approx(20 * math.log10(span / 0.1), abs=1e-3)
    # …or with a fixed one; CT's default range (1) would give 20 dB.
    assert volume_metrics(image, image + 0.1, data_range=8.0, modality="mri")["psnr"] == pytest.approx(
        20 * math.log10(8.0 / 0.1), abs=1e-3)
    assert volume_metrics(image, image + 0.1)["psnr"] == pytest.approx(20.0, abs=1e-3)


def test_masked_scores_use_the_models_own_mask_before_the_reference():
    image = torch.rand(12, 12, 12)
    reconstruction = image.clone()
    hidden = torch.zeros(12, 12, 12, dtype=torch.bool)
    hidden[:6] = True
    reconstruction[hidden] = 0.5
    reference = ~hidden
    own = volume_metrics(image, reconstruction, hidden, reference_mask=reference)
    other = volume_metrics(image, reconstruction, None, reference_mask=reference)
    assert own["psnr_masked"] < 20 and other["psnr_masked"] == math.inf
    assert own["psnr"] < own["psnr_masked"] + 4  # half of the voxels carry all the error: +3 dB


def test_body_mask_counts_the_lungs():
    # a field of view wide enough for the whole chest (lungs cut by the volume border stay open)
    phantom = make_phantom(0, shape=(48, 40, 24), spacing=(8.0, 8.0, 10.0))
    image = torch.from_numpy(np.clip((phantom.image.astype(np.float32) + 175.0) / 425.0, 0.0, 1.0))
    lungs = torch.from_numpy(phantom.label == 6)
    assert lungs.sum() > 500
    # lungs lie below the window (dark), so a plain threshold would leave them out
    assert (image[lungs] > 0.05).float().mean() < 0.2
    body = body_mask(image)
    assert body[lungs].float().mean() > 0.98
    assert not body[:, -1, :].any()  # the air in front of the patient
    assert body.dtype == torch.bool and body.shape == image.shape


def test_lpips_plumbing_with_random_weights(tmp_path):
    torch.manual_seed(0)
    saved = LPIPS2D()
    for k in range(5):  # positive channel weights, as trained LPIPS heads have
        head = getattr(saved, f"lin{k}").model[1]
        head.weight.data = head.weight.data.abs()
    path = tmp_path / "lpips_alex.pth"
    torch.save(saved.state_dict(), path)

    network = LPIPS2D.from_weights(path)
    volume = torch.rand(40, 40, 3)
    assert lpips_volume(network, volume, volume) == pytest.approx(0.0, abs=1e-6)
    assert lpips_volume(network, volume, torch.rand(40, 40, 3)) > 0.0

    # torchvision's AlexNet naming (features.N) and the lpips package's lins.N spelling load too
    renamed = {}
    for key, value in saved.state_dict().items():
        if key.startswith("net.slice"):
            index = key.split(".")[2]
            key = f"features.{index}.{key.split('.')[-1]}"
        renamed[key.replace("lin", "lins.", 1) if key.startswith("lin") else key] = value
    renamed["classifier.1.weight"] = torch.zeros(2, 2)
    other = tmp_path / "renamed.pth"
    torch.save({"state_dict": renamed}, other)
    assert torch.equal(LPIPS2D.from_weights(other).lin2.model[1].weight, saved.lin2.model[1].weight)


def test_lpips_weights_that_do_not_fit_name_the_file(tmp_path):
    path = tmp_path / "vgg.pth"
    torch.save({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1), "vgg.0.weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="vgg.pth.*missing keys"):
        LPIPS2D.from_weights(path)
    with pytest.raises(ValueError, match="no such file"):
        LPIPS2D.from_weights(tmp_path / "absent.pth")
