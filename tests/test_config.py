"""Recipes: every shipped file loads and builds; every documented bad input fails with file, key and rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lipnext_scale.config import ConfigError, load_recipe
from lipnext_scale.pretrained import build_model

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))

# The paper's parameter counts (DESIGN.md §1), by model size.
PARAM_RANGES = {
    "L32W1024": (64e6, 68e6),
    "L32W2048": (256e6, 270e6),
    "L32W4096": (1.0e9, 1.1e9),
    "L32W5760": (2.0e9, 2.2e9),
}


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"quickstart.yaml", "in1k_1b.yaml", "in1k_2b.yaml", "cifar10_l32w1024.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_and_builds_with_paper_parameter_count(path):
    recipe = load_recipe(path)
    with torch.device("meta"):
        model = build_model(recipe)
    count = sum(p.numel() for p in model.parameters())
    lo, hi = PARAM_RANGES.get(recipe.model.size, (0, 1e7))
    assert lo <= count <= hi, f"{path.name}: {count:,} parameters outside [{lo:,.0f}, {hi:,.0f}]"
    # Images must tile into patches and the output must have one logit per class.
    images = torch.empty(2, 3, recipe.model.image_size, recipe.model.image_size, device="meta")
    assert model(images).shape == (2, recipe.model.num_classes)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


BAD_RECIPES = [
    ("model:\n  bta: 0.5\n", ["bad.yaml", "model.bta", "unknown key", "beta"]),
    ("modle:\n  size: L6W64\n", ["bad.yaml", "unknown section 'modle'", "model"]),
    ("model:\n  beta: 1.5\n", ["bad.yaml", "model.beta", "1.5", "≤ 1"]),
    ("model:\n  beta: -0.1\n", ["bad.yaml", "model.beta", "≥ 0"]),
    ("model:\n  alpha: 0.3\n", ["bad.yaml", "model.alpha", "≤ 0.25"]),
    ("model:\n  image_size: 32\n  patch: 5\n", ["bad.yaml", "model.patch", "does not divide", "32"]),
    ("model:\n  size: L7W99\n", ["bad.yaml", "model.size", "L32W1024"]),
    ("train:\n  epochs: ten\n", ["bad.yaml", "train.epochs", "an integer"]),
    ("train:\n  epochs: 2.5\n", ["bad.yaml", "train.epochs", "an integer"]),
    ("train:\n  precision: fp16\n", ["bad.yaml", "train.precision", "bf16", "fp32"]),
    ("optim:\n  lr: 0\n", ["bad.yaml", "optim.lr", "> 0"]),
    ("optim:\n  betas: [0.9]\n", ["bad.yaml", "optim.betas", "exactly 2"]),
    ("optim:\n  betas: [0.9, 1.0]\n", ["bad.yaml", "optim.betas", "[0, 1)"]),
    ("data:\n  source: shards\n", ["bad.yaml", "data.train_manifest", "make_shards"]),
    ("run:\n  wandb: maybe\n", ["bad.yaml", "run.wandb", "true or false"]),
    ("certify:\n  eps: [0.1, -1]\n", ["bad.yaml", "certify.eps", "positive"]),
    (
        "certify:\n  reported_cra: [[36/255, 74.2]]\n  reported_source: T\n",
        ["bad.yaml", "certify.reported_cra", "CRA in [0, 1]"],
    ),
    ("certify:\n  reported_cra: [[1, 0.3]]\n", ["bad.yaml", "certify.reported_source", "publication"]),
    ("model: [1, 2]\n", ["bad.yaml", "section 'model' must be a mapping"]),
    ("- just\n- a list\n", ["bad.yaml", "mapping of sections"]),
    ("model:\n  beta: [0.5\n", ["bad.yaml", "not valid YAML"]),
]


@pytest.mark.parametrize("text,expected", BAD_RECIPES, ids=[t.splitlines()[0] + "…" for t, _ in BAD_RECIPES])
def test_bad_recipe_error_names_file_key_and_rule(tmp_path, text, expected):
    with pytest.raises(ConfigError) as info:
        load_recipe(write(tmp_path, text))
    for fragment in expected:
        assert fragment in str(info.value), f"{fragment!r} not in: {info.value}"


def test_missing_recipe_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_dotted_overrides_are_typed_and_validated(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 3\n")
    recipe = load_recipe(
        path, ["train.epochs=2", "run.output_dir=runs/try", "optim.lr=5e-3", "train.eps=72/255"]
    )
    assert recipe.train.epochs == 2
    assert recipe.run.output_dir == "runs/try"
    assert recipe.optim.lr == pytest.approx(5e-3)
    assert recipe.train.eps == pytest.approx(72 / 255)
    with pytest.raises(
        ConfigError, match="bad.yaml, command-line override .model.beta=2.: .model.beta. is 2"
    ):
        load_recipe(path, ["train.epochs=2", "model.beta=2"])
    with pytest.raises(ConfigError, match="not of the form section.key=value"):
        load_recipe(path, ["epochs=2"])
    with pytest.raises(ConfigError, match="unknown section 'trian'"):
        load_recipe(path, ["trian.epochs=2"])


def test_fractions_are_read_as_radii(tmp_path):
    recipe = load_recipe(write(tmp_path, "certify:\n  eps: [36/255, 0.5, 1]\n"))
    assert recipe.certify.eps == pytest.approx([36 / 255, 0.5, 1.0])
