"""Certifying a run (`lipnext_scale.certify_run`, `tools/certify.py`) and `tools/plot_run.py`, on the
quickstart run trained in `tests/conftest.py`.

Certification must reproduce the run's eval.json exactly (same fp32 weights, same test split, same counting
code), its radius distribution and per-class figures must add up, its audit (PGD, APGD, rounding search)
must find no point broken inside its certified radius — and must find broken points, re-checked here from
the adversarial examples themselves, once the radii are deliberately inflated 3×. The command line refuses
data that does not fit the model, accepts a run directory and writes where --out says.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch

from lipnext_scale import Certifier, load_pretrained
from lipnext_scale.audit import audit
from lipnext_scale.certify_run import (
    CertifyError,
    certify_model_file,
    default_out,
    gather_images,
    label_offsets,
)
from lipnext_scale.data import build_loader
from lipnext_scale.pretrained import read_recipe, save_pretrained
from tests.conftest import REPO, load_tool

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EPS = [36 / 255, 72 / 255, 108 / 255, 1.0]

pytestmark = pytest.mark.usefixtures("single_torch_thread")

plot_tool = load_tool("plot_run")


def assert_real_png(path: Path) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert path.stat().st_size > 10_000
    pixels = matplotlib.image.imread(str(path))
    assert pixels.ndim == 3 and pixels.shape[0] > 300 and pixels.shape[1] > 400
    assert pixels[..., :3].std() > 0.05  # drawn on, not a blank canvas


def manifest_of(run_dir: Path) -> Path:
    return run_dir / "data" / "digits-test.manifest.json"


@pytest.fixture(scope="module")
def certified(trained_quickstart, tmp_path_factory):
    # APGD must run, so torchattacks is required here (CI installs it; see lipnext_scale/audit.py).
    import torchattacks  # noqa: F401

    out = tmp_path_factory.mktemp("certify")
    certify_model_file(
        trained_quickstart,
        manifest_of(trained_quickstart),
        eps_list=EPS,
        out=out,
        audit_points=8,
        audit_steps=100,
        audit_restarts=2,
    )
    return out, json.loads((out / "certify.json").read_text())


def test_certify_matches_eval_json_exactly(certified, trained_quickstart):
    out, result = certified
    expected = json.loads((trained_quickstart / "eval.json").read_text())
    assert result["num_samples"] == expected["num_samples"] == 297
    assert result["clean_acc"] == expected["clean_acc"]
    assert result["cra"] == expected["cra"]  # same ε (36/255 parsed to the same float) and the same share
    assert result["lipschitz_bound"] == expected["lipschitz_bound"]
    assert result["mode"] == expected["mode"] == "fp32"
    assert result["cra"][-1]["cra"] < result["clean_acc"]  # non-trivial: ε = 1 loses points


def test_certify_json_radii_and_per_class_add_up(certified):
    out, result = certified
    for key in ("clean_acc", "cra", "per_class", "radii", "paper_points", "why", "audit", "lipschitz_bound"):
        assert key in result, key
    assert result["paper_points"] is None and "certify.reported_cra" in result["why"]
    assert result["paper_configuration"] is None  # the quickstart reproduces no published table

    total = result["num_samples"]
    classes = result["per_class"]["classes"]
    assert result["per_class"]["eps"] == pytest.approx(36 / 255)
    assert [c["class"] for c in classes] == list(range(10))
    assert sum(c["total"] for c in classes) == total
    assert sum(c["correct"] for c in classes) == round(result["clean_acc"] * total)
    assert sum(c["certified"] for c in classes) == round(result["cra"][0]["cra"] * total)
    for c in classes:
        assert 0 <= c["certified"] <= c["correct"] <= c["total"]

    radii = result["radii"]
    values = [q["radius"] for q in radii["quantiles"]]
    qs = [q["q"] for q in radii["quantiles"]]
    assert qs == sorted(qs) and qs[0] == 0 and qs[-1] == 1
    assert values == sorted(values) and values[0] == 0.0  # misclassified points are radius 0
    assert values[-1] > 1.0
    counts, edges = radii["histogram"]["counts"], radii["histogram"]["edges"]
    assert sum(counts) == total and len(edges) == len(counts) + 1
    assert edges[-1] == pytest.approx(values[-1])
    # The first bin holds at least every misclassified point (radius 0).
    assert counts[0] >= total - round(result["clean_acc"] * total)

    assert_real_png(out / "cra_curve.png")


def test_audit_finds_no_violation_inside_certified_radii(certified):
    _, result = certified
    audit_report = result["audit"]
    assert audit_report["num_points"] == 8 and len(audit_report["sample_indices"]) == 8
    assert audit_report["steps"] == 100 and audit_report["restarts"] >= 2
    # APGD did run (torchattacks is required, not optional, for the audit here).
    assert audit_report["attacks"] == ["pgd_l2", "pgd_l2_clamp01", "apgd_l2", "rounding_search"]
    assert audit_report["apgd"] == "torchattacks APGD-L2"
    assert audit_report["violations"] == [] and audit_report["violation_rate"] == 0.0
    for name in ("pgd_l2", "pgd_l2_clamp01"):
        assert 0 < audit_report["min_margin_ratio"][name] < 1  # the attack made progress, never crossed
    assert 0 < audit_report["min_margin_ratio"]["apgd_l2"] <= 1  # APGD returns x where it fails


def test_audit_has_teeth_on_inflated_radii(certified, trained_quickstart):
    """3× the certified radius is not certified: every attack, APGD included, must report prediction
    changes, and each one is re-checked here from its adversarial example, not from the report's fields."""
    _, result = certified
    model = load_pretrained(trained_quickstart / "model.safetensors")
    recipe = read_recipe(trained_quickstart / "model.safetensors")
    loader = build_loader(
        manifest_of(trained_quickstart),
        batch_size=64,
        train=False,
        image_size=32,
        augment=recipe.data.augment,
    )
    images = gather_images(loader, result["audit"]["sample_indices"])
    certifier = Certifier(model)
    radius, pred = certifier(images)
    assert (radius > 0).all()
    inflated = 3 * radius
    report = audit(certifier, images, inflated, steps=40, restarts=1, keep_examples=True)
    assert {v["attack"] for v in report["violations"]} >= {"pgd_l2", "apgd_l2"}, report["min_margin_ratio"]
    assert len(report["examples"]) == len(report["violations"])
    for v, x_adv in zip(report["violations"], report["examples"]):
        i = v["index"]
        norm = torch.linalg.vector_norm(x_adv.double() - images[i].double()).item()
        assert norm < inflated[i].item()
        assert norm > radius[i].item()  # nothing inside the real certificate
        with torch.no_grad():
            assert model(x_adv[None]).argmax().item() != pred[i].item()


