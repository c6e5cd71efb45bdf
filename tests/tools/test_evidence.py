"""The evidence run: its stages, their reuse, and the summary's claims read from the stages' outputs."""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
from pathlib import Path

import pytest

from maesil.tools.evidence import (
    PRETRAIN_DIR,
    SCALES,
    EvidencePlan,
    Stage,
    evidence_command,
    run_stages,
    stage_environment,
    write_call_record,
    write_summary,
)

RECON_FIELDS = ["method", "protocol", "class", "checkpoint", "params", "volumes", "masked_region", "psnr_mean",
                "psnr_std", "ssim_mean", "ssim_std", "psnr_masked_mean", "psnr_masked_std", "ssim_masked_mean",
                "ssim_masked_std"]


def write_rows(path: Path, fields: list[str], rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def recon_row(method: str, protocol: str, psnr: float, ssim: float, masked: tuple[float, float] | None = None,
              kind: str | None = None, region: str = "none") -> dict:
    row = {"method": method, "protocol": protocol, "class": kind or method, "params": 1000000, "psnr_mean": psnr,
           "psnr_std": 0.1, "ssim_mean": ssim, "ssim_std": 0.01, "masked_region": region}
    if masked:
        row.update(psnr_masked_mean=masked[0], psnr_masked_std=0.1, ssim_masked_mean=masked[1], ssim_masked_std=0.01)
    return row


@pytest.fixture
def outputs(tmp_path) -> EvidencePlan:
    plan = EvidencePlan(out=tmp_path / "evidence", seeds=[0, 1])
    write_rows(plan.out / "recon" / "results.csv", RECON_FIELDS, [
        recon_row("MAESIL", "inpaint", 20.0, 0.6, masked=(17.0, 0.40), region="own"),
        recon_row("mean fill", "inpaint", 15.0, 0.5, masked=(12.0, 0.20), kind="fill", region="filled"),
        recon_row("blur fill", "inpaint", 19.0, 0.7, masked=(16.0, 0.45), kind="fill", region="filled"),
        recon_row("AE", "inpaint", 21.0, 0.7, masked=(21.5, 0.75), region="reference"),
        recon_row("MAESIL", "paper", 25.0, 0.80),
        recon_row("AE", "paper", 21.0, 0.85),
        recon_row("VAE", "paper", 15.0, 0.30),
    ])
    summary = {"history": {"val/psnr_masked": [[100, 12.0], [200, 17.5]],
                           "val/psnr_masked_blur_fill": [[100, 16.0], [200, 16.0]],
                           "val/psnr_masked_mean_fill": [[100, 12.5], [200, 12.5]],
                           "time/training_seconds": [[100, 50.0], [200, 101.0]]}}
    (plan.out / "pretrain" / "maesil").mkdir(parents=True)
    (plan.out / "pretrain" / "maesil" / "summary.json").write_text(json.dumps(summary))
    paired_fields = ["family", "mode", "train_count", "initialisation", "reference", "seeds", "positive_seeds",
                     "mean_difference", "std_difference"]
    write_rows(plan.compare_dir("maesil") / "paired.csv", paired_fields, [
        {"family": "unetr", "mode": "finetune", "train_count": 1, "initialisation": "maesil",
         "reference": "scratch (unetr)", "seeds": 2, "positive_seeds": 2, "mean_difference": 0.031,
         "std_difference": 0.01},
        {"family": "unetr", "mode": "frozen", "train_count": 1, "initialisation": "maesil",
         "reference": "scratch (unetr)", "seeds": 2, "positive_seeds": 2, "mean_difference": 0.2,
         "std_difference": 0.02},
    ])
    seed_fields = ["family", "mode", "train_count", "initialisation", "reference", "seed", "dice", "reference_dice",
                   "difference"]
    write_rows(plan.compare_dir("maesil") / "paired_seeds.csv", seed_fields, [
        {"family": "unetr", "mode": "finetune", "train_count": 1, "initialisation": "maesil",
         "reference": "scratch (unetr)", "seed": seed, "dice": 0.5, "reference_dice": 0.5 - difference,
         "difference": difference} for seed, difference in ((1, 0.041), (0, 0.021))])
    write_rows(plan.compare_dir("s3d") / "paired.csv", paired_fields, [
        {"family": "unet", "mode": "finetune", "train_count": 1, "initialisation": "s3d",
         "reference": "scratch (unet)", "seeds": 2, "positive_seeds": 1, "mean_difference": 0.025,
         "std_difference": 0.03},
        {"family": "unet", "mode": "frozen", "train_count": 1, "initialisation": "s3d",
         "reference": "scratch (unet)", "seeds": 2, "positive_seeds": 2, "mean_difference": 0.04,
         "std_difference": 0.01},
    ])
    curve_fields = ["initialisation", "mode", "train_count", "seed", "step", "dice"]
    write_rows(plan.compare_dir("maesil") / "curves.csv", curve_fields, [
        {"initialisation": init, "mode": "finetune", "train_count": 1, "seed": seed, "step": step, "dice": dice}
        for init, seed, points in (("scratch (unetr)", 0, (0.1, 0.3, 0.36)), ("scratch (unetr)", 1, (0.2, 0.4, 0.38)),
                                   ("maesil", 0, (0.3, 0.4, 0.40)), ("maesil", 1, (0.2, 0.4, 0.42)))
        for step, dice in zip((100, 200, 300), points)])
    write_rows(plan.compare_dir("s3d") / "curves.csv", curve_fields, [
        {"initialisation": init, "mode": "finetune", "train_count": 1, "seed": 0, "step": step, "dice": dice}
        for init, points in (("scratch (unet)", (0.5, 0.8, 0.85)), ("s3d", (0.6, 0.82, 0.84)))
        for step, dice in zip((200, 400, 600), points)])
    return plan


def test_summary_states_each_claim_with_the_figures_that_decide_it(outputs):
    stages = outputs.stages()
    text = write_summary(outputs, stages).read_text()
    assert "MAESIL ends at least 1 dB above the blur fill of the same masks: **holds** (17.50 vs 16.00 dB, +1.50)" in text
    assert "`paper`: MAESIL beats AE in psnr: **holds** (25.000 vs 21.000)" in text
    assert "`paper`: MAESIL beats AE in ssim: **does not hold** (0.800 vs 0.850)" in text
    assert "`paper`: MAESIL beats VAE in ssim: **holds**" in text
    assert "`inpaint`: MAESIL beats blur fill in psnr_masked: **holds** (17.000 vs 16.000)" in text
    assert "`inpaint`: MAESIL beats blur fill in ssim_masked: **does not hold** (0.400 vs 0.450)" in text
    assert "`inpaint`: MAESIL beats AE" not in text  # the autoencoders are read under `paper`, fills under `inpaint`
    assert "| AE | 1.00 M | 21.500 ± 0.100 † | 0.750 ± 0.010 † |" in text  # it saw the voxels it is scored on
    assert "| MAESIL | 1.00 M | 17.000 ± 0.100 | 0.400 ± 0.010 |" in text and "† an autoencoder sees" in text
    assert ("maesil beats scratch (unetr) by ≥ 2 Dice points on average with 1 labelled volume(s), positive in every "
            "seed: **holds** (+3.1 points, 2/2 seeds positive)") in text
    assert "s3d beats scratch (unet) by ≥ 2 Dice points" in text and "**does not hold** (+2.5 points, 1/2" in text
    assert ("frozen maesil beats frozen scratch (unetr) by ≥ 5 Dice points with 1 labelled volume(s), positive in "
            "every seed: **holds** (+20.0 points, 2/2 seeds positive)") in text
    assert "frozen s3d beats frozen scratch (unet) by ≥ 5 Dice points" in text and "**does not hold** (+4.0 points" in text
    # in Dice points, each seed's difference in seed order; a stage without paired_seeds.csv shows none
    assert "| unetr | finetune | 1 | maesil | scratch (unetr) | +3.1 ± 1.0 | +2.1, +4.1 | 2/2 |" in text
    assert "| unetr | frozen | 1 | maesil | scratch (unetr) | +20.0 ± 2.0 | n/a | 2/2 |" in text
    assert "| unet | finetune | 1 | s3d | scratch (unet) | +2.5 ± 3.0 | n/a | 1/2 |" in text
    assert "python -m maesil benchmark-recon --data" in text and "python -m maesil compare-init" in text
    assert "| 200 | 101 | 17.50 | 16.00 | 12.50 |" in text
    # the mean learning curves over seeds, and how much scratch still gained at the end of its budget
    assert "| scratch (unetr) | finetune | 1 | 0.150 | 0.350 | 0.370 |" in text
    assert "| maesil | finetune | 1 | 0.250 | 0.400 | 0.410 |" in text
    assert ("scratch (unetr) with 1 labelled volume(s) gained +2.0 Dice points over its last 100 steps, +20.0 over "
            "the interval before") in text
    # a stage with another budget gets its own table, at its own steps
    assert "| initialisation | mode | labelled | step 100 | step 200 | step 300 |" in text
    assert "| initialisation | mode | labelled | step 200 | step 400 | step 600 |" in text
    assert "| s3d | finetune | 1 | 0.600 | 0.820 | 0.840 |" in text
    assert "scratch (unet) with 1 labelled volume(s) gained +5.0 Dice points over its last 200 steps" in text
    assert "Scale `small`: 4 mm voxels" in text and "end to end" not in text  # no call has run its stages


def test_the_summary_states_the_last_calls_wall_time(outputs):
    write_call_record(outputs.out, outputs.display(), 4830.0, [Stage("a", [], Path("x"), reused=True)])
    text = write_summary(outputs, outputs.stages()).read_text()
    assert "The last call took 80.5 min end to end (`python -m maesil evidence --out" in text
    assert "1 stage(s) reused from an earlier call" in text


def test_stages_run_in_order_and_a_done_stage_is_reused(tmp_path, monkeypatch, capsys):
    plan = EvidencePlan(out=tmp_path / "evidence")
    marker = tmp_path / "count.txt"
    script = ("import sys, pathlib; p = pathlib.Path(sys.argv[1]); p.parent.mkdir(parents=True, exist_ok=True); "
              "p.write_text('x'); c = pathlib.Path(sys.argv[2]); c.write_text((c.read_text() if c.exists() else '') "
              "+ 'x' + ('F' if '--forced' in sys.argv else ''))")
    fake = [Stage("one", [sys.executable, "-c", script, str(tmp_path / "a" / "done"), str(marker)], tmp_path / "a" / "done"),
            Stage("two", [sys.executable, "-c", script, str(tmp_path / "b" / "done"), str(marker)], tmp_path / "b" / "done",
                  force_flag="--forced")]
    monkeypatch.setattr(EvidencePlan, "stages", lambda self: [Stage(s.name, list(s.command), s.done_when,
                                                                    force_flag=s.force_flag) for s in fake])
    first = run_stages(plan)
    assert marker.read_text() == "xx" and all(not s.reused and s.seconds > 0 for s in first)
    second = run_stages(plan)
    assert marker.read_text() == "xx" and all(s.reused for s in second)
    assert json.loads((plan.out / "stages.json").read_text())["one"]["command"] == fake[0].command
    run_stages(plan, force=True)  # every stage again, and a stage's own force flag passed on
    assert marker.read_text() == "xxxxF"


def test_a_failing_stage_stops_the_run_naming_the_stage_and_its_log(tmp_path, monkeypatch, capsys):
    failing = Stage("pretrain maesil", [sys.executable, "-c", "raise SystemExit('bad config')"], tmp_path / "never")
    monkeypatch.setattr(EvidencePlan, "stages", lambda self: [failing])
    assert evidence_command(["--out", str(tmp_path / "evidence")]) == 1
    error = capsys.readouterr().err
    assert "stage 'pretrain maesil' failed (exit 1)" in error
    log = tmp_path / "evidence" / "logs" / "pretrain_maesil.log"
    assert str(log) in error and "bad config" in log.read_text()


def test_the_plan_pretrains_the_autoencoders_for_maesils_steps_and_compares_both_families(tmp_path):
    plan = EvidencePlan(out=tmp_path, seeds=[3, 4], pretrain_steps=80, train_counts=[1, 2])
    stages = {stage.name: stage.command for stage in plan.stages()}
    for method in ("maesil", "ae", "vae", "vqvae"):
        command = stages[f"pretrain {method}"]
        assert command[command.index("--trainer.max_steps") + 1] == "80"
    assert "--trainer.max_steps" not in stages["pretrain s3d"]  # its own YAML's budget
    for method in ("maesil", "s3d"):  # each pretrained network against its own scratch baseline
        compare = stages[f"compare-init {method}"]
        assert compare[compare.index("--seeds") + 1:compare.index("--seeds") + 3] == ["3", "4"]
        assert compare[compare.index("--train-count") + 1:compare.index("--train-count") + 3] == ["1", "2"]
        assert compare[compare.index("--checkpoints") + 1:compare.index("--checkpoints") + 3] == [
            str(plan.checkpoint(method)), "--train-count"]
        assert compare[compare.index("--out") + 1] == str(plan.compare_dir(method))
    forced = {stage.name: stage.force_flag for stage in plan.stages()}  # --force reaches compare-init's own reuse
    assert forced["compare-init maesil"] == "--force" and forced["pretrain maesil"] is None


def test_the_small_scale_sizes_every_run_and_a_users_setting_comes_after_it(tmp_path):
    plan = EvidencePlan(out=tmp_path, seeds=[0], overrides=["data.init_args.superpatch_size=48"])
    sizes = SCALES["small"]
    assert plan.scale == "small" and sizes.overrides == ("data.init_args.target_spacing=4.0",
                                                         "data.init_args.superpatch_size=32",
                                                         "data.init_args.num_workers=0")
    stages = {stage.name: stage.command for stage in plan.stages()}
    for method in ("maesil", "ae", "vae", "vqvae", "s3d"):
        command = stages[f"pretrain {method}"]
        assert command[command.index("--data.init_args.target_spacing") + 1] == "4.0"
        sizes_given = [command[i + 1] for i, word in enumerate(command) if word == "--data.init_args.superpatch_size"]
        assert sizes_given == ["32", "48"]  # the later one wins
        # the scale's own cache: the demo YAMLs' shared one holds 2 mm volumes
        assert command[command.index("--data.init_args.cache_dir") + 1] == str(tmp_path / "pretrain_cache")
    for method in ("maesil", "s3d"):
        compare = stages[f"compare-init {method}"]
        start = compare.index("--set") + 1
        assert compare[start:start + 4] == [*sizes.overrides, "data.init_args.superpatch_size=48"]
        assert compare[compare.index("--jobs") + 1] == "2"
    # both networks to their scratch arms' plateau, six curve points each
    assert budgets(plan) == {"maesil": "1200", "s3d": "1200"}
    assert budgets(plan, "--curve-every") == {"maesil": "200", "s3d": "200"}
    assert "--scale" not in plan.display() and "--jobs" not in plan.display(jobs=2)
    assert plan.display(jobs=1).endswith("--jobs 1")
    demo = EvidencePlan(out=tmp_path, scale="demo")
    compare = {stage.name: stage.command for stage in demo.stages()}["compare-init maesil"]
    assert "--set" not in compare and "--jobs" not in compare
    assert compare[compare.index("--steps") + 1] == "120" and compare[compare.index("--curve-every") + 1] == "40"
    assert "--scale demo" in demo.display()


def budgets(plan: EvidencePlan, flag: str = "--steps") -> dict[str, str]:
    """The value of ``flag`` in each compare-init stage's command."""
    commands = {stage.name: stage.command for stage in plan.stages()}
    return {method: commands[f"compare-init {method}"][commands[f"compare-init {method}"].index(flag) + 1]
            for method in ("maesil", "s3d")}


def test_finetune_steps_sets_both_budgets_and_cnn_finetune_steps_the_unets_alone(tmp_path):
    assert budgets(EvidencePlan(out=tmp_path, finetune_steps=300)) == {"maesil": "300", "s3d": "300"}
    plan = EvidencePlan(out=tmp_path, finetune_steps=300, cnn_finetune_steps=900)
    assert budgets(plan) == {"maesil": "300", "s3d": "900"}
    assert plan.display().endswith("--finetune-steps 300 --cnn-finetune-steps 900")
    assert budgets(EvidencePlan(out=tmp_path, cnn_finetune_steps=900)) == {"maesil": "1200", "s3d": "900"}


def test_trainer_configs_overrides_and_the_cnn_budget_reach_every_training_run(tmp_path):
    gpu = tmp_path / "gpu.yaml"
    plan = EvidencePlan(out=tmp_path, seeds=[0], scale="demo", cnn_steps=300, trainer_configs=[gpu],
                        overrides=["data.init_args.num_workers=6"], pretrain_cache=tmp_path / "cache")
    stages = {stage.name: stage.command for stage in plan.stages()}
    for method in ("maesil", "ae", "vae", "vqvae", "s3d"):
        command = stages[f"pretrain {method}"]
        # composed after the method's own YAML, so its trainer settings win
        assert command.index(str(gpu)) > command.index(str(PRETRAIN_DIR / f"{method}_demo.yaml"))
        assert command[command.index("--data.init_args.num_workers") + 1] == "6"
        assert command[command.index("--data.init_args.cache_dir") + 1] == str(tmp_path / "cache")
    s3d = stages["pretrain s3d"]
    assert s3d[s3d.index("--trainer.max_steps") + 1] == "300"
    compare = stages["compare-init s3d"]
    assert compare[compare.index("--trainer-config") + 1] == str(gpu)
    assert compare[compare.index("--set") + 1] == "data.init_args.num_workers=6"
    assert str(tmp_path / "cache") not in compare  # fine-tuning reads its own labelled phantoms
    assert plan.display(jobs=4).endswith(f"--scale demo --cnn-steps 300 --trainer-config {gpu} --set "
                                         f"data.init_args.num_workers=6 --pretrain-cache {tmp_path / 'cache'} "
                                         "--jobs 4")
    assert "--jobs" not in compare  # compare-init runs one fine-tuning at a time unless asked
    plan.finetune_jobs = 6
    for method in ("maesil", "s3d"):
        compare = {stage.name: stage.command for stage in plan.stages()}[f"compare-init {method}"]
        assert compare[compare.index("--jobs") + 1] == "6"
    assert plan.display(jobs=4).endswith("--finetune-jobs 6 --jobs 4")
    plan.finetune_overrides = ["data.init_args.num_workers=0"]
    stages = {stage.name: stage.command for stage in plan.stages()}
    compare = stages["compare-init s3d"]
    assert compare[compare.index("--set") + 1:compare.index("--set") + 3] == [
        "data.init_args.num_workers=6", "data.init_args.num_workers=0"]  # the fine-tuning setting comes last
    assert "data.init_args.num_workers=0" not in " ".join(stages["pretrain maesil"])
    assert "--finetune-set data.init_args.num_workers=0 --finetune-jobs 6" in plan.display()


def test_each_stage_needs_exactly_the_stages_whose_outputs_it_reads(tmp_path):
    needs = {stage.name: set(stage.needs) for stage in EvidencePlan(out=tmp_path, cnn_method="pgl").stages()}
    assert needs == {
        "pretrain maesil": set(),  # writes the training phantoms the other pretraining runs read
        **{f"pretrain {m}": {"pretrain maesil"} for m in ("ae", "vae", "vqvae", "pgl")},
        "held-out phantoms": set(),
        "recon": {"held-out phantoms", "pretrain maesil", "pretrain ae", "pretrain vae", "pretrain vqvae"},
        "compare-init maesil": {"pretrain maesil"}, "compare-init pgl": {"pretrain pgl"}}


def test_a_stage_starts_only_after_what_it_needs_and_reruns_when_that_reran(tmp_path, monkeypatch):
    slow = ("import sys, pathlib, time; time.sleep(0.5); pathlib.Path(sys.argv[1]).write_text('x')")
    check = ("import sys, pathlib; ok = pathlib.Path(sys.argv[1]).exists(); "
             "pathlib.Path(sys.argv[2]).write_text('x') if ok else sys.exit(5)")
    a, b = tmp_path / "a", tmp_path / "b"
    fake = [Stage("a", [sys.executable, "-c", slow, str(a)], a),
            Stage("b", [sys.executable, "-c", check, str(a), str(b)], b, needs=("a",))]
    monkeypatch.setattr(EvidencePlan, "stages", lambda self: [dataclasses.replace(stage) for stage in fake])
    out = tmp_path / "evidence"
    run_stages(EvidencePlan(out=out), jobs=2)  # "b" would exit 5 if it started beside "a"
    assert [stage.reused for stage in run_stages(EvidencePlan(out=out), jobs=2)] == [True, True]
    record = json.loads((out / "stages.json").read_text())
    record["a"]["command"] = ["changed"]
    (out / "stages.json").write_text(json.dumps(record))
    assert [stage.reused for stage in run_stages(EvidencePlan(out=out), jobs=2)] == [False, False]


    # Two stages that each wait for the other's file can only finish side by side.
    script = ("import sys, pathlib, time; mine, other = map(pathlib.Path, sys.argv[1:]); mine.write_text('x'); "
              "deadline = time.time() + 20\nwhile not other.exists() and time.time() < deadline: time.sleep(0.05)\n"
              "sys.exit(0 if other.exists() else 3)")
    a, b = tmp_path / "a", tmp_path / "b"
    fake = [Stage("one", [sys.executable, "-c", script, str(a), str(b)], a),
            Stage("two", [sys.executable, "-c", script, str(b), str(a)], b)]
    monkeypatch.setattr(EvidencePlan, "stages", lambda self: fake)
    done = run_stages(EvidencePlan(out=tmp_path / "evidence"), jobs=2)
    assert all(stage.seconds is not None and not stage.reused for stage in done)


def test_the_next_stage_starts_as_soon_as_one_ends(tmp_path, monkeypatch):
    # "long" can only end once "third" has written its file; with 2 jobs "third" starts when "short" ends.
    wait = ("import sys, pathlib, time; other = pathlib.Path(sys.argv[1]); mine = pathlib.Path(sys.argv[2]); "
            "deadline = time.time() + 20\nwhile not other.exists() and time.time() < deadline: time.sleep(0.05)\n"
            "mine.write_text('x'); sys.exit(0 if other.exists() else 3)")
    write = "import sys, pathlib; pathlib.Path(sys.argv[1]).write_text('x')"
    long, short, third = tmp_path / "long", tmp_path / "short", tmp_path / "third"
    fake = [Stage("long", [sys.executable, "-c", wait, str(third), str(long)], long),
            Stage("short", [sys.executable, "-c", write, str(short)], short),
            Stage("third", [sys.executable, "-c", write, str(third)], third)]
    monkeypatch.setattr(EvidencePlan, "stages", lambda self: fake)
    done = run_stages(EvidencePlan(out=tmp_path / "evidence"), jobs=2)
    assert all(stage.seconds is not None for stage in done) and long.exists()


def test_a_failure_starts_no_further_stage(tmp_path, monkeypatch):
    never = tmp_path / "never"
    fake = [Stage("bad", [sys.executable, "-c", "import sys; sys.exit(4)"], tmp_path / "bad"),
            Stage("next", [sys.executable, "-c", f"open({str(never)!r}, 'w')"], never, needs=("bad",))]
    monkeypatch.setattr(EvidencePlan, "stages", lambda self: fake)
    with pytest.raises(RuntimeError, match="stage 'bad' failed \\(exit 4\\)"):
        run_stages(EvidencePlan(out=tmp_path / "evidence"), jobs=1)
    assert not never.exists()


def test_bad_options_are_refused_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        evidence_command(["--out", str(tmp_path / "e"), "--trainer-config", str(tmp_path / "missing.yaml")])
    assert "missing.yaml" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evidence_command(["--out", str(tmp_path / "e"), "--set", "trainer.max_steps"])
    assert "KEY=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evidence_command(["--out", str(tmp_path / "e"), "--finetune-set", "data.init_args.num_workers"])
    assert "--finetune-set takes KEY=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evidence_command(["--out", str(tmp_path / "e"), "--finetune-jobs", "0"])
    assert "--finetune-jobs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evidence_command(["--out", str(tmp_path / "e"), "--cnn-finetune-steps", "0"])
    assert "--cnn-finetune-steps" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_stages_side_by_side_share_the_cores_unless_the_caller_chose_the_threads():
    assert stage_environment({}, jobs=1, cores=8) == {"WANDB_MODE": "disabled"}
    assert stage_environment({}, jobs=2, cores=8)["OMP_NUM_THREADS"] == "4"
    assert stage_environment({}, jobs=6, cores=16)["OMP_NUM_THREADS"] == "2"
    assert stage_environment({}, jobs=4, cores=2)["OMP_NUM_THREADS"] == "1"
    assert stage_environment({"OMP_NUM_THREADS": "3", "WANDB_MODE": "offline"}, jobs=2, cores=8) == {
        "OMP_NUM_THREADS": "3", "WANDB_MODE": "offline"}
