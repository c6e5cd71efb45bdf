import pytest
import torch

from maesil.models.masking import (
    TokenMask,
    dual_mask,
    expected_mask_ratio,
    make_mask,
    random_mask,
    tube_mask,
)

GRIDS = [(4, 4, 4), (3, 5, 2), (8, 8, 8), (6, 4, 7)]
RATIOS = [0.0, 0.5, 0.6, 0.75, 0.9]


def _check_consistent(m: TokenMask, batch: int, n: int) -> None:
    assert m.ids_keep.shape == (batch, m.num_keep) and m.ids_keep.dtype == torch.long
    assert m.ids_restore.shape == (batch, n) and m.ids_restore.dtype == torch.long
    assert m.mask.shape == (batch, n) and m.mask.dtype == torch.bool
    assert m.num_tokens == n
    assert (m.mask.sum(1) == n - m.num_keep).all()
    # kept ids are exactly the unmasked tokens, ascending
    assert (~m.mask.gather(1, m.ids_keep)).all()
    assert (m.ids_keep.diff(dim=1) > 0).all()
    # ids_restore unshuffles cat([kept, masked]) back to grid order
    tokens = torch.arange(n).expand(batch, n)
    kept = tokens.gather(1, m.ids_keep)
    masked = tokens.gather(1, m.ids_masked)
    restored = torch.cat([kept, masked], 1).gather(1, m.ids_restore)
    assert torch.equal(restored, tokens)
    assert m.mask.gather(1, m.ids_masked).all()


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_random_mask_counts(grid, ratio):
    n = grid[0] * grid[1] * grid[2]
    m = random_mask(3, grid, ratio, generator=torch.Generator().manual_seed(0))
    assert m.num_keep == round(n * (1 - ratio))
    assert m.ratio == pytest.approx(expected_mask_ratio("random", grid, ratio))
    _check_consistent(m, 3, n)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_tube_mask_counts_and_shared_over_z(grid, ratio):
    gx, gy, gz = grid
    n = gx * gy * gz
    m = tube_mask(3, grid, ratio, generator=torch.Generator().manual_seed(1))
    keep_xy = round(gx * gy * (1 - ratio))
    assert m.num_keep == keep_xy * gz
    assert m.ratio == pytest.approx(expected_mask_ratio("tube", grid, ratio))
    _check_consistent(m, 3, n)
    grid_mask = m.mask.view(3, gx, gy, gz)
    assert (grid_mask == grid_mask[..., :1]).all()  # identical in every z slice


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize(("tube_ratio", "axial_ratio"), [(0.5, 0.5), (0.75, 0.0), (0.0, 0.75), (0.4, 0.6), (0.6, 0.3)])
def test_dual_mask_counts_per_slice_and_superset_of_tube(grid, tube_ratio, axial_ratio):
    gx, gy, gz = grid
    n = gx * gy * gz
    keep_xy = round(gx * gy * (1 - tube_ratio))
    keep_slice = round(keep_xy * (1 - axial_ratio))
    if keep_slice == 0:
        with pytest.raises(ValueError):
            dual_mask(2, grid, tube_ratio, axial_ratio)
        return
    m = dual_mask(3, grid, tube_ratio, axial_ratio, generator=torch.Generator().manual_seed(2))
    assert m.num_keep == keep_slice * gz
    assert m.ratio == pytest.approx(expected_mask_ratio("dual", grid, tube_ratio, axial_ratio))
    _check_consistent(m, 3, n)
    grid_mask = m.mask.view(3, gx, gy, gz)
    visible_per_slice = (~grid_mask).sum(dim=(1, 2))  # (B, gz)
    assert (visible_per_slice == keep_slice).all()
    # all visible tokens lie in at most keep_xy in-plane columns (the tube-visible ones)
    columns_with_visible = (~grid_mask).any(dim=-1).sum(dim=(1, 2))
    assert (columns_with_visible <= keep_xy).all()


def test_dual_mask_contains_tube_mask_with_same_generator_state():
    grid = (6, 6, 5)
    tube = tube_mask(4, grid, 0.5, generator=torch.Generator().manual_seed(7))
    dual = dual_mask(4, grid, 0.5, 0.5, generator=torch.Generator().manual_seed(7))
    assert (dual.mask | ~tube.mask).all() and (dual.mask >= tube.mask).all()  # masked set ⊇ tube set
    assert dual.num_keep < tube.num_keep


def test_dual_ratio_close_to_product_rule():
    r = 0.5
    assert expected_mask_ratio("dual", (16, 16, 16), r) == pytest.approx(1 - (1 - r) ** 2, abs=0.01)


def test_masks_differ_across_batch_and_are_seeded():
    for mode in ("random", "tube", "dual"):
        a = make_mask(mode, 4, (6, 6, 6), 0.5, generator=torch.Generator().manual_seed(3))
        b = make_mask(mode, 4, (6, 6, 6), 0.5, generator=torch.Generator().manual_seed(3))
        c = make_mask(mode, 4, (6, 6, 6), 0.5, generator=torch.Generator().manual_seed(4))
        assert torch.equal(a.mask, b.mask) and torch.equal(a.ids_restore, b.ids_restore)
        assert not torch.equal(a.mask, c.mask)
        assert not torch.equal(a.mask[0], a.mask[1])


def test_make_mask_dispatch_and_axial_default():
    g = torch.Generator().manual_seed(5)
    assert make_mask("dual", 2, (4, 4, 4), 0.5, generator=g).num_keep == round(round(16 * 0.5) * 0.5) * 4
    assert make_mask("tube", 2, (4, 4, 4), 0.5).num_keep == 8 * 4
    assert make_mask("random", 2, (4, 4, 4), 0.5).num_keep == 32


@pytest.mark.parametrize(
    "call",
    [
        lambda: random_mask(2, (4, 4, 4), 1.0),
        lambda: random_mask(2, (4, 4, 4), -0.1),
        lambda: random_mask(2, (1, 1, 1), 0.75),  # keeps round(0.25) = 0 tokens
        lambda: random_mask(0, (4, 4, 4), 0.5),
        lambda: random_mask(2, (4, 0, 4), 0.5),
        lambda: tube_mask(2, (2, 1, 8), 0.9),
        lambda: dual_mask(2, (4, 4, 4), 0.5, 1.0),
        lambda: make_mask("random", 2, (4, 4, 4), 0.5, axial_ratio=0.5),
        lambda: make_mask("tube", 2, (4, 4, 4), 0.5, axial_ratio=0.5),
        lambda: make_mask("block", 2, (4, 4, 4), 0.5),  # type: ignore[arg-type]
        lambda: expected_mask_ratio("random", (4, 4, 4), 1.5),
    ],
)
def test_value_errors(call):
    with pytest.raises(ValueError):
        call()


def test_token_mask_to_device():
    m = random_mask(2, (4, 4, 4), 0.5)
    moved = m.to("cpu")
    assert torch.equal(moved.mask, m.mask) and moved.num_keep == m.num_keep
