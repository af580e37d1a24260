"""Training checkpoints in DeepSpeed's layout, `<dir>/<tag>/…` and `<dir>/latest`, without pickles.

Each rank writes only its own shard, `rank{r:05d}.safetensors`: the optimizer state of the parameters it
owns keyed by parameter name (`name/master`, `name/exp_avg`, …), its RNG state, and in the metadata its
data-stream position and counters. Once every rank's file is on disk, rank 0 writes `checkpoint.json`
(world size, which file holds which parameter) and only then moves `latest`. Every file is written to a
temporary name and renamed, so a process killed at any moment leaves `latest` on a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lipnext_scale.distributed import barrier

MANIFEST = "checkpoint.json"
LATEST = "latest"


def rank_file(rank: int) -> str:
    return f"rank{rank:05d}.safetensors"


def tag_for(step: int) -> str:
    return f"global_step{step}"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    ckpt_dir: Path,
    step: int,
    rank: int,
    world_size: int,
    optimizer,
    trainer_state: dict,
    recipe: dict,
    keep: int = 2,
) -> Path:
    """Collective: every rank calls it. Returns the tag directory."""
    tag_dir = ckpt_dir / tag_for(step)
    tag_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in optimizer.state_tensors().items()}
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    owned = sorted({s["name"] for s in optimizer.state.values()})
    metadata = {
        "owned": json.dumps(owned),
        "step_count": str(optimizer.step_count),
        "world_size": str(world_size),
        "trainer": json.dumps(trainer_state),
    }
    path = tag_dir / rank_file(rank)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    _fault_injection(step, rank)
    barrier()  # every rank's file is complete before the manifest and `latest` name it
    if rank == 0:
        manifest = {
            "step": step,
            "world_size": world_size,
            "files": [rank_file(r) for r in range(world_size)],
            "owners": {name: rank_file(r) for name, r in optimizer.owners.items()},
            "recipe": recipe,
        }
        _atomic_write_text(tag_dir / MANIFEST, json.dumps(manifest, indent=1))
        _fsync_dir(tag_dir)
        _atomic_write_text(ckpt_dir / LATEST, tag_dir.name)
        _prune(ckpt_dir, keep)
    barrier()
    return tag_dir


def _fault_injection(step: int, rank: int) -> None:
    """Tests kill a rank between its own file and the manifest: LIPNEXT_KILL_DURING_SAVE=step:rank."""
    spec = os.environ.get("LIPNEXT_KILL_DURING_SAVE")
    if spec and spec == f"{step}:{rank}":
        os.kill(os.getpid(), signal.SIGKILL)


def _prune(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, and any incomplete older ones."""
    latest = (ckpt_dir / LATEST).read_text().strip()
    tags = sorted(
        (p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("global_step")),
        key=lambda p: int(p.name.removeprefix("global_step")),
    )
    latest_step = int(latest.removeprefix("global_step"))
    complete = [p for p in tags if (p / MANIFEST).exists()]
    doomed = complete[:-keep] if keep > 0 else []
    doomed += [p for p in tags if p not in complete and int(p.name.removeprefix("global_step")) < latest_step]
    for p in doomed:
        if p.name != latest:
            shutil.rmtree(p, ignore_errors=True)


class IncompleteCheckpoint(RuntimeError):
    pass


def resolve_checkpoint(path: Path, tag: str | None = None) -> tuple[Path, dict]:
    """(tag directory, manifest) of a complete checkpoint.

    `path` is a checkpoint directory (its `latest`, or `tag`, is used) or a `global_step*` directory.
    """
    path = Path(path)
    if path.name.startswith("global_step") and tag is None:
        tag_dir = path
    else:
        if tag is None:
            if not (path / LATEST).exists():
                raise IncompleteCheckpoint(f"{path}: no '{LATEST}' file; not a checkpoint directory")
            tag = (path / LATEST).read_text().strip()
        tag_dir = path / tag
    if not tag_dir.is_dir():
        raise IncompleteCheckpoint(f"{tag_dir}: no such checkpoint")
    if (tag_dir / MANIFEST).exists():
        manifest = json.loads((tag_dir / MANIFEST).read_text())
        expected = manifest["files"]
    else:
        manifest, expected = None, _expected_rank_files(tag_dir)
    missing = [f for f in expected if not (tag_dir / f).exists()]
    if manifest is None or missing:
        raise IncompleteCheckpoint(
            f"{tag_dir}: incomplete checkpoint (the save did not finish): "
            f"missing rank files: {', '.join(missing) or 'none'}"
            + ("" if manifest else f"; missing {MANIFEST}")
        )
    return tag_dir, manifest


def _expected_rank_files(tag_dir: Path) -> list[str]:
    """Without a manifest, the world size recorded in any finished rank file says which files should exist."""
    for present in sorted(tag_dir.glob("rank*.safetensors")):
        with safe_open(str(present), framework="pt") as f:
            world_size = int(f.metadata()["world_size"])
        return [rank_file(r) for r in range(world_size)]
    return ["rank00000.safetensors (and any others: no rank finished writing)"]


def load_checkpoint(tag_dir: Path, manifest: dict, rank: int, world_size: int, optimizer) -> dict:
    """Load this rank's owned state (reading only those tensors, from whichever old rank files hold them).

    Returns this rank's trainer state when the world size is unchanged, else rank 0's with the data
    position dropped (a stream position does not carry over to another split of the data).
    """
    needed: dict[str, list[str]] = {}
    for state in optimizer.state.values():
        needed.setdefault(manifest["owners"][state["name"]], []).append(state["name"])
    tensors = {}
    for file, names in needed.items():
        with safe_open(str(tag_dir / file), framework="pt") as f:
            keys = set(f.keys())
            for name in names:
                for key in (k for k in keys if k.startswith(name + "/")):
                    tensors[key] = f.get_tensor(key)
    same_world = manifest["world_size"] == world_size
    own_file = tag_dir / rank_file(rank if same_world else 0)
    with safe_open(str(own_file), framework="pt") as f:
        meta = f.metadata()
        step_count = int(meta["step_count"])
        trainer_state = json.loads(meta["trainer"])
        if same_world:
            torch.set_rng_state(f.get_tensor("rng/torch"))
            if torch.cuda.is_available() and "rng/cuda" in f.keys():
                torch.cuda.set_rng_state(f.get_tensor("rng/cuda"))
    optimizer.load_state_tensors(tensors, step_count)
    optimizer.broadcast_weights()
    if not same_world:
        trainer_state.pop("data", None)
    return trainer_state
