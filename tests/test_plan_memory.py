"""The memory planner (lipnext_scale/memory_plan.py, tools/plan_memory.py) against measurements: the
distributed benchmark's optimizer and weight bytes, the bytes autograd saves and the live bytes of a real
forward/backward on CPU; and the 1B/2B fit claims."""

from __future__ import annotations

import json
import subprocess
import sys
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lipnext_scale import memory_plan as plan_memory
from lipnext_scale.build import manifold_hyper, named_parameters_with_kinds
from lipnext_scale.config import load_recipe
from lipnext_scale.loss import classification_loss
from lipnext_scale.optim.sharded import ShardedManifoldOptimizer
from lipnext_scale.pretrained import build_model
from lipnext_scale.trainer import Trainer
from tests.conftest import QUICKSTART, REPO, load_tool

GIB = 2**30


def _rel(planned: float, measured: float) -> float:
    return abs(planned - measured) / measured


# --- parameters, gradients, optimizer state -------------------------------------------------------------


def test_optimizer_and_weight_bytes_match_the_distributed_benchmark():
    """Two real ranks (torchrun, DeepSpeed engine, sharded optimizer); bf16, so masters are separate."""
    overrides = ["train.precision=bf16", "train.micro_batch_size=4", "model.size=L6W64"]
    measured = load_tool("bench_distributed").launch(2, str(QUICKSTART), overrides, steps=1)
    planned = plan_memory.plan(load_recipe(QUICKSTART, overrides), world_size=2)

    assert measured["dtype"] == "torch.bfloat16" and planned["compute_dtype"] == "bfloat16"
    assert len(planned["optimizer_per_rank"]) == len(measured["optimizer_bytes_per_rank"]) == 2
    for plan_bytes, bench_bytes in zip(planned["optimizer_per_rank"], measured["optimizer_bytes_per_rank"]):
        assert _rel(plan_bytes, bench_bytes) <= 0.05, (planned["optimizer_per_rank"], measured)
    measured_weights = measured["params"] * getattr(torch, measured["dtype"].removeprefix("torch.")).itemsize
    assert _rel(planned["weights"], measured_weights) <= 0.05
    assert planned["params"] == measured["params"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_optimizer_state_and_gradient_buffer_match_a_real_optimizer(precision):
    """One process: the real optimizer's distinct storages (an fp32 weight *is* its master: not counted)."""
    recipe = load_recipe(QUICKSTART, [f"train.precision={precision}"])
    model = build_model(recipe)
    optimizer = ShardedManifoldOptimizer(named_parameters_with_kinds(model), manifold_hyper(recipe), 1.0)
    dtype = plan_memory.planned_dtype(recipe)
    for p in model.parameters():  # the trainer's cast, after the optimizer took its masters
        p.data = p.data.to(dtype)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {
        v.untyped_storage().data_ptr(): v.untyped_storage().nbytes()
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    }
    measured_state = sum(n for ptr, n in storages.items() if ptr not in weights)
    planned = plan_memory.plan(recipe, world_size=1)
    assert _rel(planned["optimizer_per_rank"][0], measured_state) <= 0.05
    # Gradients (ZeRO-2): after a backward, the owned fp32 accumulators and the buckets they came through.
    model(torch.rand(2, 3, recipe.model.image_size, recipe.model.image_size)).float().sum().backward()
    optimizer._finish_reductions()
    accumulators = sum(g.numel() * g.element_size() for g in optimizer._grads.values())
    assert planned["grad_accumulators"] == accumulators
    tail = sum(b.numel * 4 for b in optimizer.buckets if b.kind == "tail")
    largest = max(b.numel for b in optimizer.buckets if b.kind != "tail")
    assert planned["buckets"] == 2 * largest * 4 + tail
    assert planned["weights"] == sum(p.numel() * p.element_size() for p in model.parameters())


# --- activations -------------------------------------------------------------------------------------------


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created by ops inside the mode that are alive at the same time."""

    def __init__(self, exclude: list[torch.Tensor]):
        super().__init__()
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.seen = weakref.WeakKeyDictionary()
        self.live = self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":  # meta tensors hold no memory
                storage = t.untyped_storage()
                if storage.nbytes() and storage not in self.seen and storage.data_ptr() not in self.exclude:
                    self.seen[storage] = True
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._free, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def measure_activations(recipe, micro_batch: int) -> dict:
    """A training micro-step as the trainer does it: real model, real gradient hooks, EMMA loss."""
    torch.manual_seed(0)
    model = build_model(recipe)
    # Each gradient leaves param.grad at once, as the sharded optimizer's hooks make it (its buckets and
    # owned accumulators are planned apart: not counted here).
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    dtype = plan_memory.planned_dtype(recipe)
    for p in model.parameters():
        p.data = p.data.to(dtype)
    params = list(model.parameters())
    weights = {p.untyped_storage().data_ptr() for p in params}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    size, classes = recipe.model.image_size, recipe.model.num_classes
    meter = LiveBytes(params)
    with meter:
        images = torch.rand(micro_batch, 3, size, size)
        labels = torch.randint(0, classes, (micro_batch,))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = model(images)
            head = model.head.normalized_weight().float()
            loss = classification_loss("emma", logits, labels, head, 0.1)
        loss.backward()
    return {"kept": sum(saved.values()), "peak": meter.peak}


@pytest.mark.parametrize(
    "size,micro,precision",
    [("L6W64", 4, "fp32"), ("L8W128", 8, "bf16"), ("L6W64", 16, "bf16")],
)
@pytest.mark.parametrize("checkpointing", [0, 1, 2])
def test_activation_formula_matches_what_autograd_saves(size, micro, precision, checkpointing):
    overrides = [f"model.size={size}", f"train.precision={precision}"]
    recipe = load_recipe(QUICKSTART, [*overrides, f"model.activation_checkpointing={checkpointing}"])
    measured = measure_activations(recipe, micro)
    b = plan_memory.dtype_bytes(plan_memory.planned_dtype(recipe))
    planned = plan_memory.activation_plan(recipe.model, "emma", micro, b, checkpointing)
    grads = plan_memory.parameter_plan(recipe, 1, plan_memory.planned_dtype(recipe))["transient_grads"]
    assert _rel(planned["kept"], measured["kept"]) <= 0.10, (planned, measured)
    # The peak (kept + input + backward working set + recomputed block + transient gradients) may over- but
    # never under-state; so may its backward part alone (the plan adds all of one block's W² gradients).
    peak = planned["peak"] + grads
    assert measured["peak"] <= peak <= 1.15 * measured["peak"], (planned, grads, measured)
    excess = (peak - planned["kept"]) / (measured["peak"] - measured["kept"])
    assert 1.0 <= excess <= 1.35, (planned, grads, measured)


@pytest.mark.parametrize("size,precision", [("L8W128", "fp32"), ("L32W128", "bf16")])
@pytest.mark.parametrize("checkpointing", [0, 1, 2])
def test_unfused_block_formula_matches_what_autograd_saves(size, precision, checkpointing):
    """One image of 8·8 tokens, fewer than the width 128: the blocks apply M·Rᵀ as two token matmuls and
    save one more N·W (no W² product). The kept bytes are checked as tightly as the fused form's; for the
    peak, the W² gradient transients the plan adds are not attained in this regime (measured: the peak is
    within 1% of the plan without them), so the bound is checked on either side of them."""
    overrides = [f"model.size={size}", f"train.precision={precision}"]
    recipe = load_recipe(QUICKSTART, [*overrides, f"model.activation_checkpointing={checkpointing}"])
    measured = measure_activations(recipe, 1)
    b = plan_memory.dtype_bytes(plan_memory.planned_dtype(recipe))
    planned = plan_memory.activation_plan(recipe.model, "emma", 1, b, checkpointing)
    grads = plan_memory.parameter_plan(recipe, 1, plan_memory.planned_dtype(recipe))["transient_grads"]
    assert not planned["fused"]
    assert _rel(planned["kept"], measured["kept"]) <= 0.01, (planned, measured)
    assert measured["peak"] <= planned["peak"] <= 1.02 * measured["peak"], (planned, measured)
    assert planned["peak"] + grads <= 1.4 * measured["peak"], (planned, grads, measured)


@pytest.mark.parametrize(
    "size,beta,micro,chunk",
    [("L6W64", 0.0, 64, 1), ("L6W64", 0.25, 64, 3), ("L8W128", 0.5, 64, 2), ("L6W64", 0.5, 32, 2)],
)
def test_evaluation_formula_matches_a_real_certification_pass(size, beta, micro, chunk):
    """What the trainer's evaluate() allocates (`Trainer.certified_counts`, fp32 mode): the masters streamed
    block by block (with one rank, the masters themselves), a chunk of batches made as a loader makes them,
    passed through each block in turn; pending gradients stay. No fp32 copy of the model is made."""
    overrides = [f"model.size={size}", f"model.beta={beta}", "certify.batch_size=24"]
    recipe = load_recipe(QUICKSTART, [*overrides, f"train.micro_batch_size={micro}"])
    model = build_model(recipe)
    optimizer = ShardedManifoldOptimizer(named_parameters_with_kinds(model), manifold_hyper(recipe), 1.0)
    size_px, batch = recipe.model.image_size, recipe.certify.batch_size
    accumulating = recipe.data.batch_size > micro
    if accumulating:  # an epoch ended after the first of two micro-batches: gradients are pending
        model(torch.rand(2, 3, size_px, size_px)).sum().backward()
        optimizer._finish_reductions()
    pending = {k: v.clone() for k, v in optimizer._grads.items()}

    class Loader:  # each batch made when asked for, as a loader does
        def __len__(self):
            return chunk

        def __iter__(self):
            for _ in range(chunk):
                labels = torch.randint(0, recipe.model.num_classes, (batch,))
                yield torch.rand(batch, 3, size_px, size_px), labels

    meter = LiveBytes([*model.parameters(), *optimizer._grads.values()])
    with meter:
        counts, _ = Trainer.certified_counts(recipe, optimizer, Loader(), chunk)
    assert int(counts[-1]) == chunk * batch
    assert pending.keys() == optimizer._grads.keys()
    assert all(torch.equal(v, optimizer._grads[k]) for k, v in pending.items())
    params = plan_memory.parameter_plan(recipe, 1, torch.float32)
    planned = plan_memory.evaluation_plan(recipe.model, batch, params, chunk_batches=chunk)
    assert planned["batch"] == batch and planned["fp32_copy"] == 0
    assert measured_between(meter.peak, planned["extra"], 1.0, 1.05), (planned, meter.peak)


def measured_between(measured: int, planned: int, lo: float, hi: float) -> bool:
    """The plan never understates, and overstates by at most `hi`."""
    return lo * measured <= planned <= hi * measured


def test_checkpointing_shrinks_kept_activations_to_block_inputs():
    recipe = load_recipe(QUICKSTART, ["model.size=L8W128"])
    full, every = (plan_memory.activation_plan(recipe.model, "emma", 32, 2, k) for k in (0, 1))
    tokens = (recipe.model.image_size // recipe.model.patch) ** 2
    assert full["blocks_kept"] == 8 * full["per_block"]
    assert every["blocks_kept"] == 8 * 32 * tokens * 128 * 2  # one bf16 block input per block


# --- the recipes' claims -----------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe_name,gpus,nodes", [("in1k_1b.yaml", 8, 1), ("in1k_2b.yaml", 8, 2)])
def test_billion_parameter_recipes_fit_80gb_gpus(recipe_name, gpus, nodes):
    out = subprocess.run(
        [sys.executable, str(REPO / "tools" / "plan_memory.py"), str(REPO / "recipes" / recipe_name),
         "--gpus", str(gpus), "--nodes", str(nodes), "--gpu-memory-gib", "80", "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    p = json.loads(out.stdout)
    assert p["world_size"] == gpus * nodes and p["compute_dtype"] == "bfloat16"
    assert p["micro_batch"] == 1024 // (gpus * nodes) and p["micro_batch_valid"]
    # "fits" is the planner's own verdict. Checked here without the planner: the part of the peak that is
    # certain, counted from the model itself: bf16 weights, the full fp32 gradient buffer, the largest rank's
    # share of 16 B per matrix entry (fp32 master, two Adam moments, Lookahead slow copy) and one bf16 block
    # input per block (what full activation checkpointing keeps; less checkpointing keeps more). The plan must
    # count at least that and, with it, stay under 90% of 80 GiB. (Whether a real step stays under the plan
    # is for the fake-tensor dry run and, on a GPU, tools/gpu_checks.py.)
    recipe = load_recipe(REPO / "recipes" / recipe_name)
    with torch.device("meta"):
        model = build_model(recipe)
    params = sum(t.numel() for t in model.parameters())
    matrices = sum(t.numel() for _, t in model.orthogonal_parameters())
    m = recipe.model
    tokens = (m.image_size // m.patch) ** 2
    width = model.blocks[0].R.shape[0]
    certain = {
        "weights": 2 * params,
        "grad_buffer": 4 * params,
        "optimizer": 16 * matrices / p["world_size"],
        "block_inputs": len(model.blocks) * p["micro_batch"] * tokens * width * 2,
    }
    assert p["params"] == params
    assert sum(certain.values()) <= p["peak"] <= 0.9 * 80 * GIB, (certain, p["peak"])
    assert p["fits"]
    # Sharding by whole matrices: each rank holds at most 1/N of the state plus one matrix's state.
    assert max(p["optimizer_per_rank"]) <= p["optimizer_unsharded"] / p["world_size"] + p["largest_state"]
    assert max(p["optimizer_per_rank"]) < 3 * GIB
    # Gradients are sharded too (ZeRO-2): each rank keeps fp32 gradients of what it owns, plus two buckets.
    assert p["grad_accumulators"] <= 4 * (p["params"] / p["world_size"] + p["largest_matrix"])
    assert p["grad_buffer"] == p["grad_accumulators"] + p["buckets"] < 4 * p["params"]
    assert 1.0e9 < p["params"] < 1.2e9 if "1b" in recipe_name else 2.0e9 < p["params"] < 2.2e9
