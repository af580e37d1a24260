"""The manifold optimizer sharded across data-parallel ranks by whole matrices (DESIGN.md §3).

Every parameter has one owner rank, chosen largest-first onto the least-loaded rank. Only the owner keeps
its fp32 master, Adam moments and Lookahead state. Per optimizer step:

1. gradients, accumulated in fp32 across micro-batches in a flat buffer laid out owner by owner, are
   reduce-scattered so each rank receives the summed gradients of what it owns;
2. the global gradient norm (for clipping) and the count of non-finite losses (to skip the step) are one
   all-reduce of two numbers, read on the host once per optimizer step;
3. each owner updates its masters (a retraction needs the whole matrix, which is why ownership is per
   matrix and not per flat slice as in ZeRO);
4. the updated weights, in the compute dtype, are all-gathered into every rank's model.

With one process (torch.distributed not initialised) the same code runs without communication. Every
collective goes through `lipnext_scale.distributed`, on its communication device (the device of the
model's weights and of the gradient buffer).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lipnext_scale import distributed
from lipnext_scale.optim.manifold import ManifoldHyper, ManifoldOptimizer


def assign_owners(sizes: dict[str, int], world_size: int) -> dict[str, int]:
    """Deterministic, load-balanced ownership: largest first onto the least-loaded rank (ties: lowest rank,
    names break size ties) — independent of the order in which `sizes` lists the parameters."""
    load = [0] * world_size
    owners = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += sizes[name]
    return owners


@dataclass(frozen=True)
class FlatLayout:
    """Where each parameter lives in the owner-ordered flat buffers: rank r's segment is
    [r·segment, (r+1)·segment), padded to the largest rank's total so collectives get equal sizes."""

    offsets: dict[str, int]
    segment: int
    world_size: int

    @classmethod
    def build(cls, named_sizes: list[tuple[str, int]], owners: dict[str, int], world_size: int) -> FlatLayout:
        fill = [0] * world_size
        local = {}
        for name, size in named_sizes:  # model order within each segment
            rank = owners[name]
            local[name] = (rank, fill[rank])
            fill[rank] += size
        segment = max(max(fill), 1)
        offsets = {name: rank * segment + off for name, (rank, off) in local.items()}
        return cls(offsets, segment, world_size)

    @property
    def total(self) -> int:
        return self.segment * self.world_size


