"""compare-init: scratch and pretrained arms with the same budget, a table, a CSV and a plot."""

from __future__ import annotations

import csv

import pytest

from maesil.cli import main
from maesil.tools.compare_init import describe_checkpoint, mean_std, summary_table


def test_mean_std_and_table_skip_nan():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(1.4142135))
    assert mean_std([0.5, float("nan")]) == (0.5, 0.0)
    rows = summary_table({"scratch": [{"test/dice": 0.5, "test/hd95": 4.0, "test/dice_liver": 0.9},
                                      {"test/dice": 0.7, "test/hd95": 6.0, "test/dice_liver": 0.8}]}, ["liver"])
    assert rows[0][:4] == ["initialisation", "runs", "Dice", "HD95 (mm)"]
    assert rows[1] == ["scratch", "2", "0.600 ± 0.141", "5.0 ± 1.4", "0.850 ± 0.071"]


def test_compare_init_runs_scratch_and_pretrained_arms(tiny_ct_dir, tmp_path, capsys):
    from tests.methods.test_pgl import tiny_args

    pgl_dir = tmp_path / "pgl"
    main(["fit", *tiny_args("pgl", tiny_ct_dir, pgl_dir, max_steps=1), "--model.init_args.num_scales", "2"])
    checkpoint = pgl_dir / "checkpoints" / "last.ckpt"
    arm = describe_checkpoint(checkpoint)
    assert arm.family == "unet" and arm.preset == "tiny" and arm.name.startswith("PGL")

    # A manifest over the tiny phantoms: two training volumes and one held out.
    manifest = tmp_path / "split.csv"
    images = sorted((tiny_ct_dir / "images").glob("*.nii.gz"))
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label", "split"])
        for index, image in enumerate(images):
            writer.writerow([image, tiny_ct_dir / "labels" / image.name, "test" if index == 2 else "train"])
    out = tmp_path / "compare"
    with pytest.raises(SystemExit) as exit_info:
        main(["compare-init", "--checkpoints", str(checkpoint), "--data", str(manifest), "--seeds", "0", "1",
              "--steps", "2", "--out", str(out), "--set",
              "data.init_args.superpatch_size=32", "data.init_args.target_spacing=4.0",
              "data.init_args.num_workers=0", "data.init_args.samples_per_volume=2",
              "data.init_args.queue_length=4", "model.init_args.img_size=32"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "scratch (unet)" in printed and "PGL" in printed
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert sorted({row["initialisation"] for row in rows}) == sorted(["scratch (unet)", arm.name])
    assert len(rows) == 4 and all(0.0 <= float(row["test/dice"]) <= 1.0 for row in rows)
    assert (out / "compare_init.png").stat().st_size > 0 and (out / "summary.csv").is_file()
    assert (out / "cache" / "index.json").is_file()  # one prepared cache shared by the runs


def test_compare_init_refuses_a_checkpoint_without_encoder(tmp_path, capsys):
    bad = tmp_path / "not_a_checkpoint.ckpt"
    bad.write_bytes(b"garbage")
    with pytest.raises(SystemExit) as exit_info:
        main(["compare-init", "--checkpoints", str(bad), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 1
    assert str(bad) in capsys.readouterr().err


def test_describe_checkpoint_takes_the_network_from_the_transfer_layout(tmp_path):
    from maesil.checkpoints import export_encoder
    from tests.checkpoints.test_old_format import MAESIL_V0_1, PGL_V0_1

    vit = describe_checkpoint(MAESIL_V0_1)  # old hyperparameter names: img_size, patch_size
    assert vit.family == "unetr" and vit.name == "MAESIL (maesil_v0_1)" and vit.preset is None
    assert vit.network_args == {"token_size": 8, "embed_dim": 24, "depth": 2, "num_heads": 2, "mlp_ratio": 4.0}
    unet = describe_checkpoint(PGL_V0_1)
    assert unet.family == "unet" and unet.preset == "cpu" and unet.network_args == {"features": [4, 8, 16, 16]}

    exported = describe_checkpoint(export_encoder(MAESIL_V0_1, tmp_path / "vit.safetensors"))
    assert exported.family == "unetr" and exported.network_args == vit.network_args
    exported = describe_checkpoint(export_encoder(PGL_V0_1, tmp_path / "unet.safetensors"))
    assert exported.family == "unet" and exported.network_args == {"features": [4, 8, 16, 16],
                                                                   "blocks_per_stage": [1, 2, 2, 2],
                                                                   "strides": [1, 2, 2, 2]}


def test_describe_checkpoint_refuses_a_method_without_encoder(tmp_path):
    import torch

    vae = tmp_path / "vae.ckpt"
    torch.save({"state_dict": {"net.encode.conv.weight": torch.ones(1), "net.mu.weight": torch.ones(1)}}, vae)
    with pytest.raises(ValueError, match="a VAE checkpoint has no encoder compare-init can fine-tune") as info:
        describe_checkpoint(vae)
    assert "BYOL, MAESIL, PGL, S3D" in str(info.value)
