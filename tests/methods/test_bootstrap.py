"""BYOL machinery shared by PGL and global BYOL: momentum schedule, EMA, loss, collapse indicator."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from maesil.methods.bootstrap import bootstrap_loss, cosine_momentum, ema_update, embedding_spread


def test_cosine_momentum_runs_from_base_to_final():
    assert cosine_momentum(0, 100, 0.99, 1.0) == pytest.approx(0.99)
    assert cosine_momentum(100, 100, 0.99, 1.0) == pytest.approx(1.0)
    assert cosine_momentum(50, 100, 0.99, 1.0) == pytest.approx(0.995)
    assert cosine_momentum(25, 100, 0.99, 1.0) == pytest.approx(1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2)
    assert cosine_momentum(500, 100, 0.99, 1.0) == pytest.approx(1.0)  # clamped after the end
    steps = [cosine_momentum(k, 40) for k in range(41)]
    assert all(a <= b for a, b in zip(steps, steps[1:]))


def test_ema_update_matches_its_formula_and_copies_buffers():
    torch.manual_seed(0)
    online, target = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    online[1].running_mean.fill_(0.7)
    before = [p.detach().clone() for p in target.parameters()]
    ema_update(target, online, momentum=0.9)
    for old, new, source in zip(before, target.parameters(), online.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * source.detach())
    torch.testing.assert_close(target[1].running_mean, torch.full((4,), 0.7))
    ema_update(target, online, momentum=0.0)  # momentum 0 copies
    for new, source in zip(target.parameters(), online.parameters()):
        torch.testing.assert_close(new, source.detach())


def test_bootstrap_loss_is_zero_when_outputs_agree_and_at_most_four():
    x = torch.randn(6, 8, 3, 3, 3)
    assert bootstrap_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert bootstrap_loss(x, 5.0 * x).item() == pytest.approx(0.0, abs=1e-6)  # scale-invariant
    assert bootstrap_loss(x, -x).item() == pytest.approx(4.0, abs=1e-5)
    y = torch.randn(6, 8, 3, 3, 3)
    assert bootstrap_loss(x, y).item() == pytest.approx(bootstrap_loss(y, x).item())
    cos = torch.nn.functional.cosine_similarity(x, y, dim=1)
    assert bootstrap_loss(x, y).item() == pytest.approx((2 - 2 * cos).mean().item(), rel=1e-5)


def test_embedding_spread_flags_collapse():
    torch.manual_seed(0)
    spread = embedding_spread(torch.randn(4096, 64)).item()
    assert 0.9 < spread < 1.1
    collapsed = torch.randn(1, 64).expand(256, 64) + 1e-4 * torch.randn(256, 64)
    assert embedding_spread(collapsed).item() < 0.01
    with pytest.raises(ValueError, match="N >= 2"):
        embedding_spread(torch.randn(1, 8))