class ShardedManifoldOptimizer(ManifoldOptimizer):
    """`ManifoldOptimizer` whose state is partitioned by whole parameters across the default process group.

    Gradients never stay in `param.grad`: a hook moves each one into the fp32 accumulation buffer as soon as
    autograd has produced it, so micro-batches accumulate in fp32 whatever the compute dtype.
    """

    def __init__(
        self,
        named_params: list[tuple[str, torch.nn.Parameter, str]],
        hyper: ManifoldHyper,
        grad_clip: float = 0.0,
    ):
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        sizes = {name: p.numel() for name, p, _ in named_params}
        self.owners = assign_owners(sizes, self.world_size)
        owned = {name for name, rank in self.owners.items() if rank == self.rank}
        super().__init__(named_params, hyper, owned=owned)
        self.grad_clip = grad_clip
        self.params_by_name = {name: p for name, p, _ in named_params}
        self.layout = FlatLayout.build(
            [(n, p.numel()) for n, p, _ in named_params], self.owners, self.world_size
        )
        device = named_params[0][1].device
        self.grad_buffer = torch.zeros(self.layout.total, dtype=torch.float32, device=device)
        # Non-finite micro-batch losses since the last step, counted on the device: no host sync per
        # micro-batch; the count travels with the gradient norm's all-reduce.
        self._nonfinite_losses = torch.zeros((), dtype=torch.float64, device=device)
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self._global_grad_norm = 0.0
        self.overflow = False  # read by DeepSpeed's engine after step() to count skipped steps
        self._gradients_pending = False  # the buffer holds gradients of a step not yet taken
        for name, param in self.params_by_name.items():
            param.register_post_accumulate_grad_hook(self._accumulate_hook(name))

    # --- gradients ---

    def _accumulate_hook(self, name: str):
        offset = self.layout.offsets[name]

        def hook(param: torch.Tensor) -> None:
            self.grad_buffer[offset : offset + param.numel()].add_(param.grad.reshape(-1))
            param.grad = None
            self._gradients_pending = True

        return hook

    def note_loss(self, loss: torch.Tensor) -> None:
        """Count a non-finite micro-batch loss (on the device); any one makes the whole step skip."""
        self._nonfinite_losses.add_(torch.isfinite(loss.detach()).logical_not().sum())

    def _my_segment(self, buffer: torch.Tensor) -> torch.Tensor:
        return buffer[self.rank * self.layout.segment : (self.rank + 1) * self.layout.segment]

    def _reduce_gradients(self) -> torch.Tensor:
        """Sum of all ranks' gradients for this rank's segment, averaged over ranks."""
        if self.world_size == 1:
            return self.grad_buffer
        mine = torch.empty(self.layout.segment, dtype=torch.float32, device=self.grad_buffer.device)
        distributed.reduce_scatter_flat(mine, self.grad_buffer)
        return mine.div_(self.world_size)

    def _global_norm_and_finite(self, mine: torch.Tensor) -> tuple[float, bool]:
        """(global gradient norm, whether the step is finite): one all-reduce of [Σ g², non-finite losses],
        both formed on the buffer's device, and one host read per optimizer step."""
        stats = torch.stack([mine.double().square().sum(), self._nonfinite_losses])
        squares, nonfinite = distributed.all_reduce_sum(stats).tolist()
        self._nonfinite_losses.zero_()
        norm = math.sqrt(squares) if math.isfinite(squares) else math.inf
        return norm, math.isfinite(norm) and nonfinite == 0

    # --- the step ---

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("ShardedManifoldOptimizer does not take a closure")
        mine = self._reduce_gradients()
        norm, finite = self._global_norm_and_finite(mine)
        self._global_grad_norm = norm
        self.overflow = not finite
        if finite:
            self.consecutive_skips = 0
            self._update_owned(mine, norm)
        else:
            self.skipped_steps += 1
            self.consecutive_skips += 1
        # Cleared only now: with one rank, `mine` is the accumulation buffer itself.
        self.grad_buffer.zero_()
        self._gradients_pending = False
        if finite:
            self.broadcast_weights()

    def _update_owned(self, mine: torch.Tensor, norm: float) -> None:
        self.step_count += 1
        scale = min(1.0, self.grad_clip / (norm + 1e-6)) if self.grad_clip else 1.0
        base = self.rank * self.layout.segment
        pairs = []
        for param, state in self.state.items():
            offset = self.layout.offsets[state["name"]] - base
            grad = mine[offset : offset + param.numel()].view_as(param)
            pairs.append((param, grad * scale if scale != 1.0 else grad))
        self.update_parameters(pairs)  # all owned matrices at once: one host sync for their retractions

    def zero_grad(self, set_to_none: bool = True) -> None:
        # Gradients live in the accumulation buffer, which step() clears; nothing to do between steps.
        for param in self.params_by_name.values():
            param.grad = None

    # --- weights ---

    @torch.no_grad()
    def broadcast_weights(self) -> None:
        """All-gather every owner's masters into every rank's model weights, in the compute dtype."""
        gathered = self.gather(dtype=next(iter(self.params_by_name.values())).dtype)
        for name, param in self.params_by_name.items():
            offset = self.layout.offsets[name]
            param.data.copy_(gathered[offset : offset + param.numel()].view_as(param))

    @torch.no_grad()
    def gather(self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        """The flat buffer of all masters (owner-ordered layout) in `dtype`, on every rank (in `out`)."""
        if out is None:
            full = torch.zeros(self.layout.total, dtype=dtype, device=self.grad_buffer.device)
        else:
            full = out.zero_()
        mine = self._my_segment(full)
        base = self.rank * self.layout.segment
        for param, state in self.state.items():
            offset = self.layout.offsets[state["name"]] - base
            mine[offset : offset + param.numel()].copy_(state["master"].reshape(-1))
        if self.world_size > 1:
            distributed.all_gather_flat(full, mine.clone())
        return full

    def gather_fp32_state(self) -> dict[str, torch.Tensor]:
        """{name: fp32 master} for every parameter, on every rank (for evaluation and saving).

        The tensors are views into one gathered buffer: one fp32 copy of the model, not two.
        """
        return self._views(self.gather(torch.float32))

    @contextlib.contextmanager
    def fp32_state_in_grad_buffer(self) -> Iterator[dict[str, torch.Tensor]]:
        """`gather_fp32_state()` without a new full-size buffer: between steps the fp32 gradient buffer
        (same layout, same size) is idle, so the masters are gathered into it and it is zeroed again on
        exit. Its views must not be used after the block. With gradients of an unfinished step in the
        buffer, a fresh buffer is used instead."""
        if self._gradients_pending:
            yield self.gather_fp32_state()
            return
        try:
            yield self._views(self.gather(torch.float32, out=self.grad_buffer))
        finally:
            self.grad_buffer.zero_()

    def _views(self, full: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            name: full[self.layout.offsets[name] : self.layout.offsets[name] + p.numel()].view_as(p)
            for name, p in self.params_by_name.items()
        }

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
