"""One real training step of a recipe at its real shape and world size, on a CPU machine, with fake tensors:
the per-rank memory that torch's own tracker sees, beside the planner's figure (DESIGN.md §7).

The way torchtitan estimates memory (`scripts/estimate/estimation.py` at 238fa99): torch's fake process
group (`init_process_group("fake", store=FakeStore())`, any rank of any world size, collectives that move
nothing), `FakeTensorMode` (tensors with shapes, dtypes and devices but no storage behind them: a 2B-parameter
step runs in seconds on a laptop) and `MemTracker`, a dispatch mode that counts the bytes of every storage an
op creates until it is freed, by category (parameters, gradients, optimizer state, activations, backward
temporaries). What runs is the package's own code, so a change to it changes the figures:

    start-up        the model built on `meta` and materialised on the fake `cpu` device in fp32
                    (`build_model`, `Module.to_empty`), the real `ShardedManifoldOptimizer` of the
                    simulated rank (its fp32 masters alias those weights), then the trainer's cast to the
                    compute dtype
    micro-batch     forward of one micro-batch (activation checkpointing as configured), the real loss,
                    backward (the optimizer's hooks copy each gradient into its bucket's fp32 send buffer
                    and issue the bucket's reduction, asynchronous under the fake group too, when it is
                    complete; owners keep fp32 accumulators); with gradient accumulation, two of them,
                    the second with the accumulators alive as every later micro-batch of a step has
    optimizer step  the real `step()`: reduce-scatter, norm all-reduce, the owned matrices' Riemannian
                    updates, all-gather of the compute-dtype weights; a step that also syncs Lookahead and
                    re-orthogonalises
    evaluation      `Trainer.certified_counts` over one chunk of the planned number of batches of
                    `certify.batch_size` images: in fp32 mode the masters streamed from their owners
                    block by block (`StreamedCertifier`: resident stem, head and small parameters, two
                    blocks' R and M, one P̂ and its float64 bound, the chunk's activations); in sound mode
                    gathered whole into a fresh flat buffer for `Certifier`

What does not run faked, and what is done instead:

- DeepSpeed's engine: its `initialize` and the `deepspeed.comm` layer start a real backend, check devices
  and broadcast real weights, none of which fake tensors and the fake group support. Its forward, backward
  and step call the model, `loss.backward()` and the optimizer's `step()`, which the dry run calls directly;
  at ZeRO stage 0, with its bf16 wrapper and gradient all-reduce off (DESIGN.md §3), it is not expected to
  hold model-sized tensors of its own (not measured here: tools/gpu_checks.py sets the dry run beside a real
  run's peak).
- Fake `cuda` tensors: autograd's backward aborts without a GPU (DESIGN.md §7), so the device is `cpu`; the
  byte counts are the same (MemTracker rounds `cuda` storages up to 512 bytes, which is negligible here).
- Host reads of a tensor's value (`.item()`, `bool()`, `int()`, `.tolist()`): a fake tensor has none, and
  FakeTensorMode refuses them (DataDependentOutputException). `HostReads` answers each: bools True, integers
  0, floats 0 (1 in evaluation). So the step is taken as finite and unclipped, and a data-dependent choice
  takes the branch that answer selects unless the code decides for fake tensors itself (the retraction's
  order and Newton–Schulz count: the worst case). In evaluation a float read is 1, not 0, because the
  Lipschitz bound's recursion (`rounding._spectral_up`) stops early on a zero Frobenius norm: with 1 it
  runs all its squarings, as on real weights. The reads are counted per phase and reported, since a
  host read is a device sync on a GPU. (A ShapeEnv with `allow_scalar_outputs` returns symbolic scalars
  instead, but the first comparison or `math.sqrt` of one raises GuardOnDataDependentSymNode.)
- Work inside one kernel (matrix_exp, SVD, QR workspaces, cuBLAS/NCCL buffers) is not a tensor and is not
  seen; the planner's estimate of a Riemannian update's temporaries covers it, the dry run's does not.
- `torch.compile` of the blocks is switched off (as torchtitan does): the eager step's memory is measured.

The rank simulated is the one with the most optimizer state (ties: the lowest), as the planner picks it:
weights are the same size on every rank and gradient accumulators follow the same ownership, so it holds the
largest peak.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils._python_dispatch import TorchDispatchMode

from lipnext_scale.build import manifold_hyper, named_parameters_with_kinds
from lipnext_scale.config import Recipe
from lipnext_scale.loss import classification_loss, training_eps
from lipnext_scale.memory_plan import plan, planned_dtype, recipe_micro_batch
from lipnext_scale.optim.sharded import ShardedManifoldOptimizer
from lipnext_scale.pretrained import build_model
from lipnext_scale.trainer import Trainer

# MemTracker's category names (its `_MemRefType` values) → what they hold in this step.
CATEGORIES = {
    "Parameter": "weights (compute dtype; in evaluation also the fp32 weights fetched from their owners)",
    "Gradient": "parameter gradients (compute dtype) until the optimizer's hook copies them into a bucket; "
    "the fp32 bucket send buffers (≤ 2 alive) and the owned fp32 gradient accumulators (ZeRO-2)",
    "Optstate": "optimizer state of the owned parameters (+ the step's temporaries, during the step)",
    "Activation": "forward activations and every tensor made outside backward and the step",
    "Temp": "backward temporaries (gradients of activations)",
    "Other": "tensors registered with track_external that are none of the above (none expected)",
    "Buffer": "module buffers",
}
PHASES = ("start-up", "micro-batch", "optimizer step", "evaluation")


class HostReads(TorchDispatchMode):
    """Answers the host reads of fake tensors (`aten._local_scalar_dense`: `.item()`, `bool()`, `int()`,
    each element of `.tolist()`), which have no value to read: True for a bool, 0 for an integer, `number`
    for a float (module docstring). Counts them."""

    def __init__(self, number: float = 0.0):
        super().__init__()
        self.count = 0
        self.number = number

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
            dtype = args[0].dtype
            return True if dtype == torch.bool else self.number if dtype.is_floating_point else 0
        return func(*args, **(kwargs or {}))


@dataclass(frozen=True)
class Phase:
    name: str
    peak: int  # bytes: MemTracker's largest total during the phase
    at_peak: dict[str, int]  # bytes by MemTracker category at that moment
    at_start: dict[str, int]  # bytes by category when the phase began
    at_end: dict[str, int]  # and when it ended
    planned: int  # the planner's figure for the same phase
    host_reads: int
    seconds: float

    @property
    def ratio(self) -> float:
        return self.peak / self.planned


@dataclass(frozen=True)
class DryRun:
    recipe: str
    size: str
    params: int
    world_size: int
    rank: int
    micro_batch: int
    accumulation: int
    compute_dtype: str
    phases: list[Phase]
    plan: dict
    seconds: float

    @property
    def training(self) -> list[Phase]:
        """The phases the planner's PEAK covers (the start-up is reported beside it, as the planner does)."""
        return [p for p in self.phases if p.name != "start-up"]

    @property
    def peak(self) -> int:
        return max(p.peak for p in self.training)

    @property
    def ratio(self) -> float:
        return self.peak / self.plan["peak"]


