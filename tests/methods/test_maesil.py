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


def test_validation_scores_the_reference_fills_once_on_the_models_masks(tiny_ct_dir, tmp_path):
    import lightning as L

    from maesil.data import VolumeDataModule
    from maesil.evaluation.fills import blur_fill, mean_fill
    from maesil.evaluation.metrics import ReconstructionMetrics

    module = tiny_module()
    seen = []
    original = module.score_reference_fills

    def spy(images, hidden):
        if module._reference_fill_metrics is not None:
            seen.append((images.clone(), hidden.clone()))
        original(images, hidden)

    module.score_reference_fills = spy
    datamodule = VolumeDataModule(data_dir=str(tiny_ct_dir), superpatch_size=32, target_spacing=4.0,
                                  val_fraction=0.34, batch_size=2, num_workers=0, check_voxels=False,
                                  samples_per_volume=2, queue_length=4)
    logged = []

    class Record(L.Callback):
        def on_validation_end(self, trainer, pl_module):
            logged.append({k: float(v) for k, v in trainer.callback_metrics.items() if "fill" in k})

    trainer = L.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, max_steps=2, val_check_interval=1,
                        check_val_every_n_epoch=None, num_sanity_val_steps=0, callbacks=[Record()])
    trainer.fit(module, datamodule=datamodule)
    assert len(logged) == 2 and logged[0] == logged[1]  # logged at every validation, scored at the first only
    batches = len(seen)
    assert batches == len(trainer.val_dataloaders)
    expected = {}
    for name, fill in {"blur_fill": blur_fill, "mean_fill": mean_fill}.items():
        metrics = ReconstructionMetrics()
        for images, hidden in seen:
            metrics.update(fill(images, hidden), images, hidden, modality="ct")
        expected[name] = {key: float(value) for key, value in metrics.compute().items()}
    for name in expected:
        assert logged[0][f"val/psnr_masked_{name}"] == pytest.approx(expected[name]["psnr_masked"], rel=1e-5)
        assert logged[0][f"val/ssim_masked_{name}"] == pytest.approx(expected[name]["ssim_masked"], rel=1e-5)
    # The hidden voxels are the model's validation masks: 75 % of each superpatch under dual 0.5/0.5.
    images, hidden = seen[0]
    assert float(hidden.float().mean()) == pytest.approx(0.75)
    assert logged[0]["val/psnr_masked_blur_fill"] > logged[0]["val/psnr_masked_mean_fill"]
