"""compare-init: scratch and pretrained arms with the same budget, a table, a CSV and a plot."""

from __future__ import annotations

import csv
from dataclasses import replace

import pytest

from maesil.cli import main
from maesil.tools.compare_init import (
    DEFAULT_UNET_CONFIG,
    PAIRED_FIELDS,
    PAIRED_SEED_FIELDS,
    Arm,
    Initialisation,
    config_preset,
    describe_checkpoint,
    fine_tune_and_test,
    finished_run,
    run_inputs,
    mean_std,
    slug,
    paired_differences,
    paired_summary,
    paired_table,
    summary_table,
    without_config_preset,
    worker_threads,
    yaml_network_sizes,
)


def test_mean_std_and_table_skip_nan():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(1.4142135))
    assert mean_std([0.5, float("nan")]) == (0.5, 0.0)
    rows = summary_table({Arm("scratch", "frozen", 1): [{"test/dice": 0.5, "test/hd95": 4.0, "test/dice_liver": 0.9},
                                                        {"test/dice": 0.7, "test/hd95": 6.0, "test/dice_liver": 0.8}]},
                         ["liver"])
    assert rows[0][:6] == ["initialisation", "mode", "labelled", "runs", "Dice", "HD95 (mm)"]
    assert rows[1] == ["scratch", "frozen", "1", "2", "0.600 ± 0.141", "5.0 ± 1.4", "0.850 ± 0.071"]


def result_row(name: str, mode: str, seed: int, dice: float, count: int = 1) -> dict:
    return {"initialisation": name, "family": "unet", "checkpoint": "" if name.startswith("scratch") else "x.ckpt",
            "mode": mode, "train_count": count, "seed": seed, "test/dice": dice}


def test_paired_differences_subtract_the_scratch_run_of_the_same_mode_count_and_seed():
    rows = [result_row("scratch (unet)", "finetune", 0, 0.30), result_row("scratch (unet)", "finetune", 1, 0.40),
            result_row("scratch (unet)", "finetune", 2, 0.50), result_row("PGL", "finetune", 0, 0.35),
            result_row("PGL", "finetune", 1, 0.38), result_row("PGL", "finetune", 2, 0.60),
            result_row("scratch (unet)", "frozen", 0, 0.10), result_row("PGL", "frozen", 0, 0.40),
            result_row("scratch (unet)", "finetune", 0, 0.20, count=2), result_row("PGL", "finetune", 0, 0.20, count=2)]
    paired = paired_differences(rows)
    assert [(p["mode"], p["train_count"], p["seed"]) for p in paired] == [
        ("finetune", 1, 0), ("finetune", 1, 1), ("finetune", 1, 2), ("frozen", 1, 0), ("finetune", 2, 0)]
    assert [p["difference"] for p in paired] == pytest.approx([0.05, -0.02, 0.10, 0.30, 0.0])
    assert paired[0]["reference_dice"] == 0.30 and paired[0]["reference"] == "scratch (unet)"
    assert set(paired[0]) == set(PAIRED_SEED_FIELDS)

    summary = paired_summary(paired)
    assert [set(row) for row in summary] == [set(PAIRED_FIELDS)] * 3
    # differences 0.05, -0.02, 0.10: mean 0.0433, sample std 0.0603; two of three seeds positive
    first = summary[0]
    assert (first["family"], first["mode"], first["train_count"], first["initialisation"], first["reference"],
            first["seeds"], first["positive_seeds"]) == ("unet", "finetune", 1, "PGL", "scratch (unet)", 3, 2)
    assert (first["mean_difference"], first["std_difference"]) == pytest.approx((0.04333, 0.06028), abs=1e-4)
    assert (summary[1]["mode"], summary[1]["seeds"], summary[1]["positive_seeds"]) == ("frozen", 1, 1)
    assert summary[1]["mean_difference"] == pytest.approx(0.30)
    assert (summary[2]["train_count"], summary[2]["positive_seeds"]) == (2, 0)  # a zero difference is not positive

    table = paired_table(summary)
    assert table[0] == ["initialisation", "minus", "mode", "labelled", "seeds", "Δ Dice", "positive"]
    assert table[1] == ["PGL", "scratch (unet)", "finetune", "1", "3", "+0.043 ± 0.060", "2/3"]
    assert table[2] == ["PGL", "scratch (unet), frozen random encoder", "frozen", "1", "1", "+0.300 ± 0.000", "1/1"]
    assert table[3][-2:] == ["+0.000 ± 0.000", "0/1"]
    with pytest.raises(ValueError, match="PGL \\(frozen, 2 labelled, seed 0\\) has no scratch unet run"):
        paired_differences([result_row("PGL", "frozen", 0, 0.4, count=2)])


