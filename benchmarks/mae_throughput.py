"""Training-step throughput: maesil ``MaskedAutoencoder3D`` vs MONAI ``MaskedAutoEncoderViT``.

Both models get the identical configuration (``--size demo``: 64^3 x 1 channel, 8^3 tokens, encoder 192 wide x 6
blocks x 4 heads, MLP 768, decoder 192 wide x 2 blocks x 4 heads, MLP 768; ``--size paper``, the sizes of
``experiments/pretrain/maesil.yaml``: 128^3, 8^3 tokens, encoder 768 x 6 blocks x 8 heads, MLP 3072, decoder 384 x 4
blocks x 8 heads, MLP 1536; both with qkv bias, fixed sin-cos positions, 75 % random masking)
and the same loss (per-patch MSE averaged over the masked patches, computed from MONAI's ``(pred, mask)``
output). One step is mask generation + forward + backward + AdamW step; MONAI draws its mask inside ``forward``,
ours is drawn by ``make_mask`` inside the timed step. Both use the same AdamW implementation (``--adamw``; the
fused CPU kernel by default, since torch's per-parameter for-loop default costs both models ~30 ms per step).
Ours runs with its defaults, i.e. the last decoder block only for masked queries (``decode_visible=False``:
identical loss and gradients, no prediction for visible patches). Steps of the two models alternate after a
warm-up, so machine load affects both alike; medians are reported. ``--device cuda --precision bf16`` runs both
under bf16 autocast on the GPU (each step ends with the loss read back, so the timing includes the GPU's work).

    python benchmarks/mae_throughput.py [--threads N] [--steps 20] [--batch-size 2] [--warmup 3] [--adamw fused]
    python benchmarks/mae_throughput.py --size paper --device cuda --precision bf16 --batch-size 4
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from maesil.models.mae import MaskedAutoencoder3D
from maesil.models.masking import make_mask
from maesil.models.parameters import count_parameters
from maesil.models.vit3d import patchify

TOKEN, CHANNELS, MASK_RATIO = 8, 1, 0.75


@dataclass(frozen=True)
class Size:
    """The shared configuration of both models."""

    superpatch: int
    hidden: int
    depth: int
    heads: int
    mlp: int
    dec_hidden: int
    dec_depth: int
    dec_heads: int
    dec_mlp: int


SIZES = {
    "demo": Size(64, 192, 6, 4, 768, 192, 2, 4, 768),
    "paper": Size(128, 768, 6, 8, 3072, 384, 4, 8, 1536),  # experiments/pretrain/maesil.yaml
}


def build_ours(size: Size) -> MaskedAutoencoder3D:
    return MaskedAutoencoder3D(
        superpatch_size=size.superpatch, token_size=TOKEN, in_channels=CHANNELS, embed_dim=size.hidden,
        depth=size.depth, num_heads=size.heads, mlp_ratio=size.mlp / size.hidden, decoder_embed_dim=size.dec_hidden,
        decoder_depth=size.dec_depth, decoder_num_heads=size.dec_heads,
    )  # fmt: skip  # the decoder's MLP takes the same ratio (4): dec_mlp = 4 x dec_hidden


def build_monai(size: Size) -> nn.Module:
    from monai.networks.nets import MaskedAutoEncoderViT

    return MaskedAutoEncoderViT(
        in_channels=CHANNELS, img_size=size.superpatch, patch_size=TOKEN, hidden_size=size.hidden, mlp_dim=size.mlp,
        num_layers=size.depth, num_heads=size.heads, masking_ratio=MASK_RATIO, decoder_hidden_size=size.dec_hidden,
        decoder_mlp_dim=size.dec_mlp, decoder_num_layers=size.dec_depth, decoder_num_heads=size.dec_heads,
        qkv_bias=True,
    )  # fmt: skip


def ours_step(model: MaskedAutoencoder3D, opt: torch.optim.Optimizer, images: Tensor,
              autocast: Callable[[], AbstractContextManager] = nullcontext) -> float:
    mask = make_mask("random", images.shape[0], model.grid, MASK_RATIO, device=images.device)
    with autocast():
        loss = model(images, mask).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def monai_step(model: nn.Module, opt: torch.optim.Optimizer, images: Tensor,
               autocast: Callable[[], AbstractContextManager] = nullcontext) -> float:
    with autocast():
        pred, mask = model(images)  # (B, N, p^3) prediction for every patch, (B, N) int mask with 1 = masked
    target = patchify(images, TOKEN)  # same token order as MONAI's conv embedding (z fastest)
    per_patch = (pred.float() - target).square().mean(dim=-1)
    weight = mask.to(per_patch.dtype)
    loss = (per_patch * weight).sum() / weight.sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def time_once(fn: Callable[[], float]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's default)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model (alternating)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--adamw",
        choices=("fused", "foreach", "for-loop"),
        default="fused",
        help="AdamW implementation, the same for both models (torch's CPU default is the for-loop one)",
    )
    parser.add_argument("--size", choices=list(SIZES), default="demo", help="model and superpatch sizes (default demo)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="fp32, or bf16 autocast (weights and optimizer in fp32)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="torch.meshgrid")  # emitted inside MONAI
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    size, device = SIZES[args.size], torch.device(args.device)
    images = torch.randn(args.batch_size, CHANNELS, size.superpatch, size.superpatch, size.superpatch, device=device)
    ours, monai = build_ours(size).to(device).train(), build_monai(size).to(device).train()
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.precision == "bf16" else nullcontext
    opt_kwargs = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[args.adamw]
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, **opt_kwargs)
    opt_monai = torch.optim.AdamW([p for p in monai.parameters() if p.requires_grad], lr=1e-4, **opt_kwargs)
    runs = {
        "maesil MaskedAutoencoder3D": lambda: ours_step(ours, opt_ours, images, autocast),
        "MONAI MaskedAutoEncoderViT": lambda: monai_step(monai, opt_monai, images, autocast),
    }
    models = dict(zip(runs, (ours, monai)))
    failed: dict[str, str] = {}
    for name, fn in list(runs.items()):  # a model that cannot run this configuration is reported, not timed
        try:
            for _ in range(args.warmup):
                fn()
        except RuntimeError as error:
            failed[name] = str(error).splitlines()[0]
            del runs[name]
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(args.steps):
        order = list(runs) if i % 2 == 0 else list(reversed(runs))  # alternate who goes first
        for name in order:
            times[name].append(time_once(runs[name]))

    med = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"torch {torch.__version__}, {device_name(device)}, threads {torch.get_num_threads()}, {args.precision}, "
        f"batch {args.batch_size}, size {args.size}: {size.superpatch}^3x{CHANNELS}, encoder {size.hidden} x "
        f"{size.depth}, tokens {TOKEN}^3, mask {MASK_RATIO}, AdamW {args.adamw}, "
        f"{args.steps} alternating steps after {args.warmup} warm-up"
    )
    print(f"{'model':<28} {'params (trainable/total)':>26} {'median s/step':>14} {'min s/step':>11}")
    for name, model in models.items():
        trainable, total = count_parameters(model, trainable_only=True), count_parameters(model)
        timing = (f"{med[name]:>14.4f} {min(times[name]):>11.4f}" if name in med
                  else f"  does not run: {failed[name]}")
        print(f"{name:<28} {f'{trainable:,} / {total:,}':>26} {timing}")
    name_ours, name_monai = list(models)
    if name_ours in med and name_monai in med:
        print(f"speed-up (MONAI / ours, median): {med[name_monai] / med[name_ours]:.2f}x")

if __name__ == "__main__":
    main()
