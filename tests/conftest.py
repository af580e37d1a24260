"""Shared fixtures: one short real quickstart training run per test session."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from lipnext_scale.config import load_recipe
from lipnext_scale.data import make_digits_shards
from lipnext_scale.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
TOOLS = REPO / "tools"


def load_tool(name: str):
    """tools/<name>.py as a module, for tests of a command line itself (arguments, exit codes, messages);
    logic is tested through the package. Loaded once and registered under its name, because dataclasses
    and pickling look a module up in sys.modules."""
    path = TOOLS / f"{name}.py"
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__file__", None) == str(path):
        return loaded
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def single_torch_thread():
    """One intra-op thread for modules of tiny tensor ops: on the 2-core CI machine torch's 2-thread pool
    costs ~8 ms per tiny op (a 64x3x32x32 .min(): 8 ms vs 0.05 ms with one thread)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """The quickstart's digits shards, written once per session, where `trained_quickstart` finds them."""
    root = tmp_path_factory.mktemp("quickstart") / "data"
    make_digits_shards(root, image_size=32)
    return root


# torch's intra-op thread count as a plain `python lipnext_scale/train.py` gets it (fixtures change it).
DEFAULT_TORCH_THREADS = torch.get_num_threads()
# What `trained_quickstart` trains: the quickstart recipe, shortened. README.md's "test-figures" block holds
# its figures (tests/test_readme.py) and names the same command line.
TEST_QUICKSTART_OVERRIDES = ("train.epochs=12", "train.log_every=5")


@pytest.fixture(scope="session")
def trained_quickstart(tmp_path_factory, digits_root) -> Path:
    """A run directory of the quickstart recipe trained briefly (about 30 s): model.safetensors, eval.json,
    metrics.jsonl, console.log, and the digits shards under data/ (`digits_root`). Trained with torch's
    default thread count, whichever test asks first, so that its figures equal the command line's."""
    run_dir = digits_root.parent
    recipe = load_recipe(QUICKSTART, [f"run.output_dir={run_dir}", *TEST_QUICKSTART_OVERRIDES])
    previous = torch.get_num_threads()
    torch.set_num_threads(DEFAULT_TORCH_THREADS)
    trainer = Trainer(recipe)
    try:
        trainer.save(trainer.fit())
    finally:
        trainer.close()
        torch.set_num_threads(previous)
    return run_dir
