"""docs/adding-a-method.md, done: its example method and YAML train through the CLI, and the checkpoint's
layout is found through its class path for export and fine-tuning, with no change anywhere else."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

import maesil.checkpoints.layouts as layouts
from maesil.checkpoints import export_encoder, load_pretrained
from maesil.cli import main
from maesil.models.unet import resenc_unet
from tests.helpers import REPO_ROOT

GUIDE = REPO_ROOT / "docs" / "adding-a-method.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", GUIDE.read_text(), flags=re.DOTALL)


@pytest.fixture(scope="module")
def guide_method(tmp_path_factory) -> Iterator[str]:
    """The guide's method file written as a package of its own (step 1) and imported (what step 2's export in
    ``maesil/methods/__init__.py`` does); yields its class path. Its layout is registered for this module's
    tests only, so that other tests see maesil's own methods."""
    registered = layouts.method_layouts()  # imports maesil.methods, so the built-in methods are in it
    root = tmp_path_factory.mktemp("guide")
    package = root / "guide_methods"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "denoise.py").write_text(_blocks("python")[0])
    sys.path.insert(0, str(root))
    try:
        __import__("guide_methods.denoise")
    finally:
        sys.path.remove(str(root))
    yield "guide_methods.denoise.Denoise"
    layouts._LAYOUTS.clear()
    layouts._LAYOUTS.update(registered)
    sys.modules.pop("guide_methods.denoise", None)
    sys.modules.pop("guide_methods", None)


def _guide_yaml(tmp_path: Path, class_path: str, data_dir: Path) -> Path:
    """The guide's YAML (step 3), pointing at the test's class and tiny phantoms."""
    config = yaml.safe_load(_blocks("yaml")[0])
    assert config["model"]["class_path"] == "maesil.methods.Denoise"
    assert "superpatch_size" not in config["model"]["init_args"]  # stated once, under data
    config["model"]["class_path"] = class_path
    config["model"]["init_args"]["preset"] = "tiny"
    config["data"]["init_args"].update(data_dir=str(data_dir), superpatch_size=32, target_spacing=4.0,
                                       num_workers=0, batch_size=2, samples_per_volume=2, queue_length=4)
    path = tmp_path / "denoise_demo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_guide_s_method_trains_exports_and_fine_tunes(guide_method, tiny_ct_dir, tmp_path):
    config = _guide_yaml(tmp_path, guide_method, tiny_ct_dir)
    run = tmp_path / "run"
    main(["fit", "--config", str(config), "--trainer.max_steps", "3", "--trainer.default_root_dir", str(run),
          "--trainer.enable_progress_bar", "false"])
    [checkpoint] = sorted(run.rglob("*.ckpt"))

    exported = export_encoder(checkpoint, tmp_path / "denoise.safetensors")
    sidecar = yaml.safe_load(exported.with_suffix(".json").read_text())
    assert sidecar["method"] == "Denoise" and sidecar["includes_decoder"]
    assert sidecar["architecture"]["type"] == "ResEncUNet"

    network = resenc_unet("tiny", out_channels=3)
    report = load_pretrained(network, exported, decoder=True)
    transferable = [key for key in network.state_dict() if key.startswith(("encoder.", "decoder."))]
    assert report.loaded == transferable and not report.shape_mismatched
    assert all(key.startswith("head.") or ".seg" in key for key in report.missing), report.missing


def test_the_guide_s_method_refuses_a_task_it_does_not_accept(guide_method, tiny_ct_dir, tmp_path):
    config = _guide_yaml(tmp_path, guide_method, tiny_ct_dir)
    with pytest.raises(ValueError, match=r"Denoise needs data.init_args.task: reconstruct \(the DataModule has "
                                         r"task 'segment'\)"):
        main(["fit", "--config", str(config), "--data.init_args.task", "segment", "--trainer.max_steps", "1",
              "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.enable_progress_bar", "false"])
