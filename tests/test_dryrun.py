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
from lipnext_scale.optim.sharded import plan_buckets
from lipnext_scale.pretrained import build_model
from tests.conftest import REPO

TOLERANCE = 0.10  # issue 9: the dry run and the planner agree within 10%

CASES = {
    # 224-pixel images, activation checkpointing and EMMA over 1,000 classes as in the recipe: activations and
    # the images dominate (and the stem's copies of them in evaluation, at this width).
    "in1k_L32W64_2": ("in1k_1b.yaml", ["model.size=L32W64"], 2),
    "in1k_L32W64_8": ("in1k_1b.yaml", ["model.size=L32W64"], 8),
    # Tiny micro-batches: weights, gradients and optimizer state dominate; gradient accumulation, so the
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


def zero2_gradient_bytes(
    named_sizes: list[tuple[str, int]], world_size: int, rank: int, micro_batches: int
) -> dict[str, int]:
    """Gradient bytes `rank` holds after `micro_batches` backwards under ShardedManifoldOptimizer, counted
    from its buckets: each owned accumulator is a view of its bucket's fp32 receive buffer, which it keeps
    alive whole (a scatter or tail segment; a reduce bucket's gradient itself), and the last bucket's
    reduction is still in flight (send buffer + receive buffer), landed only by the step or by the next
    micro-batch's first reduction."""
    buckets = plan_buckets(named_sizes, world_size)
    last = buckets[-1]
    landed = buckets if micro_batches > 1 else buckets[:-1]
    owned = sum(b.segment * 4 for b in landed if rank in b.owners)
    in_flight = last.numel * 4 + (0 if last.kind == "reduce" else last.segment * 4)
    return {"accumulators": owned, "in_flight": in_flight, "gathered": sum(b.numel for b in buckets) * 4}


def test_dry_run_measures_the_real_step_not_the_plan(case):
    """Byte counts the dry run can only get from the real objects: the bf16 weights are P·2 exactly, the
    optimizer state is the simulated rank's, the ZeRO-2 gradient memory is the rank's buckets', every
    category of the step is seen."""
    recipe, r = case
    with torch.device("meta"):
        named = [(n, p.numel()) for n, p in build_model(recipe).named_parameters()]
    params = sum(s for _, s in named)
    grads = zero2_gradient_bytes(named, r.world_size, r.rank, 2 if r.accumulation > 1 else 1)
    phases = {p.name: p for p in r.phases}
    step_start = phases["micro-batch"].at_start
    assert r.compute_dtype == "bfloat16" and r.params == params
    assert step_start["Parameter"] == params * 2  # cast as the trainer casts: bf16 weights, every rank
    # ZeRO-2: no gradient memory before the first backward; after the phase's one or two (with accumulation)
    # backwards, the owned fp32 accumulators (about 4·P/N, not the full-size 4·P buffer of ZeRO-1) and the
    # one reduction still in flight.
    assert step_start.get("Gradient", 0) == 0
    after_backward = phases["micro-batch"].at_end
    assert after_backward["Gradient"] == grads["accumulators"] + grads["in_flight"]
    assert grads["accumulators"] < params * 4
    assert after_backward.get("Other", 0) == 0  # every gradient tensor was filed as a gradient
    per_rank = r.plan["optimizer_per_rank"]
    assert r.rank == per_rank.index(max(per_rank))  # the largest-loaded rank is the one simulated
    assert step_start["Optstate"] == per_rank[r.rank] > 0
    assert phases["micro-batch"].at_peak["Activation"] > 0
    assert phases["optimizer step"].at_peak["Optstate"] > step_start["Optstate"]  # the step's temporaries
    assert phases["optimizer step"].host_reads >= 1  # the global norm is read on the host once per step
    # The step frees every gradient (ZeRO-2), whatever ran before it.
    assert phases["optimizer step"].at_end.get("Gradient", 0) == 0
    # Evaluation certifies with the fp32 masters streamed block by block from their owners (fp32 mode): on top
    # of its chunk's activations (as planned) and the head's class-pair distances, its peak holds the small
    # parameters and two blocks' matrices — under half the fp32 model, where gathering it held all of it and
    # every block's M·Rᵀ besides. What it fetched is freed when it ends.
    evaluation = phases["evaluation"]
    planned_eval = r.plan["evaluation"]
    assert planned_eval["fp32_copy"] == 0 and planned_eval["chunk_batches"] >= 1
    held = evaluation.peak - evaluation.at_start["Total"]
    activations = planned_eval["extra"] - planned_eval["resident"] - planned_eval["streamed"]
    distances = recipe.model.num_classes**2 * 8
    assert held - activations - distances < grads["gathered"] / 2, (held, activations, grads["gathered"])
    assert evaluation.at_end["Parameter"] == params * 2
    if r.accumulation == 1:  # after the step: no gradients
        assert evaluation.at_start.get("Gradient", 0) == 0
    else:  # a step's gradients pending (the dry run evaluates before the step then): they stay alive
        assert evaluation.at_start["Gradient"] == evaluation.at_end["Gradient"] == after_backward["Gradient"]

    # Phases do not leak: what a phase leaves is what it started from (give or take a few scalars made
    # earlier, e.g. the optimizer's device-side counters, which MemTracker sees when a phase uses them),
    # besides the gradients that backward leaves for the step (checked above).
    def kept(snapshot: dict) -> int:
        return snapshot["Total"] - snapshot.get("Gradient", 0)

    for p in r.phases[1:]:
        assert kept(p.at_end) <= kept(p.at_start) + 1024, p


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
