"""Which ``scaled_dot_product_attention`` kernel runs for a ViT's attention on this device and dtype.

The ViT methods' :class:`~maesil.models.vit3d.Attention` calls ``F.scaled_dot_product_attention`` and
torch picks a kernel per call: flash attention, memory-efficient attention, cuDNN attention or the plain
math implementation. Flash and memory-efficient attention never build the token x token matrix; the math
one does, and costs memory and time at 128³ inputs. :func:`sdpa_report` runs a tiny attention of the
model's head size and dtype under each kernel alone and says which run and which one torch chooses::

    >>> sdpa_report(head_dim=96, dtype=torch.bfloat16, device="cuda").selected   # doctest: +SKIP
    'flash'
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["SDPA_BACKENDS", "SdpaReport", "sdpa_report"]

#: The kernels, in the order they are preferred: name → torch's backend.
SDPA_BACKENDS: dict[str, SDPBackend] = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


@dataclass(frozen=True)
class SdpaReport:
    """Which attention kernels run for one head size, dtype and device.

    Attributes:
        device: the device tried (``"cuda:0"``, ``"cpu"``).
        dtype: the dtype of queries, keys and values (``"bfloat16"``).
        head_dim: channels per head.
        available: the kernels that ran, in the order of :data:`SDPA_BACKENDS`.
        selected: the kernel torch runs when free to choose.
    """

    device: str
    dtype: str
    head_dim: int
    available: tuple[str, ...]
    selected: str

    def __str__(self) -> str:
        return (f"attention: {self.selected} kernel ({self.dtype}, head dim {self.head_dim}, {self.device}; "
                f"available: {', '.join(self.available) or 'none'})")


def _runs(backend: SDPBackend, query: torch.Tensor) -> bool:
    """Whether attention of ``query`` with itself runs with ``backend`` alone."""
    try:
        with warnings.catch_warnings(), sdpa_kernel([backend]):
            warnings.simplefilter("ignore")  # torch warns why each refused kernel cannot run
            F.scaled_dot_product_attention(query, query, query)
    except RuntimeError:
        return False
    return True


def sdpa_report(head_dim: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                num_heads: int = 2, tokens: int = 16) -> SdpaReport:
    """Tries every kernel of :data:`SDPA_BACKENDS` on a tiny ``(1, num_heads, tokens, head_dim)`` attention.

    Args:
        head_dim: channels per head (the model's ``embed_dim / num_heads``); kernels have limits on it.
        dtype: the dtype the attention runs in (under bf16 autocast: ``torch.bfloat16``).
        device: where to try.
        num_heads, tokens: size of the trial; kernel eligibility depends on head size and dtype, not on them.

    Returns:
        the :class:`SdpaReport`; ``selected`` is torch's own choice where torch tells it, else the first
        available kernel.

    Raises:
        ValueError: ``head_dim``, ``num_heads`` or ``tokens`` is below 1.
    """
    if min(head_dim, num_heads, tokens) < 1:
        raise ValueError(f"head_dim, num_heads and tokens must be >= 1, got {head_dim}, {num_heads}, {tokens}")
    query = torch.randn(1, num_heads, tokens, head_dim, dtype=dtype, device=device)
    available = tuple(name for name, backend in SDPA_BACKENDS.items() if _runs(backend, query))
    selected = available[0] if available else "none"
    choose = getattr(torch, "_fused_sdp_choice", None)  # torch's dispatcher decision, where this build has it
    if choose is not None:
        chosen = SDPBackend(choose(query, query, query)) if available else None
        names = {backend: name for name, backend in SDPA_BACKENDS.items()}
        selected = names.get(chosen, selected)
    return SdpaReport(device=str(query.device), dtype=str(dtype).removeprefix("torch."), head_dim=head_dim,
                      available=available, selected=selected)
