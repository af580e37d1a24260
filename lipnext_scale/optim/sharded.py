"""The manifold optimizer sharded across data-parallel ranks by whole matrices (DESIGN.md §3), ZeRO-2 style.

Every parameter has one owner rank. Only the owner keeps its fp32 master, Adam moments, Lookahead state and
— new with ZeRO-2 — its fp32 gradient: no rank holds a full-size gradient buffer.

**Buckets, no padding.** Parameters are grouped, in backward order, into buckets (`plan_buckets`):

- *scatter*: N equally sized matrices, slot r owned by rank r, so a reduce-scatter hands each owner exactly
  its matrix and an all-gather returns the updated weights — N·size elements, none of them padding;
- *reduce*: a large parameter left over when its size class does not divide by N (at N = 128 every W×W
  matrix of a 64-matrix model), or every matrix of a class whose bucket would exceed `BUCKET_BYTES`:
  reduced to its owner, then broadcast from it. Ring/chain reduce and broadcast move the same bytes in
  aggregate as a reduce-scatter/all-gather of the same data, with no padding;
- *tail*: the parameters too small to be worth a collective each (size·N ≤ 0.5% of the model: biases,
  positional terms), packed into one padded reduce-scatter. Its padding is below 0.5% of the model by
  construction; all-reducing them and updating them on every rank instead would be simpler but keeps N copies
  of their optimizer state and breaks "one owner per name" that checkpoints rely on.

Owners: scatter slots are balanced by construction; the rest go largest-first onto the least-loaded rank, so
the largest rank's state stays ≤ total/N + one matrix's.

**Per micro-batch** (overlapped, `overlap=True`): a post-accumulate-grad hook copies each gradient into its
bucket's fp32 send buffer and drops `param.grad`; when a bucket is complete its collective is issued
asynchronously — in bucket order, the same on every rank, whatever order autograd fires hooks in — while
backward goes on. At most `max_buckets_in_flight` send buffers exist at once (the oldest is waited for before
a new one is issued). When a reduction lands, the owner adds its part into its fp32 accumulator. Gradient
accumulation over several micro-batches reduces every micro-batch: traffic × micro-batches, but the least
memory (the alternative, a full-size local fp32 buffer reduced once at the boundary, is ZeRO-1's memory that
this layout removes; see README "Distributed training").

**Per optimizer step**: wait for the last reductions; one all-reduce of [Σ g², non-finite losses] gives the
global norm (clipping) and the skip decision, read on the host once; each owner updates its masters and
writes them, in the compute dtype, into its slot of the bucket's storage — the parameters of a scatter or tail
bucket are views into one flat tensor — and the all-gather (or broadcast) runs in place into that storage,
asynchronously. A forward pre-hook on each module (`wait_before_forward`) waits for its buckets only, so the
gathers of later blocks overlap the forward of earlier ones.

`overlap=False` runs the same collectives, each waited for as soon as it is issued: the reference the tests
compare the overlapped path against bit for bit. Every collective goes through `lipnext_scale.distributed`
on its communication device.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lipnext_scale import distributed
from lipnext_scale.optim.manifold import ManifoldHyper, ManifoldOptimizer

# A parameter goes to the padded tail bucket when size·N ≤ this share of the model: the tail's padding (at
# most N × its largest member) then stays below the same share.
TAIL_SHARE = 1 / 200
# A scatter bucket's fp32 send buffer holds N matrices' gradients (two are alive during backward). Past this
# size the matrices of a size class go to their owners one by one (reduce/broadcast: the same bytes, no
# padding, one matrix of buffer), so that the gradient memory stays bounded as N grows.
BUCKET_BYTES = 2 * 2**30
# A scatter bucket is issued when its last member's gradient arrives, so its N matrices must not span much of
# backward: at most this share of the large parameters (in backward order). Past it (N large against the
# depth: e.g. 64 ranks on 64 block matrices would make one bucket of the whole model, issued only when
# backward ends) the size class goes to its owners one by one, each reduced as soon as it is ready.
SCATTER_SPAN = 1 / 8


@dataclass(frozen=True)
class Bucket:
    """Parameters that travel in one collective. `offsets` place them in the bucket's flat buffer: rank r's
    segment is [r·segment, (r+1)·segment) for scatter/tail; a reduce bucket is its one parameter."""

    kind: str  # "scatter", "reduce" or "tail"
    names: tuple[str, ...]
    sizes: tuple[int, ...]
    owners: tuple[int, ...]
    offsets: tuple[int, ...]
    segment: int
    world_size: int

    @property
    def numel(self) -> int:
        return self.segment if self.kind == "reduce" else self.segment * self.world_size

    @property
    def padding(self) -> int:
        return self.numel - sum(self.sizes)


def plan_buckets(
    named_sizes: list[tuple[str, int]], world_size: int, bucket_bytes: int = BUCKET_BYTES
) -> list[Bucket]:
    """Buckets and owners for parameters listed in model (forward) order; returned in the order their
    gradients complete in backward (reverse model order), which is the order collectives are issued in."""
    n = world_size
    backward = list(reversed(named_sizes))
    position = {name: i for i, (name, _) in enumerate(backward)}
    total = sum(size for _, size in named_sizes)
    tail = [(name, s) for name, s in backward if s * n <= TAIL_SHARE * total]
    large = [(name, s) for name, s in backward if s * n > TAIL_SHARE * total]
    load = [0] * n
    buckets: list[Bucket] = []
    by_size: dict[int, list[str]] = {}
    for name, s in large:
        by_size.setdefault(s, []).append(name)
    left: list[tuple[str, int]] = []
    for s, names in by_size.items():
        scatter = n * s * 4 <= bucket_bytes and n <= max(2, SCATTER_SPAN * len(large))
        whole = len(names) - len(names) % n if scatter else 0
        for i in range(0, whole, n):
            buckets.append(
                Bucket(
                    "scatter",
                    tuple(names[i : i + n]),
                    (s,) * n,
                    tuple(range(n)),
                    tuple(r * s for r in range(n)),
                    s,
                    n,
                )
            )
            load = [x + s for x in load]
        left += [(name, s) for name in names[whole:]]

    def least_loaded(size: int) -> int:
        rank = min(range(n), key=lambda r: (load[r], r))
        load[rank] += size
        return rank

    for name, s in sorted(left, key=lambda x: (-x[1], position[x[0]])):
        buckets.append(Bucket("reduce", (name,), (s,), (least_loaded(s),), (0,), s, n))
    if tail:
        # Balanced within the tail, so that its padding stays ≤ N × its largest member (≤ TAIL_SHARE of the
        # model); the tail is too small to matter for the balance of optimizer state.
        tail_load = [0] * n
        owners = {}
        for name, s in sorted(tail, key=lambda x: (-x[1], position[x[0]])):
            owners[name] = min(range(n), key=lambda r: (tail_load[r], r))
            tail_load[owners[name]] += s
        fill = [0] * n
        local = {}
        for name, s in tail:
            local[name] = fill[owners[name]]
            fill[owners[name]] += s
        segment = max(fill)
        buckets.append(
            Bucket(
                "tail",
                tuple(name for name, _ in tail),
                tuple(s for _, s in tail),
                tuple(owners[name] for name, _ in tail),
                tuple(owners[name] * segment + local[name] for name, _ in tail),
                segment,
                n,
            )
        )
    return sorted(buckets, key=lambda b: max(position[name] for name in b.names))


def owners_of(buckets: list[Bucket]) -> dict[str, int]:
    return {name: owner for b in buckets for name, owner in zip(b.names, b.owners)}


def padding_share(named_sizes: list[tuple[str, int]], world_size: int) -> float:
    """Padding elements over parameters: the extra share of reduce-scatter/all-gather bytes."""
    buckets = plan_buckets(named_sizes, world_size)
    return sum(b.padding for b in buckets) / sum(s for _, s in named_sizes)


def issued_before_last_hook(named_sizes: list[tuple[str, int]], world_size: int) -> float:
    """Share of reduction bytes whose bucket is complete before the last gradient of backward arrives, when
    hooks fire in reverse model order (what `ShardedManifoldOptimizer.comm_bytes` measures in a run)."""
    buckets = plan_buckets(named_sizes, world_size)
    position = {name: i for i, (name, _) in enumerate(reversed(named_sizes))}
    last = len(named_sizes) - 1
    early = sum(b.numel for b in buckets if max(position[n] for n in b.names) < last)
    return early / sum(b.numel for b in buckets)


class ShardedManifoldOptimizer(ManifoldOptimizer):
    """`ManifoldOptimizer` whose state and gradients are partitioned by whole parameters across the default
    process group. Gradients never stay in `param.grad`: a hook moves each into its bucket as soon as
    autograd has produced it, and only the owner keeps the reduced sum (fp32, across micro-batches)."""

    # Timed with DeepSpeed's wall-clock timers when `timers` is set (engine.initialize does, under
    # `run.wall_clock_breakdown`): waits for reductions, and for gathered weights.
    WALL_CLOCK_TIMERS = ("comm_wait_reduce", "comm_wait_gather")

    def __init__(
        self,
        named_params: list[tuple[str, torch.nn.Parameter, str]],
        hyper: ManifoldHyper,
        grad_clip: float = 0.0,
        overlap: bool = True,
        max_buckets_in_flight: int = 2,
    ):
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.buckets = plan_buckets([(n, p.numel()) for n, p, _ in named_params], self.world_size)
        self.owners = owners_of(self.buckets)
        owned = {name for name, rank in self.owners.items() if rank == self.rank}
        super().__init__(named_params, hyper, owned=owned)
        self.grad_clip = grad_clip
        self.overlap = overlap
        self.max_buckets_in_flight = max(1, max_buckets_in_flight)
        self.params_by_name = {name: p for name, p, _ in named_params}
        self.device = named_params[0][1].device
        self.slot = {name: (i, j) for i, b in enumerate(self.buckets) for j, name in enumerate(b.names)}
        # Per micro-batch: gradients arrived per bucket, the next bucket to issue, bucket send buffers.
        self._arrived = [0] * len(self.buckets)
        self._next = 0
        self._sends: list[torch.Tensor | None] = [None] * len(self.buckets)
        self._in_flight: deque = deque()  # (work, bucket index, send buffer, receive buffer)
        # owned name → its fp32 gradient, summed over ranks and micro-batches
        self._grads: dict[str, torch.Tensor] = {}
        self._storage: list[torch.Tensor | None] = [None] * len(self.buckets)  # flat compute-dtype weights
        self._gathers: dict[int, object] = {}  # bucket index → pending all-gather/broadcast
        self._hooked_modules = False
        # Non-finite micro-batch losses since the last step, counted on the device: no host sync per
        # micro-batch; the count travels with the gradient norm's all-reduce.
        self._nonfinite_losses = torch.zeros((), dtype=torch.float64, device=self.device)
        self._flags: list[float] = []  # see agree_on
        self.agreed: list[bool] = []
        # Payload bytes of reductions (fp32): all, and those issued before the hook that completed the
        # micro-batch's last bucket; of gathers (compute dtype). Read by tools/bench_distributed.py.
        self.comm_bytes = {"reduce": 0, "reduce_before_last_hook": 0, "gather": 0}
        self.wait_seconds = 0.0
        self.timers = None  # DeepSpeed's SynchronizedWallClockTimer, or None: the waits are not timed
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self._global_grad_norm = 0.0
        self.overflow = False  # read by DeepSpeed's engine after step() to count skipped steps
        for name, param in self.params_by_name.items():
            param.register_post_accumulate_grad_hook(self._gradient_hook(name))

    # --- gradients: into buckets, reduced while backward goes on ---

    def _gradient_hook(self, name: str):
        index, slot = self.slot[name]
        bucket = self.buckets[index]
        offset, size = bucket.offsets[slot], bucket.sizes[slot]

        def hook(param: torch.Tensor) -> None:
            grad = param.grad.reshape(-1)
            param.grad = None
            if bucket.kind == "reduce":  # the (fp32) gradient is the send buffer; nobody else holds it now
                self._sends[index] = grad if grad.dtype == torch.float32 else grad.float()
            else:
                if self._sends[index] is None:
                    make = torch.zeros if bucket.padding else torch.empty
                    self._sends[index] = make(bucket.numel, dtype=torch.float32, device=self.device)
                self._sends[index][offset : offset + size].copy_(grad)
            self._arrived[index] += 1
            if self._arrived[index] == len(bucket.names):
                self._issue_ready()

        return hook

    def _issue_ready(self) -> None:
        """Issue every complete bucket in bucket order (identical on all ranks, so collectives match)."""
        issued = 0
        while self._next < len(self.buckets) and self._arrived[self._next] == len(
            self.buckets[self._next].names
        ):
            issued += self._issue(self._next)
            self._next += 1
        self.comm_bytes["reduce"] += issued
        if self._next == len(self.buckets):  # this hook completed the micro-batch
            self._arrived = [0] * len(self.buckets)
            self._next = 0
        else:
            self.comm_bytes["reduce_before_last_hook"] += issued

    def _issue(self, index: int) -> int:
        bucket = self.buckets[index]
        send, self._sends[index] = self._sends[index], None
        if bucket.kind == "reduce":
            out = send
            work = distributed.reduce_to(send, bucket.owners[0])
        else:
            out = (
                send
                if self.world_size == 1
                else torch.empty(bucket.segment, dtype=torch.float32, device=self.device)
            )
            work = distributed.reduce_scatter_async(out, send)
        self._in_flight.append((work, index, send, out))
        while len(self._in_flight) > (self.max_buckets_in_flight - 1 if self.overlap else 0):
            self._land_oldest()
        return bucket.numel * 4

    def _wait(self, work, timer: str) -> None:
        # Host time blocked on communication (tools/bench_distributed.py). On CPUs (gloo) it exceeds the
        # exposed communication time when ranks share cores (a blocked rank lends its core to the others); on
        # GPUs wait() only orders streams, so it stays near zero there — DeepSpeed's timers (CUDA events
        # around the wait) measure the compute stream's stall instead.
        start = time.perf_counter()
        if self.timers is None:
            work.wait()
        else:
            self.timers(timer).start()
            work.wait()
            self.timers(timer).stop()
        self.wait_seconds += time.perf_counter() - start

    def _land_oldest(self) -> None:
        work, index, _send, out = self._in_flight.popleft()
        if work is not None:
            self._wait(work, "comm_wait_reduce")
        bucket = self.buckets[index]
        base = 0 if bucket.kind == "reduce" or self.world_size == 1 else self.rank * bucket.segment
        for name, owner, offset, size in zip(bucket.names, bucket.owners, bucket.offsets, bucket.sizes):
            if owner != self.rank:
                continue
            part = out[offset - base : offset - base + size]
            if name in self._grads:
                self._grads[name].add_(part)
            else:  # the first micro-batch's sum is the accumulator: no copy
                self._grads[name] = part

    def _finish_reductions(self) -> None:
        if any(self._arrived):
            partial = [b.names[:3] for i, b in enumerate(self.buckets) if self._arrived[i]]
            raise RuntimeError(
                "ShardedManifoldOptimizer.step: some parameters received no gradient in the last backward "
                f"(buckets {partial}); every parameter must take part in the loss on every rank"
            )
        while self._in_flight:
            self._land_oldest()

    def note_loss(self, loss: torch.Tensor) -> None:
        """Count a non-finite micro-batch loss (on the device); any one makes the whole step skip."""
        self._nonfinite_losses.add_(torch.isfinite(loss.detach()).logical_not().sum())

    def _owned_gradients(self) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
        """(param, its fp32 gradient averaged over ranks) for every owned parameter."""
        out = []
        for param, state in self.state.items():
            grad = self._grads.get(state["name"])
            if grad is None:  # no backward since the last step
                grad = torch.zeros(param.numel(), dtype=torch.float32, device=self.device)
            out.append((param, grad.div_(self.world_size).view(param.shape)))
        return out

    def agree_on(self, flags: list[float]) -> None:
        """Host flags every rank must agree on at the coming step (the trainer's stop signal and checkpoint
        timer): they are summed over ranks by the step's own all-reduce, and `agreed` says after the step
        which of them any rank raised. A collective of their own after the step would queue behind the
        weights' all-gathers, and its host read would hold the next forward until they all ended."""
        self._flags = [float(f) for f in flags]

    def _global_norm_and_finite(self, grads: list[torch.Tensor]) -> tuple[float, bool]:
        """(global gradient norm, whether the step is finite): one all-reduce of [Σ g², non-finite losses,
        agreed flags], formed on the device (float64 per matrix, no copy of the whole shard), one host read
        per step."""
        squares = torch.zeros((), dtype=torch.float64, device=self.device)
        for g in grads:
            squares += torch.linalg.vector_norm(g, dtype=torch.float64).square()
        # Filled on the device: torch.tensor(list, device=cuda) copies from pageable memory and syncs.
        flags = [squares.new_full((), f) for f in self._flags]
        stats = torch.stack([squares, self._nonfinite_losses, *flags]).to(distributed.comm_device())
        squares, nonfinite, *flags = distributed.all_reduce_sum(stats).tolist()
        self.agreed, self._flags = [f > 0 for f in flags], []
        self._nonfinite_losses.zero_()
        norm = math.sqrt(squares) if math.isfinite(squares) else math.inf
        return norm, math.isfinite(norm) and nonfinite == 0

    # --- the step ---

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("ShardedManifoldOptimizer does not take a closure")
        self.wait_weights()  # an fp32 master may be the very weight a pending gather reads
        self._finish_reductions()
        owned = self._owned_gradients()
        norm, finite = self._global_norm_and_finite([g for _, g in owned])
        self._global_grad_norm = norm
        self.overflow = not finite
        if finite:
            self.consecutive_skips = 0
            self.step_count += 1
            scale = min(1.0, self.grad_clip / (norm + 1e-6)) if self.grad_clip else 1.0
            # All owned matrices at once: one host sync for their retractions' plans.
            self.update_parameters([(p, g * scale if scale != 1.0 else g) for p, g in owned])
        else:
            self.skipped_steps += 1
            self.consecutive_skips += 1
        del owned
        self._grads.clear()  # ZeRO-2: gradient memory exists only from the first backward to the step
        if finite:
            self.broadcast_weights()

    def zero_grad(self, set_to_none: bool = True) -> None:
        # Gradients live in the owners' accumulators, which step() releases; nothing to do between steps.
        for param in self.params_by_name.values():
            param.grad = None

    # --- weights: all-gathered in place, waited for by the module that needs them ---

    def _bind_storage(self) -> None:
        """Make the parameters of each scatter/tail bucket views into one flat tensor of their dtype (again
        after anything re-assigned `param.data`, e.g. the trainer's cast to the compute dtype). An fp32
        parameter that was its own master stays so."""
        for index, bucket in enumerate(self.buckets):
            if bucket.kind == "reduce":
                continue
            params = [self.params_by_name[n] for n in bucket.names]
            storage = self._storage[index]
            if storage is not None and all(
                p.dtype == storage.dtype and p.data_ptr() == storage[o:].data_ptr()
                for p, o in zip(params, bucket.offsets)
            ):
                continue
            dtypes = {p.dtype for p in params}
            if len(dtypes) > 1:
                raise TypeError(f"parameters {bucket.names[:3]}… share a bucket but not a dtype: {dtypes}")
            make = torch.zeros if bucket.padding else torch.empty
            storage = make(bucket.numel, dtype=params[0].dtype, device=self.device)
            for p, o, s in zip(params, bucket.offsets, bucket.sizes):
                old = p.data
                view = storage[o : o + s].view_as(old)
                view.copy_(old)
                p.data = view
                state = self.state.get(p)
                if state is not None and state["master"].data_ptr() == old.data_ptr():
                    state["master"] = view
            self._storage[index] = storage

    @torch.no_grad()
    def broadcast_weights(self) -> None:
        """Every owner writes its masters into its parameters (compute dtype) and every bucket is all-gathered
        (or broadcast) in place into every rank's parameters. Asynchronous once `wait_before_forward` has
        hooked the model; otherwise waited for here."""
        self.wait_weights()
        self._bind_storage()
        for param in self.state:
            self.write_back(param)
        element = next(iter(self.params_by_name.values())).element_size()
        for index in reversed(range(len(self.buckets))):  # forward order: the first block's weights first
            bucket = self.buckets[index]
            if bucket.kind == "reduce":
                param = self.params_by_name[bucket.names[0]]
                work = distributed.broadcast_from(param.data, bucket.owners[0])
            else:
                work = distributed.all_gather_in_place(self._storage[index])
            self.comm_bytes["gather"] += bucket.numel * element
            if work is None:
                continue
            if self.overlap and self._hooked_modules:
                self._gathers[index] = work
            else:
                self._wait(work, "comm_wait_gather")

    def reorthogonalize_masters(self) -> None:
        self.wait_weights()  # a master may alias a weight that a pending gather is still writing
        super().reorthogonalize_masters()

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], step_count: int) -> None:
        self.wait_weights()  # as above: no write into storage a pending gather still writes
        super().load_state_tensors(tensors, step_count)

    def wait_weights(self, indices=None) -> None:
        """Wait for pending all-gathers (all, or of the bucket `indices`)."""
        for index in list(self._gathers) if indices is None else indices:
            work = self._gathers.pop(index, None)
            if work is not None:
                self._wait(work, "comm_wait_gather")

    def wait_before_forward(self, model: torch.nn.Module) -> None:
        """A forward pre-hook on every module holding parameters waits for just those parameters' buckets,
        so the updated weights of later blocks are still arriving while earlier blocks compute."""
        by_param = {id(p): self.slot[n][0] for n, p in self.params_by_name.items()}
        for module in model.modules():
            indices = sorted({by_param[id(p)] for p in module.parameters(recurse=False) if id(p) in by_param})
            if indices:
                module.register_forward_pre_hook(_waiter(self, indices))
        self._hooked_modules = True

    # --- fp32 masters on every rank: all at once (saving, sound-mode evaluation) or by name (evaluation) ---

    @torch.no_grad()
    def gather_fp32_state(self) -> dict[str, torch.Tensor]:
        """{name: fp32 master} for every parameter, on every rank: one flat fp32 buffer, each parameter a
        view, filled bucket by bucket with the same in-place collectives as the weights."""
        self.wait_weights()
        total = sum(b.numel for b in self.buckets)
        full = torch.empty(total, dtype=torch.float32, device=self.device)
        views, start = {}, 0
        for bucket in self.buckets:
            flat = full[start : start + bucket.numel]
            start += bucket.numel
            if bucket.padding:
                flat.zero_()
            for name, owner, offset, size in zip(bucket.names, bucket.owners, bucket.offsets, bucket.sizes):
                param = self.params_by_name[name]
                views[name] = flat[offset : offset + size].view_as(param)
                if owner == self.rank:
                    views[name].copy_(self.state[param]["master"])
            if bucket.kind == "reduce":
                distributed.broadcast_from(flat, bucket.owners[0], async_op=False)
            else:
                distributed.all_gather_in_place(flat, async_op=False)
        return views

    @torch.no_grad()
    def fetch_fp32(self, names: list[str]) -> Callable[[], dict[str, torch.Tensor]]:
        """Start sending the fp32 masters of `names` from their owners to every rank; returns `wait()`, which
        gives {name: fp32 tensor}. Collective: every rank calls it with the same names in the same order.

        One asynchronous broadcast per parameter, so a caller can fetch the next block's matrices while it
        computes with this block's (`certify.StreamedCertifier`). On the owner the tensor is its master itself
        (no copy: read it, never write it); elsewhere a fresh buffer, freed when the caller drops it."""
        self.wait_weights()  # an fp32 master may be the very weight a pending gather writes
        out, works = {}, []
        for name in names:
            param, owner = self.params_by_name[name], self.owners[name]
            if owner == self.rank:
                tensor = self.state[param]["master"].view_as(param)
            else:
                tensor = torch.empty(param.shape, dtype=torch.float32, device=self.device)
            out[name] = tensor
            works.append(distributed.broadcast_from(tensor, owner))

        def wait() -> dict[str, torch.Tensor]:
            for work in works:
                if work is not None:
                    self._wait(work, "comm_wait_gather")  # evaluation's fetches count as weight gathers
            return out

        return wait

    def state_bytes(self, param: torch.nn.Parameter) -> int:
        """Bytes of one owned parameter's state: master (unless it aliases the weight), moments, Lookahead."""
        state = self.state[param]
        return sum(
            v.numel() * v.element_size()
            for k, v in state.items()
            if isinstance(v, torch.Tensor) and not (k == "master" and v.data_ptr() == param.data_ptr())
        )

    def optimizer_bytes(self) -> int:
        """Bytes of this rank's optimizer state."""
        return sum(self.state_bytes(p) for p in self.state)


def _waiter(optimizer: ShardedManifoldOptimizer, indices: list[int]):
    # Outside any compiled region: a compiled block graph-breaks here instead of tracing a wait.
    @torch.compiler.disable
    def hook(_module, _args) -> None:
        if optimizer._gathers:
            optimizer.wait_weights(indices)

    return hook
