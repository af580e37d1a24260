"""Training checkpoints in DeepSpeed's layout, `<dir>/<tag>/…` and `<dir>/latest`, without pickles.

`Checkpointer(dir, keep).save(step, {"optimizer": …, "trainer": …, "data": …})` saves objects that have
`state_dict()`/`load_state_dict()` (torchtitan's `Stateful`). Each rank writes only its own file,
`rank{r:05d}.safetensors`: the tensors of every state (keyed `name/…`) and the rest as JSON metadata.
Sharded states (`ShardedOptimizerState`) are read back from whichever old rank files hold each parameter,
so a checkpoint resumes on another number of ranks.

The protocol, so that a process or node killed at any moment leaves `latest` on a complete checkpoint:
1. every rank writes its file into `.tmp-<tag>/`, fsyncs it and the directory, and reports its size and
   sha256 to rank 0;
2. rank 0 writes `checkpoint.json` (world size, owners, sizes, checksums, recipe) there, fsyncs it and the
   directory, renames `.tmp-<tag>` to `<tag>` whole and fsyncs the checkpoint directory;
3. only then does rank 0 move `latest` (written to a temporary name, fsynced, renamed, directory fsynced)
   and prune older tags, never the newest one that verifies.
On resume rank 0 picks the checkpoint (the one `latest` names, or the newest older one that verifies when
that one is damaged, and says so), verifies sizes and checksums, and broadcasts its choice: every rank
resumes from the same checkpoint or all start fresh. All of this needs a directory every rank sees;
`check_shared` refuses a node-local one at start-up.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lipnext_scale.config import ConfigError
from lipnext_scale.distributed import all_gather_objects, barrier

MANIFEST = "checkpoint.json"
LATEST = "latest"
FORMAT = "lipnext_scale.checkpoint/v2"
TMP_PREFIX = ".tmp-"


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class IncompleteCheckpoint(RuntimeError):
    pass


def rank_file(rank: int) -> str:
    return f"rank{rank:05d}.safetensors"


def tag_for(step: int) -> str:
    return f"global_step{step}"


def step_of(tag: str) -> int:
    return int(tag.removeprefix("global_step"))


# --- durable files ---


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def file_digest(path: Path) -> dict[str, Any]:
    """{"bytes": size, "sha256": hex digest} of a file, read in 8 MiB pieces."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while piece := f.read(8 << 20):
            digest.update(piece)
            size += len(piece)
    return {"bytes": size, "sha256": digest.hexdigest()}


# --- state objects the checkpointer knows how to split into tensors and JSON ---


class ShardedOptimizerState:
    """The sharded manifold optimizer as a state object: each rank saves what it owns; on load each rank
    reads the parameters it owns now from whichever files held them (`owners` in the manifest)."""

    sharded = True

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.optimizer.state_tensors().items()}
        return {"tensors": tensors, "step_count": self.optimizer.step_count}

    def owned_names(self) -> list[str]:
        return sorted({s["name"] for s in self.optimizer.state.values()})

    def owners(self) -> dict[str, int]:
        return dict(self.optimizer.owners)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_tensors(state["tensors"], int(state["step_count"]))
        self.optimizer.broadcast_weights()


class RngState:
    """This process's torch (and CUDA) random state; restored only at the same world size."""

    def state_dict(self) -> dict[str, Any]:
        tensors = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            tensors["cuda"] = torch.cuda.get_rng_state()
        return {"tensors": tensors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["tensors"]["torch"])
        if torch.cuda.is_available() and "cuda" in state["tensors"]:
            torch.cuda.set_rng_state(state["tensors"]["cuda"])


