"""Training-step throughput: maesil ``MaskedAutoencoder3D`` vs MONAI ``MaskedAutoEncoderViT``.

Both models get the identical configuration (64^3 x 1 channel, 8^3 tokens, encoder 192 wide x 6 blocks x 4 heads,
MLP 768, decoder 192 wide x 2 blocks x 4 heads, MLP 768, qkv bias, fixed sin-cos positions, 75 % random masking)
and the same loss (per-patch MSE averaged over the masked patches, computed from MONAI's ``(pred, mask)``
output). One step is mask generation + forward + backward + AdamW step; MONAI draws its mask inside ``forward``,
ours is drawn by ``make_mask`` inside the timed step. Both use the same AdamW implementation (``--adamw``; the
fused CPU kernel by default, since torch's per-parameter for-loop default costs both models ~30 ms per step).
Ours runs with its defaults, i.e. the last decoder block only for masked queries (``decode_visible=False``:
identical loss and gradients, no prediction for visible patches). Steps of the two models alternate after a
warm-up, so machine load affects both alike; medians are reported.

    python benchmarks/mae_throughput.py [--threads N] [--steps 20] [--batch-size 2] [--warmup 3] [--adamw fused]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from maesil.models.mae import MaskedAutoencoder3D
from maesil.models.masking import make_mask
from maesil.models.parameters import count_parameters
from maesil.models.vit3d import patchify

SUPERPATCH, TOKEN, CHANNELS = 64, 8, 1
HIDDEN, DEPTH, HEADS, MLP = 192, 6, 4, 768
DEC_HIDDEN, DEC_DEPTH, DEC_HEADS, DEC_MLP = 192, 2, 4, 768
MASK_RATIO = 0.75


def build_ours() -> MaskedAutoencoder3D:
    return MaskedAutoencoder3D(
        superpatch_size=SUPERPATCH, token_size=TOKEN, in_channels=CHANNELS, embed_dim=HIDDEN, depth=DEPTH, num_heads=HEADS,
        mlp_ratio=MLP / HIDDEN, decoder_embed_dim=DEC_HIDDEN, decoder_depth=DEC_DEPTH, decoder_num_heads=DEC_HEADS,
    )  # fmt: skip


def build_monai() -> nn.Module:
    from monai.networks.nets import MaskedAutoEncoderViT

    return MaskedAutoEncoderViT(
        in_channels=CHANNELS, img_size=SUPERPATCH, patch_size=TOKEN, hidden_size=HIDDEN, mlp_dim=MLP, num_layers=DEPTH,
        num_heads=HEADS, masking_ratio=MASK_RATIO, decoder_hidden_size=DEC_HIDDEN, decoder_mlp_dim=DEC_MLP,
        decoder_num_layers=DEC_DEPTH, decoder_num_heads=DEC_HEADS, qkv_bias=True,
    )  # fmt: skip


def ours_step(model: MaskedAutoencoder3D, opt: torch.optim.Optimizer, images: Tensor) -> float:
    mask = make_mask("random", images.shape[0], model.grid, MASK_RATIO, device=images.device)
    loss = model(images, mask).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def monai_step(model: nn.Module, opt: torch.optim.Optimizer, images: Tensor) -> float:
    pred, mask = model(images)  # (B, N, p^3) prediction for every patch, (B, N) int mask with 1 = masked
    target = patchify(images, TOKEN)  # same token order as MONAI's conv embedding (z fastest)
    per_patch = (pred - target).square().mean(dim=-1)
    weight = mask.to(per_patch.dtype)
    loss = (per_patch * weight).sum() / weight.sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


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
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="torch.meshgrid")  # emitted inside MONAI
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    images = torch.randn(args.batch_size, CHANNELS, SUPERPATCH, SUPERPATCH, SUPERPATCH)
    ours, monai = build_ours().train(), build_monai().train()
    opt_kwargs = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[args.adamw]
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, **opt_kwargs)
    opt_monai = torch.optim.AdamW([p for p in monai.parameters() if p.requires_grad], lr=1e-4, **opt_kwargs)
    runs = {
        "maesil MaskedAutoencoder3D": lambda: ours_step(ours, opt_ours, images),
        "MONAI MaskedAutoEncoderViT": lambda: monai_step(monai, opt_monai, images),
    }
    for _ in range(args.warmup):
        for fn in runs.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(args.steps):
        order = list(runs) if i % 2 == 0 else list(reversed(runs))  # alternate who goes first
        for name in order:
            times[name].append(time_once(runs[name]))

    med = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch_size}, "
        f"{SUPERPATCH}^3x{CHANNELS}, tokens {TOKEN}^3, mask {MASK_RATIO}, AdamW {args.adamw}, "
        f"{args.steps} alternating steps after {args.warmup} warm-up"
    )
    print(f"{'model':<28} {'params (trainable/total)':>26} {'median s/step':>14} {'min s/step':>11}")
    for (name, model) in zip(runs, (ours, monai)):
        trainable, total = count_parameters(model, trainable_only=True), count_parameters(model)
        print(f"{name:<28} {f'{trainable:,} / {total:,}':>26} {med[name]:>14.4f} {min(times[name]):>11.4f}")
    name_ours, name_monai = list(runs)
    print(f"speed-up (MONAI / ours, median): {med[name_monai] / med[name_ours]:.2f}x")


if __name__ == "__main__":
    main()
