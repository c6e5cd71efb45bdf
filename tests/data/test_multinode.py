"""Two nodes on one shared cache: 2 processes launched as nodes 0 and 1 (``num_nodes=2``, gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

from .conftest import make_ct, write_volume

SUBJECTS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_prepare_the_shared_cache_once_and_read_each_subject_on_one_rank(tmp_path: Path) -> None:
    data, cache, out = tmp_path / "data", tmp_path / "shared" / "cache", tmp_path / "out"
    out.mkdir()
    for i in range(SUBJECTS):
        write_volume(data / f"case_{i}.nii.gz", make_ct(i)[0])
    port = str(_free_port())
    drop = ("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK", "MASTER_", "NODE_RANK", "TORCHELASTIC")
    base = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    base.update(WANDB_MODE="disabled", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port, LOCAL_RANK="0")
    script = Path(__file__).with_name("multinode_job.py")
    nodes = [subprocess.Popen([sys.executable, str(script), str(data), str(cache), str(out)], cwd=REPO_ROOT,
                              env={**base, "NODE_RANK": str(node)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for node in (0, 1)]
    logs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)

    assert (out / "prepare_calls.txt").read_text().splitlines() == ["node 0"]  # once for the whole job
    assert len(list(cache.glob("subjects/*/image.b2nd"))) == SUBJECTS
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["node_rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}
    for epoch in ("0", "1"):
        seen = [r["seen"][epoch] for r in ranks]
        owners = [set(s) for s in seen]
        assert not owners[0] & owners[1]  # each subject on exactly one rank
        assert owners[0] | owners[1] == {f"case_{i}" for i in range(SUBJECTS)}
        assert all(sorted(s) == sorted(3 * sorted(o)) for s, o in zip(seen, owners))  # all 3 superpatches of each
    assert ranks[0]["seen"]["0"] != ranks[0]["seen"]["1"] or ranks[1]["seen"]["0"] != ranks[1]["seen"]["1"]
