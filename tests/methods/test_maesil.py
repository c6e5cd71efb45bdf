import pytest
import torch

from maesil.methods import MAESIL


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