def _bytes_by_category(snapshot: dict) -> dict[str, int]:
    """{category: bytes, "Total": bytes} of the fake `cpu` device in a MemTracker snapshot. Tensors on `meta`
    (the trainer builds its fp32 evaluation model there before it assigns the masters) are tracked as a
    device of their own and hold no memory."""
    return {getattr(k, "value", k): v for k, v in snapshot.get(torch.device("cpu"), {}).items()}


@contextlib.contextmanager
def fake_world(world_size: int, rank: int) -> Iterator[None]:
    """torch's fake process group as the default group (every collective returns at once, moves nothing)."""
    if dist.is_initialized():
        raise RuntimeError(
            "dry run: a process group is already initialised in this process; the dry run needs its own fake "
            "one (run it in a fresh process, e.g. tools/plan_memory.py --dry-run)"
        )
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def fake_data_pointers() -> Iterator[None]:
    """`data_ptr()` of a fake tensor that tells storages apart. FakeTensor's own is 0 + the view's byte offset
    for every storage, so the optimizer's "is this master the weight itself?" (`_bind_storage`, `write_back`,
    `state_bytes`) would answer yes for any two tensors at offset 0: `_bind_storage` would replace every
    fp32 master with a compute-dtype view of the weights. Here: the storage's own address (`_cdata`, unique
    while it lives) shifted past any offset, plus the offset in bytes; only compared for equality."""
    saved = FakeTensor.data_ptr

    def data_ptr(self: torch.Tensor) -> int:
        return (self.untyped_storage()._cdata << 64) + self.storage_offset() * self.element_size()

    FakeTensor.data_ptr = data_ptr
    try:
        yield
    finally:
        FakeTensor.data_ptr = saved


def _gradient_tensors(optimizer: ShardedManifoldOptimizer) -> list[torch.Tensor]:
    """The optimizer's gradient memory (ZeRO-2): bucket send buffers being filled, reductions in flight (send
    and receive buffers) and the owned fp32 accumulators (views of a landed receive buffer, or of the reduce
    bucket's gradient itself)."""
    tensors = [t for t in optimizer._sends if t is not None]
    tensors += [t for _work, _index, send, out in optimizer._in_flight for t in (send, out)]
    return tensors + list(optimizer._grads.values())