def test_compare_init_few_label_protocol_runs_every_count_mode_and_seed(tiny_ct_dir, tmp_path, capsys):
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
    common = ["--checkpoints", str(checkpoint), "--data", str(manifest), "--seeds", "0", "--steps", "2",
              "--out", str(out), "--set", "data.init_args.superpatch_size=32", "data.init_args.target_spacing=4.0",
              "data.init_args.num_workers=0", "data.init_args.samples_per_volume=2",
              "data.init_args.queue_length=4", "model.init_args.img_size=32"]
    with pytest.raises(SystemExit) as exit_info:
        main(["compare-init", "--train-count", "1", "2", "--modes", "finetune", "frozen", "--curve-every", "1",
              *common])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "scratch (unet)" in printed and "PGL" in printed and "frozen random encoder" in printed
    assert "8 runs" in printed and "Held-out Dice during training" in printed

    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 8  # 2 initialisations × 2 modes × 2 counts × 1 seed
    assert sorted({row["initialisation"] for row in rows}) == sorted(["scratch (unet)", arm.name])
    assert {(row["mode"], row["train_count"], row["seed"]) for row in rows} == {
        (mode, count, "0") for mode in ("finetune", "frozen") for count in ("1", "2")}
    assert all(0.0 <= float(row["test/dice"]) <= 1.0 and float(row["train_seconds"]) > 0 for row in rows)
    assert all(row["scorings"] == "2" and float(row["scoring_seconds"]) > 0 for row in rows)

    paired = list(csv.DictReader(open(out / "paired_seeds.csv")))
    assert len(paired) == 4 and {row["initialisation"] for row in paired} == {arm.name}
    by_run = {(r["initialisation"], r["mode"], r["train_count"], r["seed"]): float(r["test/dice"]) for r in rows}
    for row in paired:
        where = (row["mode"], row["train_count"], row["seed"])
        assert float(row["dice"]) == by_run[(arm.name, *where)]
        assert float(row["reference_dice"]) == by_run[("scratch (unet)", *where)]
        assert float(row["difference"]) == pytest.approx(float(row["dice"]) - float(row["reference_dice"]))
    summary = list(csv.DictReader(open(out / "paired.csv")))  # one row per mode and count, 1 seed each
    assert sorted((row["mode"], row["train_count"], row["seeds"]) for row in summary) == [
        ("finetune", "1", "1"), ("finetune", "2", "1"), ("frozen", "1", "1"), ("frozen", "2", "1")]
    assert all(row["reference"] == "scratch (unet)" and row["family"] == "unet" for row in summary)

    curves = list(csv.DictReader(open(out / "curves.csv")))
    # Validated at steps 1 and 2; the validation after the last step is the final score.
    assert sorted((r["initialisation"], r["mode"], r["train_count"], r["step"]) for r in curves) == sorted(
        (name, mode, count, step) for name in ("scratch (unet)", arm.name) for mode in ("finetune", "frozen")
        for count in ("1", "2") for step in ("1", "2"))
    final = {(r["initialisation"], r["mode"], r["train_count"], r["seed"]): float(r["dice"])
             for r in curves if r["step"] == "2"}
    assert final == by_run
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in curves)
    # Each organ's Dice at every point; the last point's are the run's final per-organ scores.
    organs = [key for key in curves[0] if key.startswith("dice_")]
    assert organs == ["dice_liver", "dice_spleen", "dice_kidney_left", "dice_kidney_right", "dice_aorta",
                      "dice_lung", "dice_bone"]
    finals = {(r["initialisation"], r["mode"], r["train_count"], r["seed"]): r for r in rows}
    for r in curves:
        assert all(0.0 <= float(r[organ]) <= 1.0 for organ in organs)
        if r["step"] == "2":
            row = finals[(r["initialisation"], r["mode"], r["train_count"], r["seed"])]
            assert all(float(r[organ]) == float(row[f"test/{organ}"]) for organ in organs)
    for name in ("compare_init.png", "curves.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "summary.csv").is_file() and (out / "cache" / "index.json").is_file()
    # Nested subsets, one held-out set: count 1 trains on the first training subject of count 2.
    subsets = {count: list(csv.DictReader(open(out / "manifests" / f"train{count}.csv"))) for count in (1, 2)}
    assert [r["split"] for r in subsets[1]] == ["train", "val"] and [r["split"] for r in subsets[2]] == ["train",
                                                                                                   "train", "val"]
    assert subsets[1][0] == subsets[2][0] and subsets[1][-1] == subsets[2][-1]

    # When no validation falls on the last step, a test pass gives the final score and ends the curve.
    scratch = Initialisation("scratch (unet)", "unet", None, preset="tiny")
    run = fine_tune_and_test(scratch, DEFAULT_UNET_CONFIG, out / "manifests" / "train1.csv", 0, 3, tmp_path / "one",
                             common[common.index("--set") + 1:], mode="frozen", curve_every=2)
    assert [step for step, _ in run.curve] == [2, 3] and run.scorings == 2
    assert run.curve[-1][1] == run.metrics["test/dice"] and "test/dice_liver" in run.metrics
    assert len(run.organ_curve) == 2 and run.organ_curve[-1]["dice_liver"] == run.metrics["test/dice_liver"]
    assert not run.reused

    # A finished run is reused when its inputs are unchanged, and only then.
    again = fine_tune_and_test(scratch, DEFAULT_UNET_CONFIG, out / "manifests" / "train1.csv", 0, 3,
                               tmp_path / "one", common[common.index("--set") + 1:], mode="frozen", curve_every=2)
    assert again.reused and again.metrics == run.metrics and again.curve == run.curve
    assert again.organ_curve == run.organ_curve
    inputs = run_inputs(scratch, DEFAULT_UNET_CONFIG, out / "manifests" / "train1.csv", 0, 3,
                        common[common.index("--set") + 1:], "frozen", 2, ())
    run_dir = tmp_path / "one" / "runs" / "scratch__unet_seed0"
    assert finished_run(run_dir, inputs) is not None
    for changed in ({"seed": 1}, {"steps": 4}, {"mode": "finetune"}, {"overrides": []}, {"configs": ["x"]}):
        assert finished_run(run_dir, {**inputs, **changed}) is None, changed
    assert finished_run(tmp_path / "nowhere", inputs) is None

    # The whole protocol called again with the same --out: every run is reused, the tables are unchanged.
    results_before = (out / "results.csv").read_text()
    with pytest.raises(SystemExit) as exit_info:
        main(["compare-init", "--train-count", "1", "2", "--modes", "finetune", "frozen", "--curve-every", "1",
              *common])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.count("reused") == 8
    assert (out / "results.csv").read_text() == results_before

    # Side by side (--jobs 2): each run in its own process, its output in its folder's fit.log, the same scores.
    side = tmp_path / "side"
    side_common = [*common[:common.index("--out")], "--out", str(side), *common[common.index("--out") + 2:]]
    with pytest.raises(SystemExit) as exit_info:
        main(["compare-init", "--train-count", "1", "--modes", "finetune", "--curve-every", "1", "--jobs", "2",
              *side_common])
    assert exit_info.value.code == 0
    assert "2 runs, 2 at a time" in capsys.readouterr().out
    side_rows = list(csv.DictReader(open(side / "results.csv")))
    assert [(r["initialisation"], r["mode"]) for r in side_rows] == [("scratch (unet)", "finetune"),
                                                                      (arm.name, "finetune")]
    for row in side_rows:
        assert float(row["test/dice"]) == pytest.approx(by_run[(row["initialisation"], "finetune", "1", "0")],
                                                        abs=1e-4)
        log = side / "runs" / f"{slug(row['initialisation'])}_finetune_n1_seed0" / "fit.log"
        assert "max_steps=2" in log.read_text()

    with pytest.raises(SystemExit) as exit_info:
        main(["compare-init", "--train-count", "3", *common])
    assert exit_info.value.code == 1
    assert f"--train-count 3 exceeds the 2 training subject(s) of {manifest}" in capsys.readouterr().err


def test_runs_side_by_side_share_the_threads_of_the_command():
    assert worker_threads(2, {}, cores=16) == 8
    assert worker_threads(6, {}, cores=16) == 2
    assert worker_threads(4, {}, cores=2) == 1
    assert worker_threads(3, {"OMP_NUM_THREADS": "6"}, cores=16) == 2  # a share of what the caller allowed
    assert worker_threads(2, {"OMP_NUM_THREADS": "x"}, cores=4) == 2


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

    assert unet.trained_decoder and not vit.trained_decoder

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


def test_sizes_spelt_out_as_the_yaml_sets_them_are_not_an_input_so_scratch_runs_are_shared(tmp_path):
    import json

    from maesil.models.unet import UNET_PRESETS

    # An exported encoder states its sizes (lists, from JSON); the YAML's `cpu` preset sets the same ones.
    cpu = UNET_PRESETS["cpu"]
    spelt_out = {key: list(cpu[key]) for key in ("features", "blocks_per_stage", "strides")}
    assert yaml_network_sizes("unet", DEFAULT_UNET_CONFIG) == cpu
    manifest = tmp_path / "train1.csv"
    manifest.write_text("image,label,split\n")

    def inputs(network_args: dict) -> dict:
        arm = Initialisation("scratch (unet)", "unet", None, network_args=network_args)
        return run_inputs(arm, DEFAULT_UNET_CONFIG, manifest, 0, 3, [], "finetune", None, ())

    assert inputs(spelt_out) == inputs({})
    # A size the YAML does not set stays an input.
    wider = {**spelt_out, "features": [32, 64, 128, 256]}
    assert inputs(wider)["network_args"] == {"features": [32, 64, 128, 256]}
    # A run recorded with the sizes spelt out is found by a call that leaves them to the YAML, and not by one
    # that asks for another network.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    recorded = {**inputs({}), "network_args": spelt_out}
    (run_dir / "result.json").write_text(json.dumps({"inputs": recorded, "metrics": {"test/dice": 0.5},
                                                     "curve": [[3, 0.5]], "train_seconds": 1.0,
                                                     "scoring_seconds": 1.0, "scorings": 1}))
    sizes = yaml_network_sizes("unet", DEFAULT_UNET_CONFIG)
    assert finished_run(run_dir, inputs({}), sizes).metrics == {"test/dice": 0.5}
    assert finished_run(run_dir, inputs(wider), sizes) is None
    # Without the YAML's sizes only the same spelling matches.
    assert finished_run(run_dir, inputs({})) is None


def test_a_preset_equal_to_the_yaml_is_not_an_input_so_scratch_runs_are_shared(tmp_path):
    assert config_preset(DEFAULT_UNET_CONFIG) == "cpu"
    # A scratch arm sized like a `cpu` checkpoint runs the YAML's own network: same inputs as one made without.
    like_checkpoint = without_config_preset(Initialisation("scratch (unet)", "unet", None, preset="cpu"),
                                            DEFAULT_UNET_CONFIG)
    plain = Initialisation("scratch (unet)", "unet", None)
    manifest = tmp_path / "train1.csv"
    manifest.write_text("image,label,split\n")
    assert like_checkpoint.preset is None
    assert (run_inputs(like_checkpoint, DEFAULT_UNET_CONFIG, manifest, 0, 3, [], "finetune", None, ())
            == run_inputs(plain, DEFAULT_UNET_CONFIG, manifest, 0, 3, [], "finetune", None, ()))
    # Another preset changes the network, so it stays an input.
    assert without_config_preset(Initialisation("s", "unet", None, preset="tiny"), DEFAULT_UNET_CONFIG).preset == "tiny"
    unreadable = tmp_path / "missing.yaml"
    assert config_preset(unreadable) is None
    assert without_config_preset(Initialisation("s", "unet", None, preset="cpu"), unreadable).preset == "cpu"


def test_runs_that_loaded_a_pretrained_decoder_are_not_reused_by_the_encoder_only_default(tmp_path):
    import json

    from tests.checkpoints.test_old_format import PGL_V0_1

    manifest = tmp_path / "train1.csv"
    manifest.write_text("image,label,split\n")
    pgl = describe_checkpoint(PGL_V0_1)
    encoder_only = replace(pgl, trained_decoder=False)  # e.g. exported with --no-decoder

    def inputs(arm: Initialisation) -> dict:
        return run_inputs(arm, DEFAULT_UNET_CONFIG, manifest, 0, 3, [], "finetune", None, ())

    assert "pretrained_decoder" in inputs(pgl) and "pretrained_decoder" not in inputs(encoder_only)
    # A run recorded before the decoder was left out by default (no such input) loaded it: not the same run.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "result.json").write_text(json.dumps({"inputs": inputs(encoder_only), "metrics": {"test/dice": 0.5},
                                                     "curve": [[3, 0.5]], "train_seconds": 1.0,
                                                     "scoring_seconds": 1.0, "scorings": 1}))
    assert finished_run(run_dir, inputs(encoder_only)) is not None
    assert finished_run(run_dir, inputs(pgl)) is None
