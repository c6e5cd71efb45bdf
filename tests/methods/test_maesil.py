import math

import numpy as np
import pytest
import torch

from maesil.methods import MAESIL
from tests.helpers import REPO_ROOT, validate_on_tiny_mri


def tiny_module(**overrides) -> MAESIL:
    config = dict(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=2,
                  decoder_embed_dim=48, decoder_depth=1, decoder_num_heads=2)
    config.update(overrides)
    return MAESIL(**config)


def batch_of(images: torch.Tensor, subjects: list[str]) -> dict:
    locations = torch.tensor([[0, 0, i * 32, 32, 32, (i + 1) * 32] for i in range(len(subjects))])
    return {"image": images, "subject_id": subjects, "location": locations}


def test_dual_masking_hides_the_reported_fraction():
    module = tiny_module(masking="dual", mask_ratio=0.5, axial_mask_ratio=0.5)
    mask = module.draw_mask(3)
    # grid 4×4×4: tube keeps 8 of 16 in-plane positions, each slice keeps 4 of those 8
    assert mask.mask.shape == (3, 64)
    assert (~mask.mask).sum(dim=1).tolist() == [16, 16, 16]
    assert module.effective_mask_ratio == pytest.approx(0.75)


def test_training_step_gives_finite_loss_with_gradients():
    module = tiny_module()
    loss = module.training_step({"image": torch.rand(2, 1, 32, 32, 32)}, 0)
    loss.backward()
    assert torch.isfinite(loss)
    encoder_grads = [p.grad for p in module.net.encoder.parameters() if p.grad is not None]
    assert encoder_grads and sum(g.abs().sum() for g in encoder_grads) > 0


def test_validation_masks_depend_on_superpatch_not_on_batch_composition():
    module = tiny_module()
    images = torch.rand(2, 1, 32, 32, 32)
    pair = module.validation_mask(batch_of(images, ["a", "b"]))
    single = module.validation_mask(batch_of(images[1:], ["b"]))
    again = module.validation_mask(batch_of(images, ["a", "b"]))
    assert not torch.equal(pair.mask[0], pair.mask[1])
    assert torch.equal(again.mask, pair.mask)
    # "b" sits at location index 1 in the pair but index 0 alone, so only matching locations agree
    moved = batch_of(images[1:], ["b"])
    moved["location"] = batch_of(images, ["a", "b"])["location"][1:]
    assert torch.equal(module.validation_mask(moved).mask[0], pair.mask[1])
    assert single.mask.shape == (1, 64)


def test_voxel_mask_matches_token_mask():
    module = tiny_module(masking="random", mask_ratio=0.75, axial_mask_ratio=None)
    mask = module.draw_mask(2)
    voxels = module.voxel_mask(mask, channels=1)
    assert voxels.shape == (2, 1, 32, 32, 32)
    assert voxels.sum(dim=(1, 2, 3, 4)).tolist() == [48 * 512, 48 * 512]


def test_invalid_masking_ratio_fails_at_construction():
    with pytest.raises(ValueError):
        tiny_module(mask_ratio=1.0)


def test_mri_validation_scores_an_exact_reconstruction_unclipped_and_shows_the_data_range(tiny_ct_dir, tmp_path):
    module = tiny_module()
    module.net.reconstruct = lambda images, output: images.clone()  # a perfect reconstruction
    figures = []
    module.log_figure = lambda name, figure: figures.append(figure)
    metrics = validate_on_tiny_mri(module, tiny_ct_dir, tmp_path)
    assert module.data_modality == "mri"
    # Clamped to [0, 1], as before, the z-normalised target would be matched only inside [0, 1].
    assert math.isinf(metrics["val/psnr"]) and math.isinf(metrics["val/psnr_masked"])
    assert metrics["val/ssim"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["val/ssim_masked"] == pytest.approx(1.0, abs=1e-6)

    [figure] = figures
    picture = figure.axes[0].images[0]  # the input, axial
    low, high = picture.get_clim()
    axial = picture.get_array().filled(np.nan)
    assert low < -1.0 and high > 1.5  # the z-normalised range (1st-99th percentile), not (0, 1)
    assert np.nanmean((axial < low) | (axial > high)) < 0.1
    assert np.nanmean((axial < 0) | (axial > 1)) > 0.3  # what (0, 1) would saturate
    assert [im.get_clim() for im in figure.axes[6].images] == [(low, high)]  # the reconstruction: same range


def test_ct_reconstructions_stay_clamped_to_the_window():
    module = tiny_module()
    images = torch.rand(2, 1, 32, 32, 32)
    module.net.reconstruct = lambda images, output: images * 3.0 - 1.0
    reconstruction, _ = module.reconstruct_for_evaluation(batch_of(images, ["a", "b"]))
    assert module.data_modality == "ct"  # no DataModule: CT, as before
    assert float(reconstruction.min()) == 0.0 and float(reconstruction.max()) == 1.0
    module.input_modality = "mri"  # as benchmark-recon sets it from an MRI checkpoint
    reconstruction, _ = module.reconstruct_for_evaluation(batch_of(images, ["a", "b"]))
    torch.testing.assert_close(reconstruction, images * 3.0 - 1.0)


def test_a_checkpoint_of_the_0_1_layout_loads_from_its_img_size_and_patch_size():
    path = REPO_ROOT / "tests/fixtures/old_checkpoints/maesil_v0_1.ckpt"
    with pytest.warns(FutureWarning, match="img_size is deprecated, use superpatch_size"):
        module = MAESIL.load_from_checkpoint(path, map_location="cpu", weights_only=False)
    assert module.superpatch_size == (32, 32, 32) and module.token_size == 8 and module.grid == (4, 4, 4)
    assert module.hparams.superpatch_size == 32 and module.hparams.token_size == 8
    assert "img_size" not in module.hparams and "patch_size" not in module.hparams
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    assert all(torch.equal(value, state[key]) for key, value in module.state_dict().items())
    reconstruction, hidden = module.reconstruct_for_evaluation(batch_of(torch.rand(1, 1, 32, 32, 32), ["a"]))
    assert reconstruction.shape == hidden.shape == (1, 1, 32, 32, 32)
