"""Per-rank memory of a recipe under the sharded manifold optimizer; the largest micro-batch that fits.

Used before a run by tools/plan_memory.py, and by the trainer, which logs its measured peak beside the plan.
Nothing is allocated: the model is built on the meta device, and the optimizer state is whatever the real
`ManifoldOptimizer._initial_state` creates for each parameter (on meta tensors), owned by the rank that the
real `plan_buckets` picks over world = N·K; the gradient terms are the real buckets' sizes. Compute dtype is
what `train.precision` resolves to on a GPU (auto → bf16), unless the caller names one.

Per rank (b = bytes of the compute dtype, P = parameters):

- weights: P·b on every rank;
- gradients (ZeRO-2, `optim/sharded.py`): the fp32 accumulators of the parameters this rank owns (largest
  rank: ≈ 4·P/N), plus the send buffers of two buckets in flight during backward and the tail's, fp32 (a
  scatter bucket holds N equally sized matrices, so this term is 2·N·W²·4 until N exceeds the matrix count
  or a bucket `BUCKET_BYTES`); at the activation peak (the start of backward) only one large bucket is
  being filled: the second appears after the blocks of the first have freed their activations
  (`backward_gradients`);
- transient compute-dtype gradients: autograd writes each parameter's gradient, a hook moves it into the
  fp32 buffer at once; at most dP (P = M·Rᵀ), dM and dR of one block are alive together: 3·W²·b;
- optimizer state of the owned parameters: fp32 master (only when b < 4 — an fp32 weight is its own
  master), Adam moments, Lookahead slow copy (+ the skew step sum of square orthogonal matrices);
- activations of one micro-batch, analytically (B images of S², patch p, T = (S/p)² tokens, N = B·T,
  width W, depth L, C classes). One block Z = β-Abs(F.linear(Shift((X + pos)·Rᵀ), M·Rᵀ, bias)) makes
  autograd save, besides parameters (no extra memory):
      X + pos          N·W·b   (for dR of the first matmul)
      Shift output     N·W·b   (for d(M·Rᵀ) of the linear)
      M·Rᵀ             W²·b    (for d(input) of the linear; fused form only, N ≥ W)
      Shift output·R   N·W·b   (for dM of the second token matmul; unfused form only, N < W)
      signs            N·βW    (int8, what β-Abs's gradient needs)
  (the add and the shift save nothing; `layers.fuse_second_mix` picks the form), so
  S_block = 2·N·W·b + W²·b + N·round(βW) fused, 3·N·W·b + N·round(βW) unfused.
  A checkpointed block (`model.activation_checkpointing` = k: blocks i with i % k = 0, each on its own;
  "auto": `resolve_activation_checkpointing`) keeps only
  its input, N·W·b, and is recomputed in backward (+ S_block while its gradient is taken). Besides the
  blocks: stem patches N·3p²·b, pooled block output N·W·b + norms B·W·b, head and loss
  C·W·(b + 4) + 2·C²·4 + 6·B·C·4 + 4·C·4 (EMMA; cross-entropy: C·W·b + 2·B·C·4), the fp32 input images
  B·3·S²·4, and a backward working set of 2.8·N·W·b (gradients of one block's output and intermediates;
  measured 2.1–2.8 on CPU).
      kept after forward  = stem + Σ blocks (S_block, or N·W·b if checkpointed) + pool + head & loss
      activation peak     = input + kept + working set + S_block·[the last block is checkpointed]
  tests/test_plan_memory.py checks `kept` against the bytes autograd saves (saved_tensors_hooks) and the
  peak against the live bytes of a real forward/backward, on CPU;
- optimizer step (activations freed; the owned fp32 gradient accumulators alive): every owned matrix's
  update keeps, across the step's one host read, its skew step A (fp32) and A² (float64) — both doubled at
  a Lookahead sync — and a float64 defect XᵀX − I per matrix re-orthogonalised (orthogonal W×W at the worst
  step, which syncs and re-orthogonalises: 2·W²·4 + 2·W²·8 + W²·8; a Stiefel n×k matrix Y and YᵀY − I in
  float64), summed over the rank's owned matrices; plus one matrix finishing after the read
  (`UPDATE_TEMPORARIES` float64 W×W); the all-gather runs in place into the weights, with no buffer;
- evaluation (training activations freed; fp32 mode, `certify.StreamedCertifier`): no fp32 copy of the
  model. Held throughout: the parameters other than the blocks' R and M, in fp32 (with one rank, the masters
  themselves: nothing), and the float64 class-pair distances C²·8; in turn, two blocks' R and M (the one in
  use, the next arriving) and the block's P̂ = fl(M·Rᵀ), 5·W²·4 (one rank: W²·4). A chunk of k batches of
  ``certify.batch_size`` images (N = B·T tokens, n = N·W·4 bytes, I = B·3·S²·4) goes through each block in
  turn, so besides the k − 1 other batches' activations ((k − 1)·n) the largest of: the stem of the last
  batch (its images dropped once centred: the centred images and their patch copy, 2·I, and its output n),
  one batch through a block ((3 + [βW ≥ 1])·n alive at once, measured on the certification forward,
  tests/test_plan_memory.py), the float64 bound of P̂ beside all k batches (9·W²·8 with three squarings), or
  the head (every batch's logits, one batch's normalised rows and float64 radii); plus the labels. k is the
  largest (at most `MAX_CHUNK_BATCHES`) that keeps evaluation within `EVALUATION_SHARE` of what the training
  phases hold above weights and optimizer state (at least 1): evaluation fills headroom the training peak
  already has, and a chunk re-fetches every block matrix (k large = few chunks = little communication).
  Sound mode (`certify.mode: sound`) still gathers the fp32 masters on every rank, 4·P, plus one batch as
  before (its float64 forward is not modelled);
Peak = weights + optimizer state
       + max(backward gradients + activation peak + transient gradients,   (backward)
             owned gradient accumulators + optimizer step,        (step; the buckets are gone)
             evaluation)                                          (no gradients alive; k = 1 here,
                                                                  the chunk grows into the headroom).
Beside it, the start-up peak: fp32 weights + optimizer state without the owned masters (built from the fp32
weights, they are those weights until the cast) + one largest matrix in the compute dtype while the cast
runs.

`lipnext_scale/dryrun.py` (tools/plan_memory.py --dry-run) runs one real step of a recipe at its real shape
and world size with fake tensors and reports torch's MemTracker peak of each phase beside these figures.
A reserve (default 10% of the GPU) is kept for the CUDA context, cuBLAS/NCCL workspaces, DALI's decoder
buffers and allocator fragmentation, none of which is modelled.
"""

