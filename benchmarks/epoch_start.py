"""Epoch start of a training loader: time to the first batch of each epoch, and to the last, per worker count.

A fine-tuning recipe with one labelled volume has short epochs (the demo YAMLs: 16 superpatches per volume,
batch 2, so 8 batches), and a DataLoader without persistent workers starts its worker processes again at every
epoch. This measures what that costs with the recipe's own data module, reading the built-in phantoms from a
prepared cache (written once under ``--root``), for each ``--workers`` count side by side.

    python benchmarks/epoch_start.py [--config experiments/finetune/unet_demo.yaml] [--workers 0 4] [--epochs 4]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def measure(config: Path, root: Path, workers: int, epochs: int) -> None:
    """Prints one line per epoch: seconds to its first batch, batches and seconds for the rest."""
    from maesil.lightning_cli import MaesilCLI

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        cli = MaesilCLI(args=["--config", str(config), "--data.init_args.data_dir", str(root / "phantoms"),
                              "--data.init_args.cache_dir", str(root / "cache"),
                              "--data.init_args.num_workers", str(workers),
                              "--data.init_args.val_fraction", "0.5"], run=False)
    module = cli.datamodule
    module.prepare_data()
    module.setup("fit")
    loader = module.train_dataloader()
    for epoch in range(epochs):
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        started = time.perf_counter()
        batches = iter(loader)
        next(batches)
        first = time.perf_counter()
        rest = sum(1 for _ in batches)
        print(f"workers {workers}  epoch {epoch}: first batch {first - started:.3f} s, then {rest} batches in "
              f"{time.perf_counter() - first:.3f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO_ROOT / "experiments/finetune/unet_demo.yaml")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 4])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--root", type=Path, default=REPO_ROOT / "data_cache/epoch_start")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a single worker count
    args = parser.parse_args()
    if args.one is not None:
        measure(args.config, args.root, args.one, args.epochs)
        return
    if not (args.root / "phantoms" / "images").is_dir():
        subprocess.run([sys.executable, "-m", "maesil", "phantoms", "--out", str(args.root / "phantoms"),
                        "--count", "2"], check=True, cwd=REPO_ROOT, capture_output=True)
    for workers in args.workers:  # each in a fresh process, as a training run would be
        subprocess.run([sys.executable, __file__, "--config", str(args.config), "--root", str(args.root),
                        "--epochs", str(args.epochs), "--one", str(workers)], check=True, cwd=REPO_ROOT)


if __name__ == "__main__":
    main()
