import math

import pytest
import torch
from torch import nn

import maesil.optim
from maesil.optim import WarmupCosineLR, decay_parameter_groups, prefers_fused, warmup_cosine, with_fused_step


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


# ------------------------------------------------------------------------------------------ fused Adam(W)
CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


@pytest.mark.parametrize("optimizer_class, given, device, fused", [
    (torch.optim.AdamW, {}, CUDA, True),
    (torch.optim.Adam, {}, CUDA, True),
    (torch.optim.AdamW, {}, CPU, False),
    (torch.optim.AdamW, {"fused": False}, CUDA, False),
    (torch.optim.AdamW, {"foreach": True}, CUDA, False),
    (torch.optim.AdamW, {"foreach": False}, CUDA, False),
    (torch.optim.AdamW, {"differentiable": True}, CUDA, False),
    (torch.optim.SGD, {}, CUDA, False),
])  # fmt: skip
def test_fused_is_chosen_for_adam_on_cuda_unless_the_user_chose_a_kernel(optimizer_class, given, device, fused):
    settings = optimizer_class([nn.Parameter(torch.zeros(2))], lr=1e-3, **given).defaults
    assert prefers_fused(optimizer_class, settings, device) is fused


def test_an_optimizer_on_the_cpu_is_kept_as_built():
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(2))])
    assert with_fused_step(optimizer) is optimizer


def test_the_fused_rebuild_keeps_every_group_s_settings_and_steps_alike(monkeypatch):
    # torch has a fused Adam step on the CPU too: the rebuild is exercised here as if the CPU were a GPU
    monkeypatch.setattr(maesil.optim, "prefers_fused",
                        lambda cls, settings, device: settings.get("fused") is None and settings.get("foreach") is None)
    torch.manual_seed(0)
    weights, bias = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(4))
    groups = lambda: [{"params": [weights]}, {"params": [bias], "weight_decay": 0.0, "lr_scale": 0.5}]  # noqa: E731
    plain = torch.optim.AdamW(groups(), lr=0.1, betas=(0.9, 0.95), weight_decay=0.05)
    fused = with_fused_step(torch.optim.AdamW(groups(), lr=0.1, betas=(0.9, 0.95), weight_decay=0.05))
    assert type(fused) is torch.optim.AdamW and fused.defaults["fused"] is True
    assert [group["fused"] for group in fused.param_groups] == [True, True]
    assert [(g["lr"], g["betas"], g["weight_decay"], g.get("lr_scale")) for g in fused.param_groups] == [
        (0.1, (0.9, 0.95), 0.05, None), (0.1, (0.9, 0.95), 0.0, 0.5)]
    assert [group["params"] for group in fused.param_groups] == [[weights], [bias]]
    start = [weights.detach().clone(), bias.detach().clone()]
    gradients = [torch.randn(4, 3), torch.randn(4)]
    results = []
    for optimizer in (plain, fused):
        with torch.no_grad():
            weights.copy_(start[0]), bias.copy_(start[1])
        weights.grad, bias.grad = gradients[0].clone(), gradients[1].clone()
        optimizer.step()
        results.append([weights.detach().clone(), bias.detach().clone()])
    torch.testing.assert_close(results[1], results[0])
    assert not torch.equal(results[0][0], start[0])


def test_an_optimizer_whose_gradients_are_clipped_keeps_its_unfused_step(monkeypatch):
    # Lightning's mixed-precision plugin refuses to clip for an optimizer that unscales gradients itself
    # (fused): with gradient clipping the optimizer stays as built, even where fused would be chosen.
    monkeypatch.setattr(maesil.optim, "prefers_fused", lambda cls, settings, device: True)
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(2))])
    assert with_fused_step(optimizer, clips_gradients=True) is optimizer
    assert with_fused_step(optimizer).defaults["fused"] is True
