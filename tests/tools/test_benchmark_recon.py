"""``python -m maesil benchmark-recon`` end to end on tiny checkpoints trained through the CLI."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from maesil.cli import main
from maesil.tools import TOOLS
from maesil.methods.base import MethodModule
from maesil.tools.benchmark_recon import benchmark_recon_command, format_mean_std, method_names, summarise
from tests.helpers import REPO_ROOT, tiny_maesil_args

pytestmark = pytest.mark.filterwarnings("ignore:The state dict in .* contains no parameters")


class SeeAll(MethodModule):
    """An 'autoencoder' that returns its input exactly and has no mask."""

    def reconstruct_for_evaluation(self, batch):
        return batch["image"].clone(), None


def train(data_dir: Path, run_dir: Path, *extra: str) -> Path:
    main(["fit", *tiny_maesil_args(data_dir, run_dir, max_steps=2), "--trainer.val_check_interval", "2",
          "--trainer.limit_val_batches", "1", *extra])
    return run_dir / "checkpoints" / "last.ckpt"


def checkpoint_like(source: Path, target: Path, class_path: str, state_dict: dict | None = None,
                    hyper_parameters: dict | None = None, **data_changes) -> Path:
    """A checkpoint as `fit` writes it, for another model class and/or other data settings."""
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"] = {"_class_path": class_path, **(hyper_parameters or {})}
    checkpoint["state_dict"] = state_dict or {}
    checkpoint["datamodule_hyper_parameters"].update(data_changes)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, target)
    return target


@pytest.fixture(scope="module")
def checkpoints(tiny_ct_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("benchmark_runs")
    dual = train(tiny_ct_dir, root / "dual")
    random = train(tiny_ct_dir, root / "random", "--model.init_args.masking", "random",
                   "--model.init_args.mask_ratio", "0.75")
    maesil_dual = torch.load(dual, map_location="cpu", weights_only=True)
    see_all = checkpoint_like(dual, root / "see_all" / "checkpoints" / "last.ckpt",
                              f"{__name__}.SeeAll")
    assert maesil_dual["hyper_parameters"]["_class_path"] == "maesil.methods.MAESIL"
    return {"dual": dual, "random": random, "see_all": see_all}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_tool_is_registered():
    assert "benchmark-recon" in TOOLS


def test_benchmark_writes_tables_and_figure(checkpoints, tiny_ct_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    code = benchmark_recon_command([
        "--checkpoints", str(checkpoints["dual"]), str(checkpoints["random"]), str(checkpoints["see_all"]),
        "--data", str(tiny_ct_dir), "--out", str(out), "--max-volumes", "2", "--batch-size", "4",
    ])
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"results.md", "results.csv", "per_volume.csv", "slices.png"}
    assert (out / "slices.png").stat().st_size > 10_000

    every_row = read_csv(out / "results.csv")
    # --protocol both (the default): the inpaint rows with the two fills, then the paper rows
    assert [(row["protocol"], row["method"]) for row in every_row] == [
        ("inpaint", "MAESIL (dual)"), ("inpaint", "MAESIL (random)"), ("inpaint", "SeeAll"),
        ("inpaint", "mean fill"), ("inpaint", "blur fill"),
        ("paper", "MAESIL (dual)"), ("paper", "MAESIL (random)"), ("paper", "SeeAll")]
    summary = [row for row in every_row if row["protocol"] == "inpaint"][:3]
    fills = {row["method"]: row for row in every_row if row["class"] == "fill"}
    paper = {row["method"]: row for row in every_row if row["protocol"] == "paper"}
    assert [row["method"] for row in summary] == ["MAESIL (dual)", "MAESIL (random)", "SeeAll"]
    assert [row["masked_region"] for row in summary] == ["own", "own", "reference"]
    assert all(row["volumes"] == "2" for row in every_row)
    maesil_row, _, see_all_row = summary
    # the fills are scored on the first masked method's masks; the paper protocol has no masked region
    assert all(row["masked_region"] == "filled" and row["params"] == "0" and row["checkpoint"] == ""
               for row in fills.values())
    assert 0 < float(fills["mean fill"]["psnr_masked_mean"]) < float(fills["mean fill"]["psnr_mean"])
    assert float(fills["blur fill"]["psnr_masked_mean"]) > 0
    assert all(row["masked_region"] == "none" and row["psnr_masked_mean"] == "" for row in paper.values())
    assert float(paper["SeeAll"]["psnr_mean"]) == math.inf
    # nothing pasted back: the paper MAESIL is not exact anywhere, so it scores below its inpaint whole volume
    assert 0 < float(paper["MAESIL (dual)"]["psnr_mean"]) < float(maesil_row["psnr_mean"])
    assert int(maesil_row["params"]) > 10_000 and see_all_row["params"] == "0"
    assert 0 < float(maesil_row["psnr_masked_mean"]) < float(maesil_row["psnr_mean"]) < 60
    assert float(see_all_row["psnr_mean"]) == math.inf and see_all_row["psnr_std"] == ""
    assert float(see_all_row["ssim_mean"]) == pytest.approx(1.0, abs=1e-5)
    assert "lpips_mean" not in maesil_row

    every_volume = read_csv(out / "per_volume.csv")
    assert len(every_volume) == (5 + 3) * 2
    per_volume = [row for row in every_volume if row["protocol"] == "inpaint"]
    by_method = {}
    for row in per_volume:
        by_method.setdefault(row["method"], []).append(row)
    for fill in ("mean fill", "blur fill"):
        assert [r["masked_voxels"] for r in by_method[fill]] == [r["masked_voxels"] for r in by_method["MAESIL (dual)"]]
    assert all(row["masked_voxels"] == "" for row in every_volume if row["protocol"] == "paper")
    # the reference mask is the first masked method's, so the see-all method is scored on those voxels
    assert [r["masked_voxels"] for r in by_method["SeeAll"]] == [r["masked_voxels"] for r in by_method["MAESIL (dual)"]]
    assert [r["subject_id"] for r in by_method["SeeAll"]] == ["phantom_000", "phantom_001"]

    markdown = (out / "results.md").read_text()
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert len(table) == (1 + 3 + 2) + (1 + 3)  # per protocol: header + one row per checkpoint (+ the fills)
    assert "## Protocol `inpaint`" in markdown and "## Protocol `paper`" in markdown
    assert markdown.index("## Protocol `inpaint`") < markdown.index("| mean fill |") < markdown.index(
        "| blur fill |") < markdown.index("## Protocol `paper`")
    assert "**Protocol `inpaint`**" in markdown and "**Protocol `paper`**" in markdown
    assert "| SeeAll | 0.0 k | ∞ | ∞ | ∞ †" in markdown
    assert "n/a (no weights)" in markdown
    assert "2 volume(s)" in markdown and "superpatch 32×32×32" in markdown
    assert "masks of **MAESIL (dual)**" in markdown
    printed = capsys.readouterr().out
    assert table[0] in printed and table[-1] in printed


def test_masks_are_identical_across_runs_and_batch_sizes(checkpoints, tiny_ct_dir):
    from maesil.evaluation.reconstruction import reconstruct_volume
    from maesil.tools.benchmark_recon import data_settings, load_method, load_subjects

    masks = []
    for batch_size in (1, 3):
        model, data = load_method(checkpoints["dual"])
        settings, superpatch = data_settings(data)
        [(_, load)] = load_subjects(tiny_ct_dir, settings, superpatch)[:1]
        masks.append(reconstruct_volume(model, load(), superpatch, 0.0, batch_size).hidden_mask)
    assert masks[0] is not None and masks[0].any()
    assert torch.equal(masks[0], masks[1])


def test_lpips_column_with_local_weights(checkpoints, tiny_ct_dir, tmp_path):
    from maesil.evaluation.reconstruction import LPIPS2D

    weights = tmp_path / "alex.pth"
    torch.save(LPIPS2D().state_dict(), weights)
    out = tmp_path / "bench"
    assert benchmark_recon_command(["--checkpoints", str(checkpoints["see_all"]), "--data", str(tiny_ct_dir),
                                    "--out", str(out), "--max-volumes", "1", "--lpips-weights", str(weights)]) == 0
    rows = read_csv(out / "results.csv")
    assert [(row["protocol"], row["method"]) for row in rows] == [("inpaint", "SeeAll"), ("paper", "SeeAll")]
    for row in rows:  # no masked method, hence no masks to fill: no fill rows
        assert float(row["lpips_mean"]) == pytest.approx(0.0, abs=1e-6)
    assert "no method of this run masks its input, so they have no row" in (out / "results.md").read_text()
    assert str(weights) in (out / "results.md").read_text()


def test_missing_or_foreign_checkpoints_fail_clearly(checkpoints, tiny_ct_dir, tmp_path, capsys):
    args = ["--data", str(tiny_ct_dir), "--out", str(tmp_path / "out")]
    assert benchmark_recon_command(["--checkpoints", str(tmp_path / "absent.ckpt"), *args]) == 1
    assert "absent.ckpt: no such checkpoint file" in capsys.readouterr().err

    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    assert benchmark_recon_command(["--checkpoints", str(garbage), *args]) == 1
    assert "garbage.ckpt: cannot be read" in capsys.readouterr().err

    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1.0}}, foreign)
    assert benchmark_recon_command(["--checkpoints", str(foreign), *args]) == 1
    assert "does not name its model class" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_mismatched_settings_fail(checkpoints, tiny_ct_dir, tmp_path, capsys):
    other = checkpoint_like(checkpoints["dual"], tmp_path / "other" / "last.ckpt", f"{__name__}.SeeAll",
                            target_spacing=2.0)
    code = benchmark_recon_command(["--checkpoints", str(checkpoints["dual"]), str(other),
                                    "--data", str(tiny_ct_dir), "--out", str(tmp_path / "out")])
    assert code == 1
    err = capsys.readouterr().err
    assert "different preprocessing" in err and "[2.0, 2.0, 2.0]" in err and "[4.0, 4.0, 4.0]" in err


def mri_checkpoints(checkpoints: dict[str, Path], root: Path) -> tuple[Path, Path]:
    """The tiny MAESIL and the see-all model, as if trained on MRI (z-normalised; ``hu_window: null``)."""
    dual = torch.load(checkpoints["dual"], map_location="cpu", weights_only=True)
    hyper = {k: v for k, v in dual["hyper_parameters"].items() if k != "_class_path"}
    maesil = checkpoint_like(checkpoints["dual"], root / "maesil_mri" / "last.ckpt", "maesil.methods.MAESIL",
                             dual["state_dict"], hyper, modality="mri", hu_window=None)
    see_all = checkpoint_like(checkpoints["dual"], root / "see_all_mri" / "last.ckpt", f"{__name__}.SeeAll",
                              modality="mri", hu_window=None)
    return maesil, see_all


def test_mri_checkpoint_reconstructs_unclamped(checkpoints, tiny_ct_dir, tmp_path):
    from maesil.evaluation.reconstruction import reconstruct_volume
    from maesil.tools.benchmark_recon import data_settings, load_method, load_subjects

    maesil, _ = mri_checkpoints(checkpoints, tmp_path)
    model, data = load_method(maesil)
    settings, superpatch = data_settings(data)
    assert model.input_modality == "mri" and model.data_modality == "mri"
    assert settings.modality == "mri" and settings.hu_window is None
    [(_, load)] = load_subjects(tiny_ct_dir, settings, superpatch)[:1]
    result = reconstruct_volume(model, load(), superpatch, "minimum", batch_size=4)
    visible = ~result.hidden_mask
    assert float(result.image.min()) < -1.0 and float(result.image.max()) > 2.0  # z-normalised
    # Visible patches are copied from the input: as they are, not clipped to [0, 1].
    assert torch.equal(result.reconstruction[visible], result.image[visible])


def test_mri_benchmark_scores_on_each_volumes_range(checkpoints, tiny_ct_dir, tmp_path):
    maesil, see_all = mri_checkpoints(checkpoints, tmp_path)
    out = tmp_path / "bench"
    assert benchmark_recon_command(["--checkpoints", str(maesil), str(see_all), "--data", str(tiny_ct_dir),
                                    "--out", str(out), "--max-volumes", "1", "--names", "MAESIL", "exact"]) == 0
    rows = read_csv(out / "results.csv")
    assert [(row["protocol"], row["method"]) for row in rows] == [
        ("inpaint", "MAESIL"), ("inpaint", "exact"), ("inpaint", "mean fill"), ("inpaint", "blur fill"),
        ("paper", "MAESIL"), ("paper", "exact")]
    maesil_row, exact_row = rows[:2]
    assert float(exact_row["psnr_mean"]) == math.inf
    assert float(exact_row["ssim_mean"]) == pytest.approx(1.0, abs=1e-6)
    # Visible voxels are exact, so the whole volume scores better than its masked voxels.
    assert 0 < float(maesil_row["psnr_masked_mean"]) < float(maesil_row["psnr_mean"]) < 60
    markdown = (out / "results.md").read_text()
    assert "MRI, z-normalised over the foreground (reconstructions not clipped)" in markdown
    assert "data range the volume's own max − min" in markdown


def tiny_ae_args(data_dir: Path, run_dir: Path) -> list[str]:
    """The data and trainer arguments of :func:`tiny_maesil_args` with a tiny AE of ae_demo.yaml."""
    args = tiny_maesil_args(data_dir, run_dir, max_steps=2)
    pairs = [(args[i], args[i + 1]) for i in range(0, len(args), 2)]
    kept = [item for key, value in pairs if not key.startswith("--model.") and key != "--config"
            for item in (key, value)]
    return ["--config", str(REPO_ROOT / "experiments/pretrain/ae_demo.yaml"), *kept,
            "--model.init_args.channels", "[4, 8, 8]",
            "--model.init_args.strides", "[2, 2, 1]", "--model.init_args.num_res_units", "0",
            "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1"]


def test_benchmark_with_an_autoencoder(checkpoints, tiny_ct_dir, tmp_path):
    baselines = pytest.importorskip("maesil.methods.baselines")
    if getattr(baselines, "AE", None) is None or not (REPO_ROOT / "experiments/pretrain/ae_demo.yaml").exists():
        pytest.skip("the AE baseline is not available")
    main(["fit", *tiny_ae_args(tiny_ct_dir, tmp_path / "ae")])
    ae = tmp_path / "ae" / "checkpoints" / "last.ckpt"
    out = tmp_path / "bench"
    assert benchmark_recon_command(["--checkpoints", str(checkpoints["dual"]), str(ae), "--data", str(tiny_ct_dir),
                                    "--out", str(out), "--max-volumes", "1"]) == 0
    every_row = read_csv(out / "results.csv")
    assert [(row["protocol"], row["method"]) for row in every_row] == [
        ("inpaint", "MAESIL"), ("inpaint", "AE"), ("inpaint", "mean fill"), ("inpaint", "blur fill"),
        ("paper", "MAESIL"), ("paper", "AE")]
    summary = every_row[:2]
    # an autoencoder reconstructs the same way in both protocols
    assert every_row[5]["psnr_mean"] == summary[1]["psnr_mean"] and every_row[5]["masked_region"] == "none"
    assert summary[1]["masked_region"] == "reference"
    assert 0 < float(summary[1]["psnr_masked_mean"]) < 60
    markdown = (out / "results.md").read_text()
    assert "| AE |" in markdown and "masks of **MAESIL**" in markdown


def test_names_and_summaries():
    paths = [Path("runs/a/checkpoints/last.ckpt"), Path("runs/b/checkpoints/last.ckpt"), Path("x/ae.ckpt")]
    assert method_names(paths, ["MAESIL", "MAESIL", "AE"], None) == ["MAESIL (a)", "MAESIL (b)", "AE"]
    same = [Path("runs/a/checkpoints/last.ckpt")] * 2
    assert method_names(same, ["MAESIL", "MAESIL"], None) == ["MAESIL (a) #1", "MAESIL (a) #2"]
    assert method_names(paths, ["M", "M", "A"], ["x", "y", "z"]) == ["x", "y", "z"]
    assert summarise([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert format_mean_std(*summarise([math.inf, 30.0]), 2) == "∞"
    assert format_mean_std(*summarise([]), 2) == "n/a"
    assert format_mean_std(12.345, 0.5, 2) == "12.35 ± 0.50"


class _RunsCode:
    """Unpickling this would create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_checkpoints_are_read_by_the_safe_reader(tmp_path, capsys):
    from maesil.tools.benchmark_recon import BenchmarkError, load_method

    marker = tmp_path / "ran"
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": f"{__name__}.SeeAll", "x": _RunsCode(marker)},
                "datamodule_hyper_parameters": {"modality": "ct"}}, unsafe)
    with pytest.raises(BenchmarkError, match="unsafe.ckpt: cannot be read as a checkpoint") as info:
        load_method(unsafe)
    assert "arbitrary unpickling" in str(info.value) and not marker.exists()


