"""Training-step throughput of PGL against global BYOL at the CPU demo size, side by side in one run.

Both methods are built from the ``model`` section of their demo YAMLs (experiments/pretrain/pgl_demo.yaml and
byol_demo.yaml: the same small ResEnc U-Net, 48³ superpatches, two views resized to 32³, batch 2). One step
is: online forward of both views, target forward, loss, backward, AdamW step and the EMA update of the target.
The two-view batch is drawn once by the DataModule's own view sampler (``TwoViewTask``) from random
superpatches; drawing the views of a batch is timed separately, as it happens in the loader. Steps of the two
methods alternate after a warm-up, so machine load affects both alike; medians are reported.

    python benchmarks/two_view_throughput.py [--steps 10] [--warmup 2] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import yaml

from maesil.data.views import TwoViewTask, ViewSettings
from maesil.methods import BYOL, PGL
from maesil.methods.bootstrap import BootstrapModule

ROOT = Path(__file__).resolve().parents[1]


def demo_config(method: str) -> dict:
    return yaml.safe_load((ROOT / f"experiments/pretrain/{method}_demo.yaml").read_text())


def build(method: str) -> tuple[BootstrapModule, torch.optim.Optimizer]:
    config = demo_config(method)
    init_args = dict(config["model"]["init_args"])
    optimizer_args = init_args.pop("optimizer")["init_args"]
    init_args.pop("scheduler", None)
    module = {"pgl": PGL, "byol": BYOL}[method](**init_args)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], **optimizer_args)
    module._total_steps = 1000
    return module, optimizer


def two_view_batch(method: str, seed: int = 0) -> tuple[dict, float]:
    """A demo-sized two-view batch from random superpatches, and the seconds its views took to draw."""
    data = demo_config(method)["data"]["init_args"]
    size, batch_size = int(data["superpatch_size"]), int(data["batch_size"])
    task = TwoViewTask(views=ViewSettings(**{k: tuple(v) if isinstance(v, list) else v
                                             for k, v in data["views"].items()}))
    generator = torch.Generator().manual_seed(seed)
    patches = [{"image": torch.rand(1, size, size, size, generator=generator), "subject_id": f"s{i}",
                "location": torch.zeros(6, dtype=torch.long)} for i in range(batch_size)]
    start = time.perf_counter()
    batch = task.collate(patches)
    return batch, time.perf_counter() - start


def step(module: BootstrapModule, optimizer: torch.optim.Optimizer, batch: dict, index: int) -> float:
    start = time.perf_counter()
    loss, _ = module.view_loss(batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    module._ema_step = index - 1
    module.on_train_batch_end(None, batch, index)  # global_step is 0 without a trainer: force one EMA update
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    methods = ("pgl", "byol")
    built = {m: build(m) for m in methods}
    batches = {m: two_view_batch(m) for m in methods}
    for m in methods:
        for _ in range(args.warmup):
            step(*built[m], batches[m][0], 0)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for index in range(args.steps):
        for m in methods:
            times[m].append(step(*built[m], batches[m][0], index))
    batch = batches["pgl"][0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {batch['view1'].shape[0]} x 2 views "
          f"of {tuple(batch['view1'].shape[2:])} from {tuple(batch['image'].shape[2:])} superpatches; "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    print(f"{'method':8s} {'backbone params':>16s} {'s/step (median)':>16s} {'steps/s':>8s} {'views s/batch':>14s}")
    for m in methods:
        module = built[m][0]
        median = statistics.median(times[m])
        params = sum(p.numel() for p in module.backbone.parameters())
        print(f"{m.upper():8s} {params / 1e6:>14.2f} M {median:>16.3f} {1 / median:>8.2f} {batches[m][1]:>14.4f}")
    ratio = statistics.median(times["pgl"]) / statistics.median(times["byol"])
    print(f"PGL step / BYOL step: {ratio:.2f}x")


if __name__ == "__main__":
    main()