def test_certify_offload_loads_the_same_model(certified, trained_quickstart, tmp_path):
    _, result = certified
    offloaded = certify_model_file(
        trained_quickstart / "model.safetensors",
        manifest_of(trained_quickstart),
        eps_list=EPS,
        out=tmp_path,
        offload=True,
    )
    assert offloaded["offload"] is True
    for key in ("clean_acc", "cra", "lipschitz_bound", "radii", "per_class"):
        assert offloaded[key] == result[key], key


def test_sound_mode_and_cascade_report_both_counts(certified, trained_quickstart, tmp_path):
    _, result = certified
    sound = certify_model_file(
        trained_quickstart, manifest_of(trained_quickstart), eps_list=EPS, out=tmp_path / "s", mode="sound"
    )
    cascade = certify_model_file(
        trained_quickstart, manifest_of(trained_quickstart), eps_list=EPS, out=tmp_path / "c", mode="cascade"
    )
    assert sound["mode"] == "sound" and cascade["mode"] == "cascade"
    assert sound["clean_acc"] == result["clean_acc"]
    assert cascade["certified_per_mode"]["fp32"] == {
        str(e): round(r["cra"] * 297) for e, r in zip(EPS, result["cra"])
    }
    assert cascade["certified_per_mode"]["sound"] == sound["certified_per_mode"]["sound"]
    assert cascade["cra"] == sound["cra"]
    assert 0 < cascade["timing"]["sound_rechecked_points"] < 297
    for row_sound, row_fp32 in zip(sound["cra"], result["cra"]):
        assert row_sound["cra"] <= row_fp32["cra"] + 2 / 297  # rounding costs at most a point or two here


def test_certify_draws_the_published_points_the_recipe_lists(certified, trained_quickstart, tmp_path):
    out, result = certified
    weights = trained_quickstart / "model.safetensors"
    recipe = read_recipe(weights)
    recipe.certify.reported_cra = [(36 / 255, 0.5), (2.5, 0.25)]  # made-up points, beyond every radius
    recipe.certify.reported_source = "test table"
    relabelled = tmp_path / "model.safetensors"
    save_pretrained(relabelled, load_pretrained(weights).state_dict(), recipe)
    with_points = certify_model_file(relabelled, manifest_of(trained_quickstart), eps_list=[36 / 255])
    png = Path(with_points["cra_curve_png"])
    assert (
        png.parent
        == default_out(relabelled, manifest_of(trained_quickstart))
        == tmp_path / "certify-digits-test"
    )
    assert with_points["paper_configuration"] == "test table" and with_points["why"] is None
    assert with_points["paper_points"] == [{"eps": 36 / 255, "cra": 0.5}, {"eps": 2.5, "cra": 0.25}]
    assert with_points["cra"][0] == result["cra"][0]  # same weights, same certificate
    assert_real_png(png)
    assert green_pixels(png) > 50  # the published points' squares (and legend)
    assert green_pixels(out / "cra_curve.png") == 0