def _split(name: str, state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {f"{name}/{k}": v for k, v in state.get("tensors", {}).items()}
    return tensors, {k: v for k, v in state.items() if k != "tensors"}


# --- verification and resolution (any process; rank 0 during a run) ---


def verify(tag_dir: Path) -> dict:
    """The manifest of a complete, undamaged checkpoint; IncompleteCheckpoint naming what is wrong."""
    if not tag_dir.is_dir():
        raise IncompleteCheckpoint(f"{tag_dir}: no such checkpoint")
    if not (tag_dir / MANIFEST).exists():
        raise IncompleteCheckpoint(
            f"{tag_dir}: incomplete checkpoint (the save did not finish): missing {MANIFEST}"
        )
    try:
        manifest = json.loads((tag_dir / MANIFEST).read_text())
    except json.JSONDecodeError as exc:
        raise IncompleteCheckpoint(f"{tag_dir / MANIFEST}: damaged ({exc})") from None
    missing = [f for f in manifest["files"] if not (tag_dir / f).exists()]
    if missing:
        raise IncompleteCheckpoint(
            f"{tag_dir}: incomplete checkpoint: missing rank files: {', '.join(missing)}"
        )
    for file, expected in manifest.get("checksums", {}).items():
        size = (tag_dir / file).stat().st_size
        if size != expected["bytes"]:
            raise IncompleteCheckpoint(
                f"{tag_dir / file}: damaged: {size} bytes, the manifest recorded {expected['bytes']}"
            )
        if file_digest(tag_dir / file)["sha256"] != expected["sha256"]:
            raise IncompleteCheckpoint(f"{tag_dir / file}: damaged: its sha256 differs from the manifest's")
    return manifest


def _tags_newest_first(ckpt_dir: Path) -> list[Path]:
    tags = [p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("global_step")]
    return sorted(tags, key=lambda p: step_of(p.name), reverse=True)


def find_resumable(ckpt_dir: Path) -> tuple[Path | None, dict | None, list[str]]:
    """(tag directory, manifest, notes): the checkpoint `latest` names if it verifies, else the newest
    older one that does; notes say what was passed over and why. (None, None, notes) when none verifies."""
    notes: list[str] = []
    if not ckpt_dir.is_dir():
        return None, None, [f"no checkpoint directory {ckpt_dir}"]
    latest = ckpt_dir / LATEST
    named = latest.read_text().strip() if latest.exists() else None
    candidates = _tags_newest_first(ckpt_dir)
    if named is not None:
        candidates.sort(key=lambda p: p.name != named)  # `latest` first, then newest first
        candidates = [p for p in candidates if p.name == named or step_of(p.name) < step_of(named)]
        if not (ckpt_dir / named).is_dir():
            notes.append(f"'{LATEST}' names {named}, which does not exist")
    for tag_dir in candidates:
        try:
            return tag_dir, verify(tag_dir), notes
        except IncompleteCheckpoint as exc:
            notes.append(f"skipped {exc}")
    if not candidates and named is None:
        notes.append(f"no checkpoint in {ckpt_dir}")
    return None, None, notes


def resolve_checkpoint(path: Path, tag: str | None = None) -> tuple[Path, dict]:
    """(tag directory, manifest) of a complete checkpoint, verified; for tools.

    `path` is a checkpoint directory (its `latest`, or `tag`, is used) or a `global_step*` directory.
    """
    path = Path(path)
    if path.name.startswith(("global_step", TMP_PREFIX)) and tag is None:
        tag_dir = path
    else:
        if tag is None:
            if not (path / LATEST).exists():
                raise IncompleteCheckpoint(f"{path}: no '{LATEST}' file; not a checkpoint directory")
            tag = (path / LATEST).read_text().strip()
        tag_dir = path / tag
    return tag_dir, verify(tag_dir)


# --- the checkpointer (collective: every rank calls save/load/check_shared) ---


class Checkpointer:
    def __init__(
        self,
        ckpt_dir: Path,
        rank: int,
        world_size: int,
        keep: int = 2,
        after_rank_file: Callable[[int, int], None] | None = None,
    ):
        """`after_rank_file(step, rank)` runs once this rank's file is durable and before the manifest
        exists: tests pass a callable that kills the process there."""
        self.dir = Path(ckpt_dir)
        self.rank, self.world_size, self.keep = rank, world_size, keep
        self.after_rank_file = after_rank_file

    def check_shared(self) -> None:
        """Refuse a checkpoint directory that not every rank sees (node-local disks): resuming would split
        the ranks between a checkpoint and a fresh start."""
        token = all_gather_objects(uuid.uuid4().hex if self.rank == 0 else None)[0]
        probe = self.dir / f".shared-probe-{token}"
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            _atomic_write_text(probe, token)
        barrier()
        seen = probe.exists() and probe.read_text() == token
        views = all_gather_objects((seen, socket.gethostname()))
        if self.rank == 0:
            probe.unlink(missing_ok=True)
        blind = [f"rank {r} on {host}" for r, (ok, host) in enumerate(views) if not ok]
        if blind:
            raise ConfigError(
                f"{self.dir.resolve()}: the checkpoint directory is not shared by every rank "
                f"({', '.join(blind)} cannot see a file rank 0 wrote there); set run.output_dir to a "
                "filesystem that every node mounts (not node-local disk such as /tmp)"
            )

    def save(self, step: int, states: dict[str, Stateful], recipe: dict) -> Path:
        tag = tag_for(step)
        tmp_dir, tag_dir = self.dir / f"{TMP_PREFIX}{tag}", self.dir / tag
        if self.rank == 0:
            shutil.rmtree(tmp_dir, ignore_errors=True)  # a save that died before its rename
            tmp_dir.mkdir(parents=True)
        barrier()
        tensors, meta = {}, {"world_size": str(self.world_size)}
        for name, obj in states.items():
            t, rest = _split(name, obj.state_dict())
            tensors.update(t)
            meta[name] = json.dumps(rest)
        path = tmp_dir / rank_file(self.rank)
        save_file(tensors, str(path), metadata=meta)
        _fsync_file(path)
        _fsync_dir(tmp_dir)
        digest = file_digest(path)
        if self.after_rank_file:
            self.after_rank_file(step, self.rank)
        digests = all_gather_objects(digest)  # also: every rank's file is durable before the manifest
        if self.rank == 0:
            sharded = [obj for obj in states.values() if getattr(obj, "sharded", False)]
            owners = sharded[0].owners() if sharded else {}
            files = [rank_file(r) for r in range(self.world_size)]
            manifest = {
                "format": FORMAT,
                "step": step,
                "world_size": self.world_size,
                "files": files,
                "checksums": dict(zip(files, digests)),
                "owners": {name: rank_file(r) for name, r in owners.items()},
                "recipe": recipe,
            }
            _atomic_write_text(tmp_dir / MANIFEST, json.dumps(manifest, indent=1))
            replaced = None
            if tag_dir.exists():  # saved again at the same step (a resume that had nothing left to do)
                replaced = self.dir / f"{TMP_PREFIX}replaced-{tag}"
                shutil.rmtree(replaced, ignore_errors=True)
                os.rename(tag_dir, replaced)
            os.rename(tmp_dir, tag_dir)
            _fsync_dir(self.dir)
            _atomic_write_text(self.dir / LATEST, tag)
            if replaced:
                shutil.rmtree(replaced, ignore_errors=True)
            self._prune(tag)
        barrier()
        return tag_dir

    def _prune(self, newest: str) -> None:
        """Keep the newest `keep` checkpoints (the one just written, which verified as it was written,
        among them); delete older ones and leftovers of saves that died."""
        tags = _tags_newest_first(self.dir)
        kept = [p for p in tags if step_of(p.name) <= step_of(newest)][: self.keep]
        for p in tags:
            if p not in kept and step_of(p.name) < step_of(newest):
                shutil.rmtree(p, ignore_errors=True)
        for p in self.dir.glob(f"{TMP_PREFIX}*"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)

    def find(self) -> tuple[Path | None, dict | None, list[str]]:
        """Rank 0 resolves and verifies; every rank gets the same answer."""
        found = find_resumable(self.dir) if self.rank == 0 else None
        tag_dir, manifest, notes = all_gather_objects(found)[0]
        return tag_dir, manifest, notes

    def load(self, tag_dir: Path, manifest: dict, states: dict[str, Stateful]) -> list[str]:
        """Load every state from `tag_dir`. When the world size changed, a state with `load_resharded`
        (the data stream) gets every old rank's state, in rank order; returns the names of the per-rank
        states that were not restored because their per-rank meaning does not carry over (the RNG)."""
        same_world = manifest["world_size"] == self.world_size
        own = tag_dir / rank_file(self.rank if same_world else 0)
        with safe_open(str(own), framework="pt") as f:
            meta = f.metadata()
            own_keys = set(f.keys())
            own_tensors = {k: f.get_tensor(k) for k in own_keys} if same_world else {}
        skipped = []
        for name, obj in states.items():
            state = json.loads(meta[name])
            if getattr(obj, "sharded", False):
                state["tensors"] = self._gather_owned(tag_dir, manifest, name, obj.owned_names())
            elif not same_world and hasattr(obj, "load_resharded"):
                obj.load_resharded(self._every_rank_state(tag_dir, manifest, name))
                continue
            elif not same_world and name != "trainer":  # the trainer's state is the same on every rank
                skipped.append(name)
                continue
            else:
                prefix = name + "/"
                tensors = {k.removeprefix(prefix): v for k, v in own_tensors.items() if k.startswith(prefix)}
                if tensors:
                    state["tensors"] = tensors
            obj.load_state_dict(state)
        return skipped

    @staticmethod
    def _every_rank_state(tag_dir: Path, manifest: dict, name: str) -> list[dict]:
        """The JSON state `name` of every old rank (such states keep no tensors)."""
        states = []
        for file in manifest["files"]:
            with safe_open(str(tag_dir / file), framework="pt") as f:
                states.append(json.loads(f.metadata()[name]))
        return states

    @staticmethod
    def _gather_owned(tag_dir: Path, manifest: dict, name: str, wanted: list[str]) -> dict:
        by_file: dict[str, list[str]] = {}
        for param in wanted:
            by_file.setdefault(manifest["owners"][param], []).append(param)
        tensors = {}
        for file, params in by_file.items():
            with safe_open(str(tag_dir / file), framework="pt") as f:
                keys = [k.removeprefix(name + "/") for k in f.keys() if k.startswith(name + "/")]
                for param in params:
                    for key in (k for k in keys if k.startswith(param + "/")):
                        tensors[key] = f.get_tensor(f"{name}/{key}")
        return tensors