def test_an_old_checkpoint_is_rebuilt_from_its_class_path():
    from maesil.tools.benchmark_recon import load_method
    from tests.checkpoints.test_old_format import MAESIL_V0_1

    model, data = load_method(MAESIL_V0_1)
    saved = torch.load(MAESIL_V0_1, map_location="cpu", weights_only=True)["state_dict"]
    assert type(model).__name__ == "MAESIL" and not model.training and model.input_modality == "ct"
    assert all(torch.equal(model.state_dict()[key], value) for key, value in saved.items())
    assert data["superpatch_size"] == 32 and data["target_spacing"] == 4.0


def test_paper_protocol_shows_maesil_every_token_and_pastes_nothing(checkpoints, tiny_ct_dir, monkeypatch):
    """Masking off: drawing a mask raises, the encoder receives every token, the decoder's prediction is returned."""
    import maesil.methods.maesil as maesil_module
    from maesil.evaluation.reconstruction import reconstruct_volume
    from maesil.models.vit3d import unpatchify
    from maesil.tools.benchmark_recon import data_settings, load_method, load_subjects

    model, data = load_method(checkpoints["dual"])
    settings, superpatch = data_settings(data)
    [(_, load)] = load_subjects(tiny_ct_dir, settings, superpatch)[:1]

    def no_mask(*args, **kwargs):
        raise AssertionError("the paper protocol must not draw a mask")

    monkeypatch.setattr(maesil_module, "make_mask", no_mask)
    monkeypatch.setattr(type(model), "validation_mask", no_mask)
    seen_tokens, decoded = [], []
    model.net.encoder.register_forward_hook(lambda module, args, output: seen_tokens.append(output.shape[1]))
    model.net.register_forward_hook(lambda module, args, output: decoded.append(output))
    result = reconstruct_volume(model, load(), superpatch, 0.0, batch_size=4, masked=False)
    assert result.hidden_mask is None
    assert seen_tokens and set(seen_tokens) == {model.net.encoder.num_tokens}
    assert all(not output.mask.mask.any() and output.pred.shape[1] == model.net.encoder.num_tokens
               for output in decoded)
    # the reconstruction is the decoder's prediction of every token, not the input pasted back
    images = torch.rand(2, 1, *superpatch)
    reconstruction = model.reconstruct_unmasked({"image": images})
    expected = unpatchify(decoded[-1].pred, model.token_size, model.grid, 1).clamp(0, 1)
    assert torch.allclose(reconstruction, expected, atol=1e-6)
    assert (reconstruction - images).abs().mean() > 0.01
    with pytest.raises(AssertionError, match="must not draw a mask"):
        model.reconstruct_for_evaluation({"image": images, "subject_id": ["a", "b"],
                                          "location": torch.zeros(2, 6, dtype=torch.long)})


