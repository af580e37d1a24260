"""The full-scale dry run (lipnext_scale/dryrun.py, tools/plan_memory.py --dry-run) at small widths: one real
training step faked at world sizes 2 and 8; torch's MemTracker peaks beside the planner's figures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from lipnext_scale.config import load_recipe
from lipnext_scale.dryrun import HostReads, dry_run
from lipnext_scale.pretrained import build_model
from tests.conftest import REPO

TOLERANCE = 0.10  # issue 9: the dry run and the planner agree within 10%

CASES = {
    # 224-pixel images, activation checkpointing and EMMA over 1,000 classes as in the recipe: activations and
    # the images dominate (and the stem's copies of them in evaluation, at this width).
    "in1k_L32W64_2": ("in1k_1b.yaml", ["model.size=L32W64"], 2),
    "in1k_L32W64_8": ("in1k_1b.yaml", ["model.size=L32W64"], 8),
    # Tiny micro-batches: weights, gradient buffer and optimizer state dominate; gradient accumulation, so the
    # evaluation gathers the masters into a fresh buffer (a step's gradients pending).
    "quick_L32W128_2": (
        "quickstart.yaml",
        ["model.size=L32W128", "train.precision=bf16", "train.micro_batch_size=2", "certify.batch_size=2"],
        2,
    ),
    "quick_L8W128_8": (
        "quickstart.yaml",
        ["model.size=L8W128", "train.precision=bf16", "train.micro_batch_size=2", "certify.batch_size=2"],
        8,
    ),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    name, overrides, world_size = CASES[request.param]
    recipe = load_recipe(REPO / "recipes" / name, overrides)
    return recipe, dry_run(recipe, world_size, name)


def test_dry_run_peaks_agree_with_the_plan(case):
    _, r = case
    phases = {p.name: p for p in r.phases}
    assert list(phases) == ["start-up", "micro-batch", "optimizer step", "evaluation"]
    for name in ("start-up", "micro-batch", "evaluation"):
        assert abs(phases[name].ratio - 1) <= TOLERANCE, (name, phases[name])
    # The planner's estimate of a Riemannian update's temporaries also covers kernel workspaces (matrix_exp,
    # SVD) that no tensor shows, so it may over-state the step; it must not under-state it.
    assert phases["optimizer step"].ratio <= 1 + TOLERANCE, phases["optimizer step"]
    assert abs(r.ratio - 1) <= TOLERANCE, (r.peak, r.plan["peak"])


def test_dry_run_measures_the_real_step_not_the_plan(case):
    """Byte counts the dry run can only get from the real objects: the bf16 weights are P·2 exactly, the
    optimizer state is the simulated rank's, every category of the step is seen."""
    recipe, r = case
    with torch.device("meta"):
        params = sum(p.numel() for p in build_model(recipe).parameters())
    phases = {p.name: p for p in r.phases}
    step_start = phases["micro-batch"].at_start
    assert r.compute_dtype == "bfloat16" and r.params == params
    assert step_start["Parameter"] == params * 2  # cast as the trainer casts: bf16 weights, every rank
    assert step_start["Other"] == r.plan["grad_buffer"] >= params * 4  # the fp32 buffer, full size
    per_rank = r.plan["optimizer_per_rank"]
    assert r.rank == per_rank.index(max(per_rank))  # the largest-loaded rank is the one simulated
    assert step_start["Optstate"] == per_rank[r.rank] > 0
    assert phases["micro-batch"].at_peak["Activation"] > 0
    assert phases["optimizer step"].at_peak["Optstate"] > step_start["Optstate"]  # the step's temporaries
    assert phases["optimizer step"].host_reads >= 1  # the global norm is read on the host once per step
    # Evaluation certifies with the fp32 masters, gathered on every rank as the fp32 model's weights.
    evaluation = phases["evaluation"]
    if r.accumulation == 1:  # into the idle gradient buffer, which MemTracker then sees as parameters
        assert evaluation.at_end["Parameter"] == params * 2 + r.plan["grad_buffer"]
        assert evaluation.at_end.get("Other", 0) == 0
    else:  # a step's gradients pending in the buffer: a fresh one, freed again
        assert evaluation.at_end["Other"] == r.plan["grad_buffer"]
        assert evaluation.peak - evaluation.at_start["Total"] >= r.plan["grad_buffer"]
    # Phases do not leak: what a phase leaves is what the next one starts from (give or take a few scalars
    # made earlier, e.g. the optimizer's device-side counters, which MemTracker sees when a phase uses them).
    for p in r.phases[1:]:
        assert p.at_end["Total"] <= p.at_start["Total"] + 1024, p


def test_host_reads_of_fake_scalars_are_answered_and_counted():
    reads = HostReads()
    with FakeTensorMode(), reads:
        x = torch.ones(3)
        assert x.sum().item() == 0.0
        assert bool(torch.isfinite(x.sum())) is True
        assert int(x.long().sum()) == 0
    assert reads.count == 3


def test_plan_memory_dry_run_flag():
    out = subprocess.run(
        [sys.executable, str(REPO / "tools" / "plan_memory.py"), str(REPO / "recipes" / "quickstart.yaml"),
         "--gpus", "2", "--dry-run", "--json", "model.size=L8W128"],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    p = json.loads(out.stdout)
    d = p["dry_run"]
    assert d["world_size"] == 2 and d["rank"] in (0, 1)
    names = [phase["name"] for phase in d["phases"]]
    assert names == ["start-up", "micro-batch", "optimizer step", "evaluation"]
    assert d["peak"] == max(phase["peak"] for phase in d["phases"][1:])
    assert abs(d["peak"] / p["peak"] - 1) <= TOLERANCE and d["ratio"] == d["peak"] / p["peak"]