from __future__ import annotations

import torch

from lipnext_scale.build import manifold_hyper, named_parameters_with_kinds, resolve_precision
from lipnext_scale.config import ModelConfig, Recipe
from lipnext_scale.model.layers import fuse_second_mix
from lipnext_scale.model.lipnext import SIZES
from lipnext_scale.optim.manifold import ManifoldOptimizer
from lipnext_scale.optim.sharded import owners_of, plan_buckets
from lipnext_scale.pretrained import build_model

GIB = 2**30
BACKWARD_WORKING_SET = 2.8  # × N·W·b
# float64 W×W matrices alive while one matrix finishes its update after the host read (besides what it
# held across the read): Newton–Schulz of the slow weights (their float64 copy, the iterate, X·D and X·D/2,
# a new defect) or the retraction (X and A in float64, A/2^s, A²/4^s, the series' block and accumulator,
# one product) — 6 measured by the dry run (FakeTensorMode, in1k_1b); the SVD fallback of the polar factor
# (X, U, Vᵀ, U·Vᵀ + the solver's workspace, which no tensor shows) is covered by the margin (an estimate).
UPDATE_TEMPORARIES = 8
CHECKPOINT_OPTIONS = (0, 1, 2, 4)
# The streamed evaluation's largest chunk (batches): past it a chunk's block fetches and re-bounds (~8·W³
# FLOPs a block) are a negligible share of its forward (4·N·W² a batch, N = batch·tokens ≫ W), so more
# memory would buy nothing.
MAX_CHUNK_BATCHES = 64
# The share of the training phases' bytes above weights and optimizer state that the streamed evaluation's
# chunk may fill. Below 1 so that evaluation does not set the run's peak: the plan of the backward is an upper
# bound (its working set is the top of the measured range), about 5% above what the dry run measures.
EVALUATION_SHARE = 0.9


