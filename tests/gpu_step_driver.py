"""Device discipline of the training step, run under `torchrun --nproc_per_node N` (gloo, CPU).

    gpu_step_driver.py OUT DATA_ROOT

On a GPU, the weights, the loss and the communication device are cuda:LOCAL_RANK while a tensor made without
a device lands on the host; NCCL then rejects it, or an op mixes the two. On the CPU test machine all of
these are the same device, so this driver separates them the other way round: the training step,
step_stats and the orthogonality error run with the *default* device set to `meta`, so a tensor made
without an explicit device is a meta tensor, while the model and the process group stay on the CPU. And
every tensor handed to a collective is checked to live on `distributed.comm_device()` before the real
collective runs (checked in the layer `distributed` calls: deepspeed.comm, once the Trainer has started
DeepSpeed). Evaluation reads data (host tensors by design) and runs outside the meta scope, with the
collective check only. Writes OUT/device_rank<r>.json: the collectives seen, by name and device.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import torch

# Run by path (torchrun): this folder is sys.path[0], the repository root is not, so import its sibling.
from dist_driver import build_trainer, digits_tensors, rank_slice

from lipnext_scale import distributed

COLLECTIVES = (
    "all_reduce",
    "all_gather_single",
    "all_gather_into_tensor",
    "reduce_scatter_single",
    "reduce_scatter_tensor",
    "reduce",
    "broadcast",
)


def check_devices(seen: list) -> None:
    """Wrap the tensor collectives `distributed` calls: assert each tensor's device, then run the real one."""
    layer = distributed.collectives()
    for name in COLLECTIVES:
        real = getattr(layer, name, None)
        if real is None:
            continue

        @functools.wraps(real)
        def checked(*args, _real=real, _name=name, **kwargs):
            comm = distributed.comm_device()
            for t in [*args, *kwargs.values()]:
                if isinstance(t, torch.Tensor):
                    assert t.device == comm, f"{_name}: tensor on {t.device}, communication device {comm}"
                    seen.append((_name, str(t.device)))
            return _real(*args, **kwargs)

        setattr(layer, name, checked)


def main(out: Path, data_root: str) -> None:
    # Two micro-batches per step: the accumulation path and the boundary path both run.
    trainer = build_trainer(out, data_root, "train.micro_batch_size=16")
    images, labels = digits_tensors()
    # Ranks other than 0 built their model on meta and allocated it uninitialised: DeepSpeed's broadcast of
    # rank 0's weights must have filled it. Each parameter's float64 sum, gathered from every rank.
    sums = torch.stack([p.detach().double().sum() for p in trainer.model.parameters()])
    per_rank = distributed.all_gather(sums)
    seen: list = []
    check_devices(seen)
    steps, agreed = 0, []
    with torch.device("meta"):
        for step in range(6):
            if step == 4 and trainer.dist.rank == 1:  # a stop signal on one rank before the third step
                trainer.stop.received = "SIGUSR1"
            done = trainer.train_micro_batch(*rank_slice(trainer, step, images, labels))
            steps += done
            if done:
                agreed.append(list(trainer.optimizer.agreed))
        trainer.stop.received = None  # agreed and acted on (by a checkpoint, in fit); evaluation goes on
        stats = trainer.step_stats(eps=0.1)
        orthogonality = trainer.orthogonality_error()
    result = trainer.evaluate()
    report = {
        "steps": steps,
        "agreed": agreed,
        "weights_equal_at_start": bool((per_rank == per_rank[0]).all()),
        "loss": stats["loss"],
        "orthogonality_error": orthogonality,
        "clean_acc": result["clean_acc"],
        "collectives": sorted({f"{name}@{device}" for name, device in seen}),
        "count": len(seen),
    }
    (out / f"device_rank{trainer.dist.rank}.json").write_text(json.dumps(report))
    trainer.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
