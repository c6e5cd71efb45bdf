"""Parameter counts, the one place they are computed (model summaries, benchmark tables, exports)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import Tensor, nn

__all__ = ["count_parameters"]


def count_parameters(source: nn.Module | Mapping[str, Tensor] | Iterable[Tensor], trainable_only: bool = False) -> int:
    """Number of scalar parameters of a module, a state dict or an iterable of tensors.

    For a module, frozen parameters count too unless ``trainable_only`` (e.g. the VQ-VAE codebook, learned
    by moving averages without gradients). ``trainable_only`` applies to modules only.
    """
    if isinstance(source, nn.Module):
        return sum(p.numel() for p in source.parameters() if p.requires_grad or not trainable_only)
    tensors = source.values() if isinstance(source, Mapping) else source
    return sum(t.numel() for t in tensors)
