"""The report of which scaled_dot_product_attention kernel runs for a ViT's attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from maesil.models.attention_backend import SDPA_BACKENDS, sdpa_report


def test_the_kernels_are_tried_in_the_order_flash_efficient_cudnn_math():
    assert list(SDPA_BACKENDS) == ["flash", "efficient", "cudnn", "math"]
    assert SDPA_BACKENDS["math"] is SDPBackend.MATH


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_the_cpu_the_math_kernel_runs_and_the_selected_one_is_available(dtype):
    report = sdpa_report(head_dim=96, dtype=dtype)
    assert report.device == "cpu" and report.head_dim == 96 and report.dtype == str(dtype).removeprefix("torch.")
    assert "math" in report.available and "cudnn" not in report.available and "efficient" not in report.available
    assert report.available == tuple(name for name in SDPA_BACKENDS if name in report.available)  # in order
    assert report.selected in report.available
    assert str(report) == (f"attention: {report.selected} kernel ({report.dtype}, head dim 96, cpu; available: "
                           f"{', '.join(report.available)})")


def test_the_selected_kernel_is_the_one_torch_runs():
    """Each available kernel alone gives the attention torch computes when free to choose; the selected one
    gives it exactly (same kernel, same arithmetic)."""
    report = sdpa_report(head_dim=32)
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 16, 32).unbind(0)
    free = F.scaled_dot_product_attention(q, k, v)
    with sdpa_kernel([SDPA_BACKENDS[report.selected]]):
        assert torch.equal(F.scaled_dot_product_attention(q, k, v), free)


def test_a_trial_size_below_one_is_refused():
    with pytest.raises(ValueError, match="head_dim, num_heads and tokens must be >= 1, got 0, 2, 16"):
        sdpa_report(head_dim=0)
