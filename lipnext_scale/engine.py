"""DeepSpeed, and only here: process groups, the engine, gradient accumulation, monitors (DESIGN.md §3).

Collectives (barrier, sums, maxima, gathers) are in `distributed.py`, which states where their tensors live;
once the process group is joined they go through `deepspeed.comm`, handed over here (`setup_distributed`).

DeepSpeed runs at ZeRO stage 0 as the engine; the sharded manifold optimizer is plugged in as its optimizer.
Its own ZeRO stages cut flat slices through matrices (no retraction possible), and its bf16 wrapper would
keep a full fp32 copy of every weight on every rank, so both stay off: we cast the model to bf16 ourselves.
"""

from __future__ import annotations

import os
import socket
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from lipnext_scale import distributed
from lipnext_scale.config import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# Variables that setup_distributed invented for a launcher-less run; shutdown removes them again so that
# subprocesses (and a later run in the same process) do not mistake them for a launcher's.
_ENV_SET_HERE: list[str] = []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _say_if_compiling_comm_op() -> None:
    """On CPUs DeepSpeed JIT-compiles its shared-memory communication op at its first start, silently for
    30 s to 2 minutes; say so, so that the run does not look hung. torch's extension loader caches it."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return  # DeepSpeed will not build it either
    build_dir = Path(_get_build_directory(builder.NAME, verbose=False))
    if not any(build_dir.glob("*.so")):
        print(
            f"DeepSpeed is compiling its {builder.NAME} op into {build_dir} (first start only, 30 s–2 min)",
            flush=True,
        )


def setup_distributed(local_rank_arg: int | None = None, timeout_s: float = 300.0) -> DistInfo:
    """Join (or, for a plain `python train.py`, create) the process group: NCCL on GPUs, gloo on CPUs.

    A collective that waits `timeout_s` (a rank died or hangs) raises instead of hanging; on NCCL that
    needs asynchronous error handling, on by default since torch 2.2 (TORCH_NCCL_ASYNC_ERROR_HANDLING)."""
    use_cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu"
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:  # one process, no launcher: a world of one, same code path
        single = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="")
        single["MASTER_PORT"] = os.environ.get("MASTER_PORT") or str(_free_port())
        _ENV_SET_HERE.extend(k for k in single if k not in os.environ)
        os.environ.update(single)
    import deepspeed

    local_rank = int(os.environ.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        if not use_cuda and local_rank == 0:
            _say_if_compiling_comm_op()
        deepspeed.init_distributed(
            dist_backend="nccl" if use_cuda else "gloo", verbose=False, timeout=timedelta(seconds=timeout_s)
        )
    import deepspeed.comm

    if not deepspeed.comm.is_initialized():  # torch's group was made by someone else: DeepSpeed wraps it
        deepspeed.init_distributed(verbose=False)
    # Every collective of ours through DeepSpeed's comm layer from here on, so that its comms logger sees
    # them (distributed.py says what that layer does and costs). DeepSpeed 0.19.8 calls the flat-tensor
    # collectives by the names torch 2.13 deprecated (the same ops); their warnings would be noise to a user.
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
        category=FutureWarning,
    )
    distributed.use_collectives(deepspeed.comm)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def deepspeed_config(
    global_batch: int,
    micro_batch: int,
    world_size: int,
    monitor_dir: Path,
    comms_logger: bool = False,
    wall_clock_breakdown: bool = False,
) -> dict:
    """The engine's configuration. `comms_logger`: DeepSpeed's comms logger counts, sizes and times every
    collective (printed by rank 0 at `shutdown`); it synchronises the device after each one, so nothing
    overlaps while it is on. `wall_clock_breakdown`: DeepSpeed's timers of forward, backward and step, plus
    the optimizer's waits for communication (`initialize`), printed by rank 0 after every micro-batch and
    step."""
    if global_batch % (micro_batch * world_size):
        raise ConfigError(
            f"data.batch_size = {global_batch} is not a multiple of train.micro_batch_size ({micro_batch}) "
            f"× ranks ({world_size}); choose sizes so that batch = micro_batch × ranks × accumulation steps"
        )
    config = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": global_batch // (micro_batch * world_size),
        "gradient_clipping": 0.0,  # clipped with the true global norm inside the sharded optimizer
        "zero_optimization": {"stage": 0},
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 1 << 30,
        # Its throughput timer would torch.cuda.synchronize() at every forward and step (synchronized by
        # default), waiting out the asynchronous all-gathers and reduce-scatters the optimizer overlaps with
        # compute; we measure throughput ourselves.
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
        "csv_monitor": {"enabled": True, "output_path": str(monitor_dir), "job_name": "train"},
        "wall_clock_breakdown": wall_clock_breakdown,
    }
    if comms_logger:
        # Only when wanted: DeepSpeed 0.19.8 turns the logger on whenever the key is present, whatever its
        # "enabled" says (comm/config.py: DeepSpeedCommsConfig).
        config["comms_logger"] = {"enabled": True, "prof_all": True, "verbose": False}
    return config


def initialize(model: torch.nn.Module, optimizer_factory, config: dict):
    """`deepspeed.initialize` with our optimizer, built after the engine has broadcast rank 0's weights.

    The engine's gradient all-reduce is turned off: the optimizer reduce-scatters to owners instead.

    With `wall_clock_breakdown`, DeepSpeed times forward ('fwd'), backward ('bwd'; 'bwd_inner' is autograd,
    during which our gradient hooks issue the reductions; 'bwd_allreduce' is its own all-reduce, off, ≈ 0)
    and step ('step': the whole optimizer step — the last reductions landing, the norm's all-reduce, the
    update, the all-gathers issued). The optimizer adds its waits for communication under the names in
    `ShardedManifoldOptimizer.WALL_CLOCK_TIMERS` ('comm_wait_reduce': blocked on a reduction, in backward
    or at the step; 'comm_wait_gather': on updated weights, in forward's module hooks), and DeepSpeed prints
    them on its per-step line beside its own. On GPUs these are CUDA-event spans on the compute stream — the
    time it stood still waiting for communication; on CPUs host time.
    """
    import deepspeed

    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer_factory, config=config)
    engine.enable_backward_allreduce = False
    if engine.wall_clock_breakdown() and hasattr(optimizer, "WALL_CLOCK_TIMERS"):
        optimizer.timers = engine.timers
        # Logged, reset and snapshotted (engine.get_wall_clock_timers()) with DeepSpeed's step timers.
        engine.engine_timers.global_timers += list(optimizer.WALL_CLOCK_TIMERS)
    return engine, optimizer


def comms_summary() -> dict | None:
    """DeepSpeed's comms-logger record of this rank's collectives so far, {op: {message bytes: {"count",
    "total_latency_ms", …}}}, or None when the logger is off. Rank 0 prints the table at `shutdown`."""
    import deepspeed.comm

    if not deepspeed.comm.comms_logger.enabled:
        return None
    return deepspeed.comm.comms_logger.log_all(print_log=False, return_dict=True)["summary"]


def write_monitor_events(engine, scalars: dict[str, float], step: int) -> None:
    if getattr(engine, "monitor", None) is not None and engine.monitor.enabled:
        engine.monitor.write_events([(f"train/{k}", float(v), step) for k, v in scalars.items()])


def shutdown() -> None:
    """Leave the process group (all ranks together); rank 0 first prints the comms logger's table if it was
    on."""
    if dist.is_initialized():
        import deepspeed.comm

        if deepspeed.comm.comms_logger.enabled:
            deepspeed.comm.log_summary()
            # The logger is DeepSpeed's process-wide state: a later engine without it must start clean.
            deepspeed.comm.configure(enabled=False)
            deepspeed.comm.reset_log()
        # No rank may tear down its end of the process group (rank 0 hosts the rendezvous store) while
        # another still uses it: that aborts the process ("terminate called without an active exception").
        dist.barrier()

        deepspeed.comm.destroy_process_group()  # also drops DeepSpeed's cached groups, so a new run can start
    distributed.use_collectives(None)
    while _ENV_SET_HERE:
        os.environ.pop(_ENV_SET_HERE.pop(), None)
