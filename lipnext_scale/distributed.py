"""Every collective the package uses, each one a no-op in a world of one (no process group, or one rank).

The rule: **every tensor that meets a collective lives on the communication device**, `comm_device()`:
cuda:LOCAL_RANK under NCCL, cpu under gloo, and no op mixes devices on its way there. The process group
DeepSpeed creates on GPUs is NCCL-only: a CPU tensor handed to it fails ("No backend type associated with
device type cpu"), and gloo on the CPU test machines accepts anything, so the CPU tests cannot see such a
mistake by themselves. The helpers here therefore refuse a tensor on another device with an error that
names both devices, on every backend; tests/test_gpu_step.py runs the training step with host-made tensors
on a device of their own to catch what the check alone would not.

Values for the log are formed on the device, reduced here in one collective each (sum, or max), and read
on the host once, at log steps only. `engine.py` keeps what is DeepSpeed's (joining the process group, the
engine, monitors) and, once DeepSpeed has joined the group, hands this module `deepspeed.comm`: from then
on every collective here goes through DeepSpeed's comm layer, so that its comms logger counts, sizes and
times them. This module itself imports nothing from DeepSpeed.

`deepspeed.comm` (0.19.8) has every op used here, with `async_op` and torch.distributed's semantics: its
torch backend calls the same torch.distributed function on the same tensors and returns its work handle.
Its `timed_op` wrapper costs a few Python calls per collective while the comms logger is off (no device
synchronisation); while it is on, it synchronises the device after *every* collective it wraps (profiled or
not) — on GPUs each asynchronous reduce-scatter and all-gather then completes before the next kernel is
queued, so the logger's latencies are true but no communication overlaps compute; on CPUs the
synchronisation is a no-op, so an asynchronous op's logged latency is only its issue time (counts and sizes
stay right). Message sizes are those of the op's input tensor: a reduce-scatter logs its whole send buffer
(N segments), an all-gather its own segment.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def comm_device() -> torch.device:
    """Where tensors for collectives must live: cuda:LOCAL_RANK when the default group runs NCCL, else cpu."""
    if is_distributed() and "nccl" in str(dist.get_backend()).lower():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return torch.device("cpu")


def _check_device(*tensors: torch.Tensor) -> None:
    device = comm_device()
    for t in tensors:
        if t.device != device:
            raise RuntimeError(
                f"a tensor on {t.device} was handed to a collective whose communication device is {device}; "
                "create it there (device=distributed.comm_device()) or move it with .to(comm_device())"
            )


# The module collectives go through: DeepSpeed's comm layer (`deepspeed.comm`, torch.distributed's
# signatures) from the moment engine.setup_distributed has joined the group, torch.distributed before that
# and in processes that never start DeepSpeed (tests with a plain or fake process group).
_comm = None


def use_collectives(comm) -> None:
    """Send every collective through `comm` (a module with deepspeed.comm's signatures), or back through
    torch.distributed with None."""
    global _comm
    _comm = comm


def collectives():
    """The module collectives go through now: `deepspeed.comm` (or what `use_collectives` installed), else
    torch.distributed."""
    return _comm if _comm is not None else dist


def _flat(new: str, old: str):
    # torch 2.13 renamed the flat-tensor collectives (the old names warn); torch ≤ 2.12 and deepspeed.comm
    # have only the old ones. Looked up at each call, so that a test can wrap the functions of
    # `collectives()`.
    if _comm is not None:
        return getattr(_comm, old)
    return getattr(dist, new, None) or getattr(dist, old)


def _many() -> bool:
    return is_distributed() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        collectives().barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; returns `values`."""
    if _many():
        _check_device(values)
        collectives().all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over ranks, in place; returns `values`."""
    if _many():
        _check_device(values)
        collectives().all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def sum_over_ranks(values: list[float]) -> list[float]:
    """Element-wise sum of host floats over ranks, as float64 on the communication device (one all-reduce
    and a host read). Used for per-matrix bounds, each non-zero on one rank only: exact, equal everywhere."""
    if not _many():
        return list(values)
    return all_reduce_sum(torch.tensor(values, dtype=torch.float64, device=comm_device())).cpu().tolist()


def max_over_ranks(value: float) -> float:
    """The largest host float over ranks (one scalar all-reduce and a host read)."""
    if not _many():
        return value
    return all_reduce_max(torch.tensor([value], dtype=torch.float64, device=comm_device())).item()


def all_gather(values: torch.Tensor) -> torch.Tensor:
    """A small tensor from every rank, stacked: (world_size, *values.shape), rank order."""
    if not _many():
        return values.unsqueeze(0).clone()
    _check_device(values)
    flat = values.reshape(-1).contiguous()  # gloo gathers flat tensors only
    out = torch.empty(dist.get_world_size() * flat.numel(), dtype=values.dtype, device=values.device)
    _flat("all_gather_single", "all_gather_into_tensor")(out, flat)
    return out.view(dist.get_world_size(), *values.shape)


def all_gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order. For the control plane only (checkpoint resolution, the
    shared-directory check): a pickle and a host round trip per call, so never in a step. torch stages the
    pickles on the communication device itself (the current CUDA device under NCCL)."""
    if not _many():
        return [obj]
    out = [None] * dist.get_world_size()
    # Always torch.distributed: deepspeed.comm 0.19.8 has all_gather_object, but with its comms logger on,
    # the logger's bandwidth formula does not know that op and ends the process (`exit(0)` after "wrong
    # comm_op specified", utils/comms_logging.py: calc_bw_log).
    dist.all_gather_object(out, obj)
    return out


# --- asynchronous forms for the sharded optimizer: each returns the pending work (`.wait()`), or None when
# there was nothing to wait for (a world of one, or async_op=False) ---


def reduce_scatter_async(out: torch.Tensor, flat: torch.Tensor, async_op: bool = True):
    """`out` ← this rank's 1/N slice of the sum over ranks of `flat` (len(flat) = N·len(out)); the work
    handle when `async_op`."""
    if not _many():
        if out.data_ptr() != flat.data_ptr():
            out.copy_(flat)
        return None
    _check_device(out, flat)
    return _flat("reduce_scatter_single", "reduce_scatter_tensor")(out, flat, async_op=async_op)


def all_gather_in_place(flat: torch.Tensor, async_op: bool = True):
    """Every rank's 1/N slice of `flat` (slice r on rank r) into every rank's `flat`, with no other buffer."""
    if not _many():
        return None
    _check_device(flat)
    n, r = dist.get_world_size(), dist.get_rank()
    part = flat.numel() // n
    return _flat("all_gather_single", "all_gather_into_tensor")(
        flat, flat[r * part : (r + 1) * part], async_op=async_op
    )


def reduce_to(values: torch.Tensor, owner: int, async_op: bool = True):
    """Sum over ranks into `values` on rank `owner`; on other ranks `values` is left undefined."""
    if not _many():
        return None
    _check_device(values)
    return collectives().reduce(values, dst=owner, op=dist.ReduceOp.SUM, async_op=async_op)


def broadcast_from(values: torch.Tensor, owner: int, async_op: bool = True):
    """Rank `owner`'s `values` into every rank's `values`."""
    if not _many():
        return None
    _check_device(values)
    return collectives().broadcast(values, src=owner, async_op=async_op)