def _tag_gradients(tracker: MemTracker, optimizer: ShardedManifoldOptimizer) -> None:
    # MemTracker files a tensor made in backward as a temporary, and offers no public way to name another
    # category (`track_external` says "Other"); its own gradient hook uses this call.
    for t in _gradient_tensors(optimizer):
        tracker._update_and_maybe_create_winfos(t, _MemRefType.GRAD)


class _Batches:
    """`count` batches, each made by `make()` when asked for: a loader's batches, one alive at a time unless
    the consumer keeps them (a list would hold every batch's images from the start)."""

    def __init__(self, count: int, make: Callable[[], tuple[torch.Tensor, torch.Tensor]]):
        self.count, self.make = count, make

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        for _ in range(self.count):
            yield self.make()


class _Evaluation(torch.nn.Module):
    """`Trainer.certified_counts` as a module's forward. A chunk calls the stem and the head once per batch;
    MemTracker refuses a second call of a module at the top level (it takes it for the next iteration) but
    follows repeated calls inside an enclosing module."""

    def forward(self, *args):
        return Trainer.certified_counts(*args)


def _largest_rank(planned: dict) -> int:
    per_rank = planned["optimizer_per_rank"]
    return max(range(len(per_rank)), key=lambda r: (per_rank[r], -r))


def _worst_step(recipe: Recipe) -> int:
    """A step number at which the update also syncs Lookahead and re-orthogonalises (when configured)."""
    o = recipe.optim
    return math.lcm(max(1, o.lookahead_k), max(1, o.reorthogonalize_every))


