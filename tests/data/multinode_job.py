"""One process of a 2-node job (``num_nodes=2``, one process per node, gloo on CPU), launched by
``test_multinode.py`` with ``NODE_RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set, as
``srun``/``torchrun`` would. Usage: ``python multinode_job.py DATA CACHE OUT``.

Each rank writes ``OUT/rank<global rank>.json``: the subjects of every training batch, per epoch;
every call of ``prepare_cache`` appends the calling rank to ``OUT/prepare_calls.txt``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning as L
import torch

import maesil.data.backends.cache as cache_backend
from maesil.data import VolumeDataModule


class Recorder(L.LightningModule):
    """One weight; records the subjects of each training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: dict[int, list[str]] = {}

    def training_step(self, batch, batch_idx):
        self.seen.setdefault(self.current_epoch, []).extend(batch["subject_id"])
        return (self.weight - batch["image"].mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main(data: str, cache: str, out: str) -> None:
    out_dir = Path(out)
    real = cache_backend.prepare_cache

    def counted(*args, **kwargs):
        with open(out_dir / "prepare_calls.txt", "a") as log:
            log.write(f"node {os.environ['NODE_RANK']}\n")
        return real(*args, **kwargs)

    cache_backend.prepare_cache = counted
    datamodule = VolumeDataModule(data_dir=data, cache_dir=cache, cache_format="blosc2", superpatch_size=16,
                                  target_spacing=8.0, val_fraction=0.0, batch_size=2, samples_per_volume=3,
                                  num_workers=0, check_voxels=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, num_nodes=2, strategy="ddp", max_epochs=2,
                        use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    model = Recorder()
    trainer.fit(model, datamodule=datamodule)
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(
        {"node_rank": trainer.node_rank, "world_size": trainer.world_size, "seen": model.seen}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