def planned_dtype(recipe: Recipe) -> torch.dtype:
    """The compute dtype on a GPU (what the trainer casts the model to there)."""
    return resolve_precision(recipe.train.precision, torch.device("cuda"))


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def recipe_micro_batch(recipe: Recipe, world_size: int) -> int:
    """The per-rank micro-batch the trainer uses."""
    return recipe.train.micro_batch_size or max(1, recipe.data.batch_size // world_size)


def optimizer_state_bytes(recipe: Recipe, dtype: torch.dtype) -> dict[str, dict[str, int]]:
    """{parameter name: {state key: bytes}} as the real optimizer creates it, on meta tensors.

    The optimizer is built from fp32 weights (as in the trainer, before the cast), so the master aliases the
    weight; it costs memory of its own only when the compute dtype is not fp32.
    """
    with torch.device("meta"):
        model = build_model(recipe)
    named = named_parameters_with_kinds(model)
    optimizer = ManifoldOptimizer(named, manifold_hyper(recipe))
    out = {}
    for state in optimizer.state.values():
        out[state["name"]] = {
            key: value.numel() * value.element_size()
            for key, value in state.items()
            if isinstance(value, torch.Tensor) and not (key == "master" and dtype == torch.float32)
        }
    return out


def parameter_plan(recipe: Recipe, world_size: int, dtype: torch.dtype) -> dict:
    """Everything that scales with the parameters: weights, gradient buffer, sharded optimizer state."""
    with torch.device("meta"):
        model = build_model(recipe)
    named = [(n, p.numel()) for n, p in model.named_parameters()]
    sizes = dict(named)
    hyper = manifold_hyper(recipe)
    held = {
        n: held_across_host_read(kind, tuple(p.shape), hyper)
        for n, p, kind in named_parameters_with_kinds(model)
    }
    buckets = plan_buckets(named, world_size)
    owners = owners_of(buckets)
    state = optimizer_state_bytes(recipe, dtype)
    b = dtype_bytes(dtype)
    keys = sorted({k for s in state.values() for k in s})
    per_rank = [dict.fromkeys(keys, 0) for _ in range(world_size)]
    for name, parts in state.items():
        for key, nbytes in parts.items():
            per_rank[owners[name]][key] += nbytes
    totals = [sum(r.values()) for r in per_rank]
    grads = [0] * world_size
    update_held = [0] * world_size
    for name, size in named:
        grads[owners[name]] += size * 4
        update_held[owners[name]] += held[name]
    # Send buffers alive at once (fp32): the one in flight and the one being filled (ShardedManifoldOptimizer,
    # max_buckets_in_flight = 2), and the tail's, filled from the first gradients of backward to its last.
    tail = sum(bk.numel * 4 for bk in buckets if bk.kind == "tail")
    largest = max((bk for bk in buckets if bk.kind != "tail"), key=lambda bk: bk.numel, default=None)
    bucket = largest.numel * 4 if largest else 0
    buckets_in_flight = 2 * bucket + tail
    heaviest = max(range(world_size), key=lambda r: totals[r])
    matrix = max(sizes.values())
    return {
        "params": sum(sizes.values()),
        "largest_matrix": matrix,
        "weights": sum(sizes.values()) * b,
        "grad_accumulators": max(grads),
        "buckets": buckets_in_flight,
        "bucket": bucket,
        "bucket_members": len(largest.names) if largest else 0,
        "reduce_bucket": max((bk.numel * 4 for bk in buckets if bk.kind == "reduce"), default=0),
        "tail_bucket": tail,
        # Gradient memory of the largest rank during backward: what the full-size buffer of ZeRO-1 was.
        "grad_buffer": max(grads) + buckets_in_flight,
        "padding": sum(bk.padding for bk in buckets),
        "transient_grads": 3 * matrix * b,
        "optimizer_per_rank": totals,
        "update_held_per_rank": update_held,
        "optimizer_by_key_largest_rank": per_rank[heaviest],
        "optimizer_unsharded": sum(totals),
        "largest_state": max(sum(parts.values()) for parts in state.values()),
    }


def activation_plan(model: ModelConfig, loss: str, micro_batch: int, b: int, checkpointing: int) -> dict:
    """Activation bytes of one micro-batch (formulas in the module docstring); `checkpointing` = k."""
    depth, width = SIZES[model.size]
    tokens = (model.image_size // model.patch) ** 2
    n = micro_batch * tokens
    nw = n * width * b
    fused = fuse_second_mix(n, width)
    saved = 2 * nw + width * width * b if fused else 3 * nw
    block = saved + n * round(model.beta * width)  # + β-Abs's int8 signs
    checkpointed = sum(1 for i in range(depth) if checkpointing and i % checkpointing == 0)
    blocks_kept = checkpointed * nw + (depth - checkpointed) * block
    stem = n * 3 * model.patch**2 * b
    pool = nw + micro_batch * width * b
    c = model.num_classes
    if loss == "emma":
        head_loss = c * width * (b + 4) + 2 * c * c * 4 + 6 * micro_batch * c * 4 + 4 * c * 4
    else:
        head_loss = c * width * b + 2 * micro_batch * c * 4
    kept = stem + blocks_kept + pool + head_loss
    images = micro_batch * 3 * model.image_size**2 * 4
    working = int(BACKWARD_WORKING_SET * nw)
    recompute = block if checkpointing and (depth - 1) % checkpointing == 0 else 0
    return {
        "micro_batch": micro_batch,
        "activation_checkpointing": checkpointing,
        "block_kept_min": nw if checkpointed else block,
        "fused": fused,
        "per_block": block,
        "blocks_kept": blocks_kept,
        "kept": kept,
        "images": images,
        "working": working,
        "recompute": recompute,
        "peak": images + kept + working + recompute,
    }


def held_across_host_read(kind: str, shape: tuple[int, ...], hyper) -> int:
    """Bytes one owned parameter's update keeps from its first phase to its second, across the step's one
    host read (`ManifoldOptimizer.update_parameters`: every owned matrix's first phase runs before the read,
    and the closures keep what they captured until the last matrix has finished), at the worst step: one
    that syncs Lookahead and re-orthogonalises (when the recipe does either)."""
    sync, reorth = bool(hyper.lookahead_k), bool(hyper.reorthogonalize_every)
    if kind == "orthogonal":  # W×W
        w2 = shape[0] * shape[1]
        e = dtype_bytes(hyper.exp_dtype)
        factors = 1 + sync  # the skew step A (fp32), and at a sync α·Σ A (fp32)
        held = factors * w2 * 4 + factors * w2 * e  # + A² of each, in the retraction's dtype
        # + a float64 defect XᵀX − I of the one matrix re-orthogonalised: the slow weights at a Lookahead
        # sync, the master without Lookahead. (A re-orthogonalisation between syncs holds two, the master's
        # and the slow weights', but one factor: 1·(4 + e) + 2·8 ≤ 2·(4 + e) + 8 for e ≥ 4.)
        return held + (w2 * 8 if reorth else 0)
    if kind == "stiefel":  # n×k: Y = X + D and YᵀY − I, float64
        n, k = shape[0], shape[-1]
        return n * k * 8 + k * k * 8
    return 0  # euclidean: updated in place in the first phase, nothing kept


def step_transient(params: dict, world_size: int, b: int) -> int:
    """Bytes the optimizer step adds to weights, optimizer state and the owned gradient accumulators: what
    every owned matrix holds across the host read (`held_across_host_read`, the largest rank's) plus the
    second phase of one matrix. The reduced gradients are the accumulators (counted beside this); the
    all-gather is in place."""
    return max(params["update_held_per_rank"]) + UPDATE_TEMPORARIES * params["largest_matrix"] * 8


def evaluation_plan(
    model: ModelConfig,
    batch: int,
    params: dict,
    mode: str = "fp32",
    budget: int | None = None,
    chunk_batches: int | None = None,
) -> dict:
    """Bytes an evaluation adds on top of weights and optimizer state, and the chunk of batches it runs.

    fp32 mode (`certify.StreamedCertifier`): `chunk_batches`, or the largest chunk of at most
    `MAX_CHUNK_BATCHES` batches whose bytes stay within `budget` (at least one batch; with no budget, one).
    Sound mode gathers every fp32 master on every rank and runs one batch at a time."""
    depth, width = SIZES[model.size]
    n = batch * (model.image_size // model.patch) ** 2
    nw = n * width * 4  # one batch's activation between blocks, fp32
    alive = 3 + (round(model.beta * width) > 0)  # measured on the certification forward (_block_forward)
    c = model.num_classes
    images = batch * 3 * model.image_size**2 * 4
    stem = 2 * images + nw  # centred images, their patch copy, the embedding
    # operator_norm_bound: X and XᵀX − I in float64, then two W×W float64 per squaring level, plus one
    # elementwise temporary (lipnext_scale.rounding.DEFECT_SQUARINGS = 3).
    bound = (3 + 2 * 3) * params["largest_matrix"] * 8
    if mode != "fp32":
        # The gathered fp32 masters, every block's M·Rᵀ counted as in fp32 mode (not formed by the sound
        # certifier, which re-forms P per batch in float64: its float64 forward is not measured here).
        fp32_copy = (params["params"] + params["padding"]) * 4
        products = depth * width * width * 4
        head = c * c * 8 + 2 * batch * c * 4
        forward = images + max(stem, alive * nw) + head
        extra = fp32_copy + products + max(forward, bound)
        return {"batch": batch, "chunk_batches": 1, "fp32_copy": fp32_copy, "streamed": 0, "resident": 0,
                "forward": forward, "bound": bound, "extra": extra}  # fmt: skip
    # Held throughout: every parameter but the blocks' R and M (fp32), and the float64 class-pair distances;
    # streamed: two blocks' R and M (the one in use, the next arriving) and the block's P̂ = fl(M·Rᵀ). With
    # one rank every weight is fetched as the master itself: only the distances and P̂ are new.
    alone = len(params["optimizer_per_rank"]) == 1
    resident = (0 if alone else (params["params"] - 2 * depth * width * width) * 4) + c * c * 8
    streamed = (1 if alone else 5) * width * width * 4

    def extra(k: int) -> int:
        chunk = max(
            (k - 1) * nw + stem,  # embedding the chunk's last batch (its images dropped once centred)
            streamed + (k - 1) * nw + alive * nw,  # one batch through a block, the others waiting
            streamed + k * nw + bound,  # bounding P̂ with the chunk's activations held
            # the head: every batch's logits, one batch's normalised head rows and its radii in float64
            k * nw + k * batch * c * 4 + c * width * 4 + 2 * batch * c * 8,
        )
        return resident + chunk + k * batch * 8 + 256  # + the chunk's labels (int64) and the counts

    k = chunk_batches or 1
    while chunk_batches is None and budget is not None and k < MAX_CHUNK_BATCHES and extra(k + 1) <= budget:
        k += 1
    return {
        "batch": batch,
        "chunk_batches": k,
        "fp32_copy": 0,
        "streamed": streamed,
        "resident": resident,
        "forward": extra(k) - resident,
        "bound": bound,
        "extra": extra(k),
    }


def recomputed_blocks(depth: int, checkpointing: int) -> int:
    """Blocks recomputed in backward with activation checkpointing k (blocks 0, k, 2k, …; 0 = none)."""
    return len(range(0, depth, checkpointing)) if checkpointing else 0


def backward_gradients(params: dict, activations: dict) -> int:
    """fp32 gradient bytes alive at the backward's peak: the owned accumulators (all of them from the second
    micro-batch of a step on), the tail's send buffer and the largest bucket being filled, plus either a
    reduction in flight beside it (at most the largest reduce bucket, e.g. the head's gradient, issued at
    once) or a second large bucket. The second large send buffer appears only once the first is complete,
    i.e. once the backward of the blocks whose matrices fill it (two per block) is done and their saved
    activations are freed — all but the block in progress; the activation peak comes at the start of
    backward, so those bytes are not both alive (ZeRO-2, optim/sharded.py)."""
    done_blocks = max(0, params["bucket_members"] // 2 - 1)
    freed = done_blocks * activations["block_kept_min"]
    second = max(params["reduce_bucket"], params["bucket"] - freed)
    return params["grad_accumulators"] + params["tail_bucket"] + params["bucket"] + second


def peak_bytes(params: dict, activations: dict, step: int) -> int:
    static = params["weights"] + max(params["optimizer_per_rank"])
    backward = backward_gradients(params, activations) + activations["peak"] + params["transient_grads"]
    return static + max(backward, step)


def startup_peak(params: dict, b: int) -> int:
    """Peak while the trainer starts: fp32 weights and the optimizer state, whose owned masters *are* those
    fp32 weights (the optimizer is built before the cast), plus, while the cast runs, one parameter in both
    dtypes (≤ the largest matrix); after the cast, the training static bytes. No gradient memory exists yet
    (the owners' accumulators and the buckets appear in the first backward)."""
    state = max(params["optimizer_per_rank"])
    before_cast = params["params"] * 4 + state
    if b < 4:
        before_cast += params["largest_matrix"] * b - params["optimizer_by_key_largest_rank"].get("master", 0)
    return max(before_cast, params["weights"] + state)


def largest_micro_batch(recipe: Recipe, params: dict, step: int, b: int, ck: int, usable: int, limit=1 << 20):
    """Largest micro-batch whose peak fits `usable` bytes (0 if none)."""

    def fits(micro: int) -> bool:
        act = activation_plan(recipe.model, recipe.train.loss, micro, b, ck)
        return peak_bytes(params, act, step) <= usable

    if not fits(1):
        return 0
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def plan(
    recipe: Recipe,
    world_size: int,
    gpu_memory_gib: float = 80.0,
    reserve: float = 0.10,
    micro_batch: int = 0,
    dtype: torch.dtype | None = None,
) -> dict:
    dtype = dtype or planned_dtype(recipe)
    b = dtype_bytes(dtype)
    params = parameter_plan(recipe, world_size, dtype)
    step = step_transient(params, world_size, b)
    micro = micro_batch or recipe_micro_batch(recipe, world_size)
    # Phases between forward/backward passes: the step (owned gradients still alive), evaluation (none,
    # unless gradient accumulation lets an epoch end between micro-batches of a step: the trainer then
    # evaluates with that step's owned accumulators pending). Evaluation's smallest chunk (one batch) enters
    # the peak; its chunk then grows into what the training phases leave (below).
    accumulation = max(1, recipe.data.batch_size // (micro * world_size))
    pending = params["grad_accumulators"] if accumulation > 1 else 0
    batch, mode = recipe.certify.batch_size, recipe.certify.mode
    smallest = evaluation_plan(recipe.model, batch, params, mode)
    between = max(params["grad_accumulators"] + step, pending + smallest["extra"])
    usable = int(gpu_memory_gib * GIB * (1 - reserve))
    per_rank_batch = recipe.data.batch_size // world_size if recipe.data.batch_size % world_size == 0 else 0
    asked = recipe.model.activation_checkpointing
    options = []
    for ck in sorted({*CHECKPOINT_OPTIONS, *([] if asked == "auto" else [asked])}):
        act = activation_plan(recipe.model, recipe.train.loss, micro, b, ck)
        largest = largest_micro_batch(recipe, params, between, b, ck, usable)
        valid = max((m for m in range(1, largest + 1) if per_rank_batch % m == 0), default=0)
        peak = peak_bytes(params, act, between)
        options.append(
            {
                "activation_checkpointing": ck,
                "recomputed_blocks": recomputed_blocks(SIZES[recipe.model.size][0], ck),
                "activation_peak": act["peak"],
                "peak": peak,
                "fits": peak <= usable,
                "largest_micro_batch": largest,
                "largest_valid_micro_batch": valid,
            }
        )
    if asked == "auto":  # the least recomputation that fits; if none does, the most memory saved
        fitting = [o for o in options if o["fits"]] or [min(options, key=lambda o: o["peak"])]
        chosen = min(fitting, key=lambda o: o["recomputed_blocks"])["activation_checkpointing"]
    else:
        chosen = asked
    act = activation_plan(recipe.model, recipe.train.loss, micro, b, chosen)
    peak = peak_bytes(params, act, between)
    static = params["weights"] + max(params["optimizer_per_rank"])
    budget = int(EVALUATION_SHARE * (peak - static)) - pending
    evaluation = evaluation_plan(recipe.model, batch, params, mode, budget=budget)
    init = startup_peak(params, b)
    return {
        "size": recipe.model.size,
        "compute_dtype": str(dtype).removeprefix("torch."),
        "world_size": world_size,
        "gpu_memory_gib": gpu_memory_gib,
        "reserve": reserve,
        "usable": usable,
        "micro_batch": micro,
        "micro_batch_valid": per_rank_batch > 0 and per_rank_batch % micro == 0,
        "activation_checkpointing": chosen,
        "activation_checkpointing_asked": asked,
        **{k: v for k, v in params.items()},
        "activations": act,
        "backward_grads": backward_gradients(params, act),
        "step_transient": step,
        "evaluation": evaluation,
        "evaluation_pending_grads": pending,
        "init_peak": init,
        "peak": peak,
        "fits": peak <= usable,
        "options": options,
    }


def resolve_activation_checkpointing(
    recipe: Recipe,
    world_size: int,
    gpu_memory_gib: float = 80.0,
    micro_batch: int = 0,
    dtype: torch.dtype | None = None,
) -> int:
    """`model.activation_checkpointing` as an interval k: the recipe's number, or for "auto" the option
    (0, 4, 2, 1) that recomputes the fewest blocks while the planned peak fits `gpu_memory_gib`."""
    asked = recipe.model.activation_checkpointing
    if asked != "auto":
        return asked
    return plan(recipe, world_size, gpu_memory_gib, micro_batch=micro_batch, dtype=dtype)[
        "activation_checkpointing"
    ]