def dry_run(
    recipe: Recipe,
    world_size: int,
    name: str = "",
    micro_batch: int = 0,
    rank: int | None = None,
    log: Callable[[str], None] | None = None,
) -> DryRun:
    """One training step of `recipe` as rank `rank` (default: the largest) of `world_size`, faked (module
    docstring); each phase's MemTracker peak beside the planner's figure for it."""
    started = time.perf_counter()
    # torch.compile cannot trace under the dry run's modes; the eager step's memory is what is measured.
    recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, compile=False))
    dtype = planned_dtype(recipe)
    micro = micro_batch or recipe_micro_batch(recipe, world_size)
    planned = plan(recipe, world_size, micro_batch=micro, dtype=dtype)
    rank = _largest_rank(planned) if rank is None else rank
    accumulation = max(1, recipe.data.batch_size // (micro * world_size))
    # The terms of the planner's peak (memory_plan.plan), phase by phase.
    static = planned["weights"] + planned["optimizer_per_rank"][rank]
    planned_phase = {
        "start-up": planned["init_peak"],
        "micro-batch": static
        + planned["backward_grads"]
        + planned["activations"]["peak"]
        + planned["transient_grads"],
        "optimizer step": static + planned["grad_accumulators"] + planned["step_transient"],
        "evaluation": static + planned["evaluation_pending_grads"] + planned["evaluation"]["extra"],
    }
    phases: list[Phase] = []
    live: dict = {}  # what the phases hand on to each other: model, optimizer

    def run_phase(phase: str, body: Callable[[MemTracker], None]) -> None:
        gc.collect()  # reference cycles of the previous phase are not this phase's memory
        tracker = MemTracker()
        tracker.track_external(*(x for x in (live.get("model"), live.get("optimizer")) if x is not None))
        if "optimizer" in live:
            _tag_gradients(tracker, live["optimizer"])
        live["tracker"] = tracker
        reads = HostReads(1.0 if phase == "evaluation" else 0.0)
        t0 = time.perf_counter()
        with tracker, reads:
            at_start = _bytes_by_category(tracker.get_tracker_snapshot("current"))
            body(tracker)
            gc.collect()
            at_end = _bytes_by_category(tracker.get_tracker_snapshot("current"))
        at_peak = _bytes_by_category(tracker.get_tracker_snapshot("peak"))
        seconds = time.perf_counter() - t0
        result = Phase(phase, at_peak.get("Total", 0), at_peak, at_start, at_end, planned_phase[phase],
                       reads.count, seconds)  # fmt: skip
        phases.append(result)
        if log:
            log(f"  {phase:<15} peak {result.peak / 2**30:8.2f} GiB  plan {result.planned / 2**30:8.2f} GiB  "
                f"({result.seconds:.1f} s)")  # fmt: skip

    # Built outside the fake mode: under it the meta parameters would be fake tensors themselves, which
    # `Module.to_empty` must swap, and torch refuses to swap a tensor the mode holds a weak reference to.
    with torch.device("meta"):  # activation checkpointing as the trainer resolves it ("auto": by the plan)
        meta_model = build_model(recipe, planned["activation_checkpointing"])
    fake = FakeTensorMode()
    with fake_world(world_size, rank), fake, fake_data_pointers(), warnings.catch_warnings():
        # The optimizer's hook copies each gradient into its bucket and sets `param.grad = None` before
        # MemTracker's own post-accumulate hook looks at `param.grad`; it warns about the None and goes on.
        warnings.filterwarnings("ignore", message="Expected a tensor or a traceable wrapper-subclass")

        def start_up(tracker: MemTracker) -> None:
            model = meta_model
            # `Module.to_empty` converts the real meta parameters; that is the one place where FakeTensorMode
            # must accept non-fake inputs (meta tensors hold no data either).
            fake.allow_non_fake_inputs = True
            try:
                model.to_empty(device="cpu")
            finally:
                fake.allow_non_fake_inputs = False
            model.train()
            # As the trainer: the optimizer takes its fp32 masters from the fp32 weights, hooks the modules to
            # wait for their all-gathered weights, then the cast.
            optimizer = ShardedManifoldOptimizer(
                named_parameters_with_kinds(model), manifold_hyper(recipe), grad_clip=recipe.optim.grad_clip
            )
            optimizer.wait_before_forward(model)
            for p in model.parameters():
                p.data = p.data.to(dtype)
            # Registered after the optimizer's own hooks, so it runs after each of them: whatever gradient
            # memory the optimizer holds then (a new bucket, an issued reduction, a landed accumulator) is
            # filed under "Gradient" rather than as a backward temporary.
            for p in model.parameters():
                p.register_post_accumulate_grad_hook(lambda _: _tag_gradients(live["tracker"], optimizer))
            live.update(model=model, optimizer=optimizer)
            # Made inside the tracker, all of it counted as activations so far; registered now, so that the
            # phase's end shows the categories (its peak, set by the cast, does not).
            tracker.track_external(model, optimizer)

        def micro_batch_step(tracker: MemTracker) -> None:
            model, optimizer, m, t = live["model"], live["optimizer"], recipe.model, recipe.train
            # With gradient accumulation, every micro-batch after the first runs with the owned fp32
            # accumulators alive: two micro-batches, so that the phase's peak is that of such a one.
            for _ in range(2 if accumulation > 1 else 1):
                tracker.reset_mod_stats()  # per-module statistics (unused) allow one pass; totals go on
                images = torch.rand(micro, 3, m.image_size, m.image_size)
                labels = torch.randint(0, m.num_classes, (micro,))
                eps = training_eps(t.eps, t.eps_ramp, 0.0)
                logits = model(images)
                head = model.head.normalized_weight().float()
                loss = classification_loss(t.loss, logits, labels, head, eps)
                optimizer.note_loss(loss)
                loss.backward()
                del images, labels, logits, head, loss

        def optimizer_step(_: MemTracker) -> None:
            optimizer = live["optimizer"]
            optimizer.step_count = _worst_step(recipe) - 1  # so that it syncs Lookahead, re-orthogonalises
            optimizer.step()

        def evaluation(tracker: MemTracker) -> None:
            # As `Trainer.evaluate`, with one chunk of the planned size: the fp32 masters streamed block by
            # block from their owners (fp32 mode; sound mode gathers them all), the chunk's batches passed
            # through each block in turn, each block's P̂ bounded; the weights' bounds split across ranks.
            m, batch = recipe.model, recipe.certify.batch_size
            chunk = planned["evaluation"]["chunk_batches"]

            def make() -> tuple[torch.Tensor, torch.Tensor]:
                images = torch.rand(batch, 3, m.image_size, m.image_size)
                return images, torch.randint(0, m.num_classes, (batch,))

            _Evaluation()(recipe, live["optimizer"], _Batches(chunk, make), chunk)
            # The fp32 weights this rank owns were fetched as its masters themselves, which MemTracker then
            # re-filed as parameters of the evaluation's model: filed back as optimizer state.
            tracker.track_external(live["optimizer"])

        run_phase("start-up", start_up)
        run_phase("micro-batch", micro_batch_step)
        # With gradient accumulation an epoch can end with a step's gradients pending; evaluation then
        # gathers the masters into a fresh buffer (the trainer's worst case), so it runs before the step.
        order = [optimizer_step, evaluation] if accumulation == 1 else [evaluation, optimizer_step]
        for body in order:
            run_phase("optimizer step" if body is optimizer_step else "evaluation", body)
        live.clear()
    return DryRun(
        recipe=name,
        size=recipe.model.size,
        params=planned["params"],
        world_size=world_size,
        rank=rank,
        micro_batch=micro,
        accumulation=accumulation,
        compute_dtype=str(dtype).removeprefix("torch."),
        phases=sorted(phases, key=lambda p: PHASES.index(p.name)),
        plan=planned,
        seconds=time.perf_counter() - started,
    )