def test_cra_labels_of_close_points_do_not_overlap():
    close = [(0.14, 93.3), (0.28, 92.3), (0.42, 90.9), (1.0, 86.5)]
    offsets = label_offsets(close, xspan=1.2, yspan=100.0)
    assert offsets[0] != offsets[1] and offsets[1] != offsets[2]  # neighbours alternate above/below
    assert offsets[3] == (4, 4)  # far from the rest: the default, above
    assert label_offsets([(0.1, 10.0), (1.0, 90.0)], 1.2, 100.0) == [(4, 4), (4, 4)]


def green_pixels(png: Path) -> int:
    """Pixels of matplotlib's tab:green, the colour certify draws published points in."""
    rgb = torch.from_numpy(matplotlib.image.imread(str(png))[..., :3].copy())
    return int(((rgb - torch.tensor([44, 160, 44]) / 255).abs().max(dim=-1).values < 0.02).sum())


# ----------------------------------------------------------------------------- the command line


def run_certify_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "certify.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_cli_accepts_a_run_directory_and_writes_where_out_says(trained_quickstart, tmp_path):
    before = {p.name for p in trained_quickstart.iterdir()}
    done = run_certify_cli(
        str(trained_quickstart),
        "--data",
        str(manifest_of(trained_quickstart)),
        "--eps",
        "36/255",
        "--out",
        str(tmp_path / "here"),
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "here" / "certify.json").is_file() and (tmp_path / "here" / "cra_curve.png").is_file()
    assert {p.name for p in trained_quickstart.iterdir()} == before  # nothing written into the run
    assert "[fp32] clean" in done.stdout and "certified by fp32" in done.stdout


def test_cli_help_explains_every_option():
    done = run_certify_cli("--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    for phrase in (
        "--eps EPS",
        "L2 radii",
        "--out OUT",
        "default: <run dir>/certify-<data name>",
        "--audit K",
        "rounding search",
        "--sound",
        "float64",
        "--cascade",
        "--limit N",
    ):
        assert phrase in text, phrase


def copy_manifest(run_dir: Path, dest: Path, **changes) -> Path:
    src = manifest_of(run_dir)
    raw = json.loads(src.read_text())
    for shard in raw["shards"]:
        for key in ("tar", "index"):
            shutil.copy(src.parent / shard[key], dest / shard[key])
    for key, value in changes.items():
        if key == "image_size":
            raw["meta"]["image_size"] = value
        else:
            raw[key] = value
            raw["class_names"] = raw["class_names"][:value]
    path = dest / src.name
    path.write_text(json.dumps(raw))
    return path


def test_data_that_does_not_fit_the_model_is_refused(trained_quickstart, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    two_classes = copy_manifest(trained_quickstart, tmp_path / "a", num_classes=2)
    wrong_size = copy_manifest(trained_quickstart, tmp_path / "b", image_size=64)
    with pytest.raises(CertifyError, match="2 classes, but the model has 10"):
        certify_model_file(trained_quickstart, two_classes, eps_list=EPS, out=tmp_path / "x")
    with pytest.raises(CertifyError, match="64 px, the model takes 32 px"):
        certify_model_file(trained_quickstart, wrong_size, eps_list=EPS, out=tmp_path / "x")
    with pytest.raises(CertifyError, match="without model.safetensors"):
        certify_model_file(tmp_path, wrong_size, eps_list=EPS)
    assert not (tmp_path / "x").exists()
    done = run_certify_cli(str(trained_quickstart), "--data", str(two_classes))
    assert done.returncode == 2 and "2 classes, but the model has 10" in done.stderr


def test_cli_says_when_apgd_cannot_run(trained_quickstart, monkeypatch, capsys):
    """Without torchattacks, --audit stops with the install command instead of silently skipping APGD."""
    certify_tool = load_tool("certify")
    monkeypatch.setitem(sys.modules, "torchattacks", None)  # makes `import torchattacks` fail
    with pytest.raises(SystemExit) as stop:
        certify_tool.main(
            [str(trained_quickstart), "--data", str(manifest_of(trained_quickstart)), "--audit", "2"]
        )
    assert stop.value.code == 2
    assert "pip install --no-deps torchattacks" in capsys.readouterr().err


# ----------------------------------------------------------------------------- plot_run


def test_plot_run_writes_a_png(trained_quickstart, tmp_path):
    assert plot_tool.main([str(trained_quickstart), "--out", str(tmp_path / "run.png")]) == 0
    assert_real_png(tmp_path / "run.png")


def test_plot_run_errors_clearly_without_step_records(tmp_path, capsys):
    assert plot_tool.main([str(tmp_path)]) == 2
    assert str(tmp_path / "metrics.jsonl") in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "optimizer_bytes_per_rank": [1]}) + "\n")
    with pytest.raises(plot_tool.RunError, match=r"metrics\.jsonl: no step records"):
        plot_tool.plot_run(tmp_path)
    assert not (tmp_path / "run.png").exists()
