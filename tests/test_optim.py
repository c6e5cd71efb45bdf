import math

import pytest
import torch
from torch import nn

from maesil.optim import WarmupCosineLR, decay_parameter_groups, warmup_cosine


def make_optimizer(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)


def learning_rates(scheduler: WarmupCosineLR, steps: int) -> list[float]:
    rates = []
    for _ in range(steps):
        rates.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return rates


def test_warmup_is_linear_then_cosine_reaches_min():
    scheduler = WarmupCosineLR(make_optimizer(), total_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    rates = learning_rates(scheduler, 111)
    assert rates[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert rates[10] == pytest.approx(1.0)
    assert rates[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert rates[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))


def test_scheduler_validates_arguments():
    with pytest.raises(ValueError, match="total_steps"):
        WarmupCosineLR(make_optimizer(), total_steps=0)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        WarmupCosineLR(make_optimizer(), total_steps=10, min_lr_ratio=2.0)


def test_default_schedule_warms_up_five_percent():
    scheduler = warmup_cosine(make_optimizer(), total_steps=400)
    assert scheduler.warmup_steps == 20 and scheduler.total_steps == 400


def test_decay_groups_exclude_biases_norms_and_mask_token():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, 4))

    groups = decay_parameter_groups(Net(), ["mask_token"])
    assert [p.shape for p in groups[0]["params"]] == [torch.Size([4, 4])]
    assert len(groups[1]["params"]) == 4 and groups[1]["weight_decay"] == 0.0


# PolyLR ------------------------------------------------------------------------------------------------------


def test_poly_lr_follows_nnunet_decay():
    from maesil.optim import PolyLR

    scheduler = PolyLR(make_optimizer(), total_steps=100, exponent=0.9)
    rates = learning_rates(scheduler, 101)
    assert rates[:4] == pytest.approx([(1 - step / 100) ** 0.9 for step in range(4)])
    assert rates[50] == pytest.approx(0.5**0.9)
    assert rates[100] == 0.0
    assert all(a > b for a, b in zip(rates[:100], rates[1:101]))


def test_poly_lr_warms_up_linearly_then_decays_over_the_rest():
    from maesil.optim import PolyLR

    scheduler = PolyLR(make_optimizer(), total_steps=110, exponent=2.0, warmup_steps=10)
    rates = learning_rates(scheduler, 111)
    assert rates[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert rates[10] == pytest.approx(1.0)
    assert rates[60] == pytest.approx(0.25)
    assert rates[110] == 0.0


def test_poly_lr_is_built_like_the_other_schedulers_and_validates_arguments():
    from functools import partial

    from maesil.optim import PolyLR

    factory = partial(PolyLR, exponent=0.9, warmup_steps=0)  # what jsonargparse builds from class_path/init_args
    scheduler = factory(make_optimizer(lr=1e-2), 1000)
    assert scheduler.total_steps == 1000 and scheduler.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2)
    with pytest.raises(ValueError, match="total_steps"):
        PolyLR(make_optimizer(), total_steps=0)
    with pytest.raises(ValueError, match="exponent"):
        PolyLR(make_optimizer(), total_steps=10, exponent=-1.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        PolyLR(make_optimizer(), total_steps=10, warmup_steps=-1)
