"""Shared fixtures: one short real quickstart training run per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from lipnext_scale.config import load_recipe
from lipnext_scale.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "recipes" / "quickstart.yaml"


@pytest.fixture(scope="session")
def trained_quickstart(tmp_path_factory) -> Path:
    """A run directory of the quickstart recipe trained briefly (about 30 s): model.safetensors, eval.json,
    metrics.jsonl, and the digits shards under data/ (test manifest: data/digits-test.manifest.json)."""
    run_dir = tmp_path_factory.mktemp("quickstart")
    recipe = load_recipe(QUICKSTART, [f"run.output_dir={run_dir}", "train.epochs=12", "train.log_every=5"])
    trainer = Trainer(recipe)
    try:
        trainer.save(trainer.fit())
    finally:
        trainer.close()
    return run_dir
