"""Training-step throughput of S3D: sparse encoder (``sparse: true``) vs the dense zero-fill MAE (``sparse: false``).

Both run the ``cpu`` ResEnc U-Net preset (features 16-32-64-128, blocks 1-2-2-2, strides 1-2-2-2) on the demo size
(batch 2 x 64^3 x 1 channel), 16^3 mask blocks, one mask ratio from U(0.6, 0.9) per step, the same masked-voxel MSE
and the paper's optimizer (SGD, Nesterov momentum 0.99, lr 1e-2, weight decay 3e-5). One step is mask drawing +
forward + backward + optimizer step. The two networks start from the same weights; their steps alternate after a
warm-up (who goes first alternates too), so machine load affects both alike; medians are reported, with the ratio
sparse / plain (> 1: the sparse layers' extra masking costs time). The parameter count of the paper's ResEnc-L S3D
network is printed as well.

    python benchmarks/s3d_throughput.py [--threads N] [--steps 20] [--warmup 3] [--batch-size 2] [--size 64]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from maesil.models.parameters import count_parameters
from maesil.models.presets import from_preset
from maesil.models.sparse import SparseMaskedUNet, block_mask, draw_mask_ratio, mask_grid, masked_mse, upsample_mask
from maesil.models.unet import UNET_PRESETS

BLOCK, RATIO_RANGE, CHANNELS = 16, (0.6, 0.9), 1


def build(preset: str, sparse: bool) -> SparseMaskedUNet:
    return from_preset(SparseMaskedUNet, UNET_PRESETS, preset, in_channels=CHANNELS, block_size=BLOCK, sparse=sparse)


def step(model: SparseMaskedUNet, opt: torch.optim.Optimizer, images: Tensor) -> float:
    ratio = draw_mask_ratio(0.75, RATIO_RANGE)
    mask = block_mask(images.shape[0], mask_grid(images.shape[2:], BLOCK), ratio, device=images.device)
    loss = masked_mse(model(images, mask), images, upsample_mask(mask, BLOCK))
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
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant (alternating)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--size", type=int, default=64, help="superpatch side (a multiple of 16)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    images = torch.rand(args.batch_size, CHANNELS, args.size, args.size, args.size)
    sparse, plain = build("cpu", sparse=True).train(), build("cpu", sparse=False).train()
    plain.load_state_dict(sparse.state_dict(), strict=False)  # same weights; plain has no mask tokens
    optimizers = {
        name: torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
        for name, model in (("sparse", sparse), ("plain", plain))
    }
    runs = {
        "S3D sparse (sparse: true)": lambda: step(sparse, optimizers["sparse"], images),
        "zero-fill MAE (sparse: false)": lambda: step(plain, optimizers["plain"], images),
    }
    for _ in range(args.warmup):
        for fn in runs.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(args.steps):
        order = list(runs) if i % 2 == 0 else list(reversed(runs))
        for name in order:
            times[name].append(time_once(runs[name]))

    med = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch_size}, "
        f"{args.size}^3x{CHANNELS}, preset cpu, {BLOCK}^3 blocks, ratio U{RATIO_RANGE}, SGD nesterov, "
        f"{args.steps} alternating steps after {args.warmup} warm-up"
    )
    print(f"{'variant':<31} {'params':>12} {'median s/step':>14} {'min s/step':>11}")
    for name, model in zip(runs, (sparse, plain)):
        print(f"{name:<31} {count_parameters(model):>12,} {med[name]:>14.4f} {min(times[name]):>11.4f}")
    name_sparse, name_plain = list(runs)
    print(f"time ratio (sparse / plain, median): {med[name_sparse] / med[name_plain]:.2f}x")
    with torch.device("meta"):
        resenc_l = build("resenc_l", sparse=True)
    print(f"ResEnc-L S3D network (paper preset): {count_parameters(resenc_l):,} parameters "
          f"({count_parameters(resenc_l.encoder):,} in the encoder)")


if __name__ == "__main__":
    main()