def test_s3d_and_autoencoders_reconstruct_unmasked():
    from maesil.methods.s3d import S3D

    s3d = S3D(unet_preset="tiny", superpatch_size=32, mask_block_size=8).eval()
    images = torch.rand(2, 1, 32, 32, 32)
    calls = []
    original = s3d.net.forward
    s3d.net.forward = lambda x, mask: calls.append(mask) or original(x, mask)
    reconstruction = s3d.reconstruct_unmasked({"image": images})
    assert reconstruction.shape == images.shape
    assert len(calls) == 1 and calls[0].dtype == torch.bool and not calls[0].any()
    assert torch.equal(reconstruction, s3d(images, calls[0]).clamp(0, 1))
    see_all = SeeAll()
    assert torch.equal(see_all.reconstruct_unmasked({"image": images}), images)

    class Hides(MethodModule):
        def reconstruct_for_evaluation(self, batch):
            return batch["image"], torch.ones_like(batch["image"], dtype=torch.bool)

    with pytest.raises(NotImplementedError, match="does not implement reconstruct_unmasked"):
        Hides().reconstruct_unmasked({"image": images})


@pytest.mark.parametrize("protocol", ["paper", "inpaint"])
def test_one_protocol_only(checkpoints, tiny_ct_dir, tmp_path, protocol):
    out = tmp_path / "bench"
    assert benchmark_recon_command(["--checkpoints", str(checkpoints["dual"]), "--data", str(tiny_ct_dir),
                                    "--out", str(out), "--max-volumes", "1", "--protocol", protocol]) == 0
    rows = read_csv(out / "results.csv")
    expected = ["MAESIL", "mean fill", "blur fill"] if protocol == "inpaint" else ["MAESIL"]
    assert [(row["protocol"], row["method"]) for row in rows] == [(protocol, name) for name in expected]
    markdown = (out / "results.md").read_text()
    assert f"## Protocol `{protocol}`" in markdown and f"**Protocol `{protocol}`**" in markdown
    other = "paper" if protocol == "inpaint" else "inpaint"
    assert f"## Protocol `{other}`" not in markdown and ("| mean fill |" in markdown) == (protocol == "inpaint")
