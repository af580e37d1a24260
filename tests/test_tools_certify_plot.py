"""tools/certify.py and tools/plot_run.py on the quickstart run trained in `tests/conftest.py`.

certify.py must reproduce the run's eval.json exactly (same fp32 weights, same test split, same counting
code), its radius distribution and per-class figures must add up, its PGD audit must find no point broken
inside its certified radius — and must find broken points once the radii are deliberately inflated 3×.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pytest
import torch

from lipnext_scale import certified_radius, load_pretrained
from lipnext_scale.pretrained import save_pretrained
from tests.conftest import load_tool

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.usefixtures("single_torch_thread")


certify_tool = load_tool("certify")
plot_tool = load_tool("plot_run")


def assert_real_png(path: Path) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert path.stat().st_size > 10_000
    pixels = matplotlib.image.imread(str(path))
    assert pixels.ndim == 3 and pixels.shape[0] > 300 and pixels.shape[1] > 400
    assert pixels[..., :3].std() > 0.05  # drawn on, not a blank canvas


@pytest.fixture(scope="module")
def certified(trained_quickstart, tmp_path_factory):
    out = tmp_path_factory.mktemp("certify")
    manifest = trained_quickstart / "data" / "digits-test.manifest.json"
    argv = [str(trained_quickstart / "model.safetensors"), "--data", str(manifest), "--out", str(out)]
    rc = certify_tool.main([*argv, "--audit", "8", "--eps", "36/255", "72/255", "108/255", "1"])
    assert rc == 0
    return out, json.loads((out / "certify.json").read_text()), argv


def test_certify_matches_eval_json_exactly(certified, trained_quickstart):
    out, result, _ = certified
    expected = json.loads((trained_quickstart / "eval.json").read_text())
    assert result["num_samples"] == expected["num_samples"] == 297
    assert result["clean_acc"] == expected["clean_acc"]
    assert result["cra"] == expected["cra"]  # same ε (36/255 parsed to the same float) and the same share
    assert result["lipschitz_bound"] == expected["lipschitz_bound"]
    assert result["cra"][-1]["cra"] < result["clean_acc"]  # non-trivial: ε = 1 loses points


def test_certify_json_radii_and_per_class_add_up(certified):
    out, result, _ = certified
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
    _, result, _ = certified
    audit = result["audit"]
    assert audit["num_points"] == 8 and len(audit["sample_indices"]) == 8
    assert audit["steps"] == 100 and audit["restarts"] >= 2
    assert set(audit["attacks"]) >= {"pgd_l2", "pgd_l2_clamp01"}
    assert "torchattacks" in audit["apgd"]
    assert audit["violations"] == []
    for ratio in audit["min_margin_ratio"].values():
        assert 0 < ratio < 1  # the attack made progress but never crossed


def test_audit_has_teeth_on_inflated_radii(certified, trained_quickstart):
    """3× the certified radius is not certified: the same audit must report prediction changes."""
    _, result, argv = certified
    model = load_pretrained(trained_quickstart / "model.safetensors")
    recipe = certify_tool.read_recipe(trained_quickstart / "model.safetensors")
    images = certify_tool._gather_images(Path(argv[2]), recipe, result["audit"]["sample_indices"], "cpu")
    with torch.no_grad():
        radius, _ = certified_radius(model, model(images))
    assert (radius > 0).all()
    report = certify_tool.audit(model, images, 3 * radius, steps=40, restarts=1)
    assert report["violations"], report["min_margin_ratio"]
    for v in report["violations"]:
        assert v["delta_norm"] <= v["certified_radius"] and v["adversarial_pred"] != v["pred"]


def test_certify_offload_loads_the_same_model(certified, tmp_path):
    _, result, argv = certified
    argv = [argv[0], argv[1], argv[2], "--out", str(tmp_path), "--offload"]
    assert certify_tool.main(argv) == 0
    offloaded = json.loads((tmp_path / "certify.json").read_text())
    assert offloaded["offload"] is True
    for key in ("clean_acc", "cra", "lipschitz_bound", "radii", "per_class"):
        assert offloaded[key] == result[key], key


def test_certify_draws_the_published_points_the_recipe_lists(certified, trained_quickstart, tmp_path):
    _, result, argv = certified
    weights = trained_quickstart / "model.safetensors"
    recipe = certify_tool.read_recipe(weights)
    recipe.certify.reported_cra = [(36 / 255, 0.5), (2.5, 0.25)]  # made-up points, beyond every radius
    recipe.certify.reported_source = "test table"
    relabelled = tmp_path / "model.safetensors"
    save_pretrained(relabelled, load_pretrained(weights).state_dict(), recipe)
    assert certify_tool.main([str(relabelled), *argv[1:3], "--eps", "36/255"]) == 0
    with_points = json.loads((tmp_path / "certify.json").read_text())
    assert with_points["paper_configuration"] == "test table" and with_points["why"] is None
    assert with_points["paper_points"] == [{"eps": 36 / 255, "cra": 0.5}, {"eps": 2.5, "cra": 0.25}]
    assert with_points["cra"][0] == result["cra"][0]  # same weights, same certificate
    assert_real_png(tmp_path / "cra_curve.png")
    assert green_pixels(tmp_path / "cra_curve.png") > 50  # the published points' squares (and legend)
    assert green_pixels(Path(argv[4]) / "cra_curve.png") == 0


def green_pixels(png: Path) -> int:
    """Pixels of matplotlib's tab:green, the colour certify.py draws published points in."""
    rgb = torch.from_numpy(matplotlib.image.imread(str(png))[..., :3].copy())
    return int(((rgb - torch.tensor([44, 160, 44]) / 255).abs().max(dim=-1).values < 0.02).sum())


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
