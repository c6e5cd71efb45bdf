"""Two-view sampling for BYOL-style methods: rendering, geometry, settings and the "two_view" task."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from maesil.data import VolumeDataModule
from maesil.data.tasks import TASKS, get_task
from maesil.data.views import (
    TwoViewTask,
    ViewSettings,
    box_intersection,
    box_volume,
    draw_view_geometry,
    overlap_fraction,
    render_view,
    sample_view_pair,
    validation_generator,
)

SUPER = (32, 32, 32)
VIEW = (16, 16, 16)
TWO_VIEW_KEYS = {"image", "subject_id", "location", "view1", "view2", "box1", "box2", "flip1", "flip2", "overlap"}


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _image(shape=(12, 10, 8), channels: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.rand(channels, *shape, generator=_generator(seed))


def _positions(lo: float, hi: float, n: int) -> torch.Tensor:
    """Edge coordinates sampled by a view of ``n`` voxels of the interval [lo, hi)."""
    return lo + (torch.arange(n, dtype=torch.float64) + 0.5) * (hi - lo) / n


# ---------------------------------------------------------------- rendering


def test_render_full_box_is_identity() -> None:
    image = _image(channels=2)
    out = render_view(image, (0, 0, 0, 12, 10, 8), (False, False, False), (12, 10, 8))
    assert out.shape == image.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, image, atol=1e-5, rtol=0)
    torch.testing.assert_close(render_view(image, (0, 0, 0, 12, 10, 8)), image, atol=1e-5, rtol=0)  # defaults


def test_render_exact_voxels_is_a_slice() -> None:
    image = _image()
    out = render_view(image, (2, 0, 0, 6, 10, 8), None, (4, 10, 8))
    torch.testing.assert_close(out, image[:, 2:6], atol=1e-5, rtol=0)
    out = render_view(image, (2, 3, 1, 6, 8, 7), None, (4, 5, 6))
    torch.testing.assert_close(out, image[:, 2:6, 3:8, 1:7], atol=1e-5, rtol=0)


@pytest.mark.parametrize("flips", [(True, False, False), (False, True, True), (True, True, True)])
def test_render_flip_equals_torch_flip(flips: tuple[bool, bool, bool]) -> None:
    image = _image()
    box = (1.3, 0.5, 2.0, 11.0, 9.2, 7.5)
    plain = render_view(image, box, None, (7, 5, 6))
    flipped = render_view(image, box, flips, (7, 5, 6))
    dims = [1 + axis for axis, flag in enumerate(flips) if flag]
    torch.testing.assert_close(flipped, torch.flip(plain, dims), atol=0, rtol=0)


def test_render_linear_ramp_matches_analytic_positions() -> None:
    shape, (a, b, c) = (12, 10, 8), (0.7, -1.3, 2.1)
    centres = [torch.arange(n, dtype=torch.float64) + 0.5 for n in shape]  # voxel centres, edge coordinates
    x, y, z = torch.meshgrid(*centres, indexing="ij")
    ramp = (a * x + b * y + c * z).float()[None]
    box, size = (1.5, 2.0, 0.8, 10.7, 8.0, 7.2), (5, 6, 4)
    out = render_view(ramp, box, None, size)[0].double()
    px, py, pz = (_positions(box[i], box[i + 3], size[i]) for i in range(3))
    expected = a * px[:, None, None] + b * py[None, :, None] + c * pz[None, None, :]
    # interior: positions between the first and last voxel centre (no border clamping)
    inside = [(p >= 0.5) & (p <= n - 0.5) for p, n in zip((px, py, pz), shape)]
    mask = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
    assert mask.sum() > 50
    torch.testing.assert_close(out[mask], expected[mask], atol=1e-4, rtol=0)
    # flipping reverses the sample positions
    flipped = render_view(ramp, box, (False, True, False), size)[0].double()
    expected_flipped = a * px[:, None, None] + b * py.flip(0)[None, :, None] + c * pz[None, None, :]
    mask_flipped = mask.flip(1)
    torch.testing.assert_close(flipped[mask_flipped], expected_flipped[mask_flipped], atol=1e-4, rtol=0)


# ---------------------------------------------------------------- boxes


def test_box_numbers() -> None:
    a = torch.tensor([0.0, 0.0, 0.0, 4.0, 4.0, 4.0])
    b = torch.tensor([2.0, 1.0, 3.0, 6.0, 5.0, 5.0])
    torch.testing.assert_close(box_intersection(a, b), torch.tensor([2.0, 1.0, 3.0, 4.0, 4.0, 4.0]))
    assert float(box_volume(a)) == 64.0 and float(box_volume(b)) == 4 * 4 * 2
    assert float(overlap_fraction(a, b)) == pytest.approx(2 * 3 * 1 / 32)
    inner = torch.tensor([1.0, 1.0, 1.0, 2.0, 3.0, 2.0])
    assert float(overlap_fraction(a, inner)) == pytest.approx(1.0)  # contained: all of the smaller box
    assert float(overlap_fraction(a, a)) == pytest.approx(1.0)
    far = torch.tensor([5.0, 0.0, 0.0, 7.0, 4.0, 4.0])
    assert float(box_volume(box_intersection(a, far))) == 0.0 and float(overlap_fraction(a, far)) == 0.0
    touching = torch.tensor([4.0, 0.0, 0.0, 8.0, 4.0, 4.0])
    assert float(overlap_fraction(a, touching)) == 0.0
    batched = overlap_fraction(torch.stack([a, a, a]), torch.stack([b, inner, far]))
    assert batched.shape == (3,)
    torch.testing.assert_close(batched, torch.tensor([6 / 32, 1.0, 0.0]))
    assert box_intersection(torch.stack([a, a]), torch.stack([far, b])).shape == (2, 6)
    assert float(overlap_fraction(a, [1.0, 1.0, 1.0, 1.0, 3.0, 2.0])) == 0.0  # zero-volume box
    with pytest.raises(ValueError, match="6 coordinates"):
        box_volume(torch.zeros(4))


# ---------------------------------------------------------------- sampling


def test_sample_view_pair_geometry() -> None:
    settings = ViewSettings(scale=(0.5, 0.9), min_overlap=0.4, view_size=(6, 5, 4))
    image = _image(shape=(16, 12, 10))
    extent = torch.tensor([16.0, 12.0, 10.0])
    generator = _generator(1)
    for _ in range(200):
        pair = sample_view_pair(image, settings, generator)
        assert pair["view1"].shape == pair["view2"].shape == (1, 6, 5, 4)
        assert pair["view1"].dtype == torch.float32 and pair["view2"].dtype == torch.float32
        for key in ("box1", "box2"):
            box = pair[key]
            assert box.shape == (6,) and box.dtype == torch.float32
            assert (box[:3] >= 0).all() and (box[3:] <= extent).all()
            fraction = (box[3:] - box[:3]) / extent
            assert ((fraction >= 0.5 - 1e-5) & (fraction <= 0.9 + 1e-5)).all()
        assert pair["flip1"].dtype == torch.bool and pair["flip1"].shape == (3,)
        assert pair["overlap"] >= 0.4
        assert float(overlap_fraction(pair["box1"], pair["box2"])) == pytest.approx(pair["overlap"], abs=1e-6)


def test_sample_view_pair_is_reproducible() -> None:
    image = _image()
    first = sample_view_pair(image, ViewSettings(), _generator(7))
    second = sample_view_pair(image, ViewSettings(), _generator(7))
    other = sample_view_pair(image, ViewSettings(), _generator(8))
    for key in ("view1", "view2", "box1", "box2", "flip1", "flip2"):
        assert torch.equal(first[key], second[key])
    assert first["overlap"] == second["overlap"]
    assert not torch.equal(first["box1"], other["box1"])


def test_views_are_jittered_renders() -> None:
    image = _image()
    plain = ViewSettings(brightness=0.0, contrast=0.0, noise_std=0.0)
    pair = sample_view_pair(image, plain, _generator(3))
    torch.testing.assert_close(pair["view1"], render_view(image, pair["box1"], pair["flip1"]), atol=0, rtol=0)
    noisy = sample_view_pair(image, ViewSettings(), _generator(3))
    assert not torch.equal(noisy["view1"], pair["view1"])
    assert (noisy["view1"] - pair["view1"]).abs().max() < 0.5  # small jitter, same geometry draws


def test_flip_frequency() -> None:
    generator = _generator(5)
    for probability in (0.0, 0.25, 1.0):
        settings = ViewSettings(flip_probability=probability, min_overlap=0.0)
        flips = torch.stack([torch.stack([g["flip1"], g["flip2"]])
                             for g in (draw_view_geometry(SUPER, settings, generator) for _ in range(400))])
        assert flips.shape == (400, 2, 3)
        assert abs(flips.float().mean().item() - probability) < 0.05  # 2400 draws: sd ~ 0.009


def test_impossible_settings_raise() -> None:
    settings = ViewSettings(scale=(0.1, 0.1), min_overlap=0.99, max_attempts=20)
    with pytest.raises(RuntimeError, match=r"min_overlap=0\.99.*max_attempts=20"):
        sample_view_pair(_image(shape=SUPER), settings, _generator(0))


@pytest.mark.parametrize("kwargs", [
    {"scale": (0.0, 0.5)}, {"scale": (0.8, 0.6)}, {"scale": (0.5, 1.2)}, {"scale": (0.5,)},
    {"min_overlap": 1.5}, {"min_overlap": -0.1}, {"flip_probability": 1.1}, {"max_attempts": 0},
    {"brightness": -0.1}, {"contrast": -1.0}, {"contrast": 1.5}, {"noise_std": float("nan")},
    {"view_size": 0}, {"view_size": (8, 8)},
])
def test_invalid_settings_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ViewSettings(**kwargs)


def test_settings_are_normalised() -> None:
    settings = ViewSettings(scale=[0.5, 1], view_size=8, max_attempts=3.0)
    assert settings.scale == (0.5, 1.0) and settings.view_size == (8, 8, 8) and settings.max_attempts == 3
    assert settings.view_shape((32, 32, 16)) == (8, 8, 8)
    assert ViewSettings().view_shape((32, 32, 16)) == (32, 32, 16)
    assert ViewSettings(min_overlap=1.0).min_overlap == 1.0  # attainable: identical crops


def test_settings_parse_from_yaml_types() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(VolumeDataModule, "data")
    config = parser.parse_args(["--data.task", "two_view", "--data.views",
                                '{"scale": [0.5, 0.8], "view_size": 16, "min_overlap": 0.2}'])
    init = parser.instantiate_classes(config)
    views = init.data.views
    assert isinstance(views, ViewSettings) and views.scale == (0.5, 0.8) and views.view_size == (16, 16, 16)
    assert init.data.task.views is views


# ---------------------------------------------------------------- task


def test_task_registered_and_picklable() -> None:
    assert TASKS["two_view"] is TwoViewTask and not TwoViewTask.requires_labels
    task = get_task("two_view", label_probabilities=None, views=ViewSettings(view_size=8))
    assert isinstance(task, TwoViewTask) and task.views.view_size == (8, 8, 8)
    assert isinstance(get_task("two_view").views, ViewSettings)
    assert not hasattr(get_task("reconstruct", views=ViewSettings()), "views")  # other tasks ignore it
    again = pickle.loads(pickle.dumps(task))
    assert again.views == task.views


def test_val_collate_equals_seeded_sample_view_pair() -> None:
    settings = ViewSettings(view_size=8)
    task = TwoViewTask(views=settings)
    patches = [{"image": _image(shape=(16, 16, 16), seed=i), "subject_id": f"s{i}",
                "location": torch.tensor([i, 0, 0, 16 + i, 16, 16])} for i in range(3)]
    batch = task.val_collate(patches)
    assert torch.equal(batch["view1"], TwoViewTask(views=settings).val_collate(patches)["view1"])
    for i, patch in enumerate(patches):
        pair = sample_view_pair(patch["image"], settings, validation_generator(patch["subject_id"], patch["location"]))
        for key in ("box1", "box2", "flip1", "flip2"):
            assert torch.equal(batch[key][i], pair[key])
        torch.testing.assert_close(batch["view1"][i], pair["view1"], atol=1e-6, rtol=0)
        torch.testing.assert_close(batch["view2"][i], pair["view2"], atol=1e-6, rtol=0)
    torch.manual_seed(0)
    train = task.collate(patches)
    assert not torch.equal(train["box1"], batch["box1"])  # training draws from the global RNG


# ---------------------------------------------------------------- DataModule


def _dm(data_dir: Path, **kwargs) -> VolumeDataModule:
    args = dict(
        data_dir=str(data_dir), task="two_view", superpatch_size=SUPER, target_spacing=4.0, batch_size=2,
        val_batch_size=2, samples_per_volume=2, queue_length=4, num_workers=0, split_seed=0, val_fraction=0.34,
        views=ViewSettings(view_size=VIEW[0]),
    )
    args.update(kwargs)
    return VolumeDataModule(**args)


def _check_two_view_batch(batch: dict, size: int) -> None:
    assert set(batch) == TWO_VIEW_KEYS
    assert batch["image"].shape == (size, 1, *SUPER) and batch["image"].dtype == torch.float32
    for key in ("view1", "view2"):
        assert batch[key].shape == (size, 1, *VIEW) and batch[key].dtype == torch.float32
        assert torch.isfinite(batch[key]).all()
    for key in ("box1", "box2"):
        assert batch[key].shape == (size, 6) and batch[key].dtype == torch.float32
        assert (batch[key][:, :3] >= 0).all() and (batch[key][:, 3:] <= torch.tensor(SUPER)).all()
    for key in ("flip1", "flip2"):
        assert batch[key].shape == (size, 3) and batch[key].dtype == torch.bool
    assert batch["overlap"].shape == (size,) and batch["overlap"].dtype == torch.float32
    assert (batch["overlap"] >= 0.3 - 1e-6).all()
    assert len(batch["subject_id"]) == size and batch["location"].shape == (size, 6)


def test_datamodule_two_view(tiny_ct_dir: Path) -> None:
    dm = _dm(tiny_ct_dir)
    dm.setup("fit")
    _check_two_view_batch(next(iter(dm.train_dataloader())), 2)
    first, second = list(dm.val_dataloader()), list(dm.val_dataloader())
    assert first and len(first) == len(second)
    for a, b in zip(first, second):
        _check_two_view_batch(a, len(a["subject_id"]))
        for key in ("view1", "view2", "box1", "box2", "flip1", "flip2", "overlap"):
            assert torch.equal(a[key], b[key])  # validation views are deterministic


def test_datamodule_two_view_from_cache(tiny_ct_dir: Path, tmp_path: Path) -> None:
    dm = _dm(tiny_ct_dir, cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    dm.setup("fit")
    _check_two_view_batch(next(iter(dm.train_dataloader())), 2)
    val = next(iter(dm.val_dataloader()))
    _check_two_view_batch(val, len(val["subject_id"]))


def test_views_with_another_task_warn(tiny_ct_dir: Path) -> None:
    with pytest.warns(UserWarning, match="views is ignored for task 'reconstruct'"):
        dm = _dm(tiny_ct_dir, task="reconstruct")
    assert not hasattr(dm.task, "views")
    assert isinstance(_dm(tiny_ct_dir, views=None).task.views, ViewSettings)  # None = defaults
