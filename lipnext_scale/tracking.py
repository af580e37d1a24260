"""What a run records about itself (recipe, code, libraries, hardware); optional Weights & Biases logging."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

LIBRARIES = (
    "lipnext_scale",
    "torch",
    "deepspeed",
    "nvidia-dali-cuda120",
    "webdataset",
    "safetensors",
    "wandb",
)


def _git_commit() -> dict:
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = (
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=repo,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            != ""
        )
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _hardware(world_size: int) -> dict:
    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else []
    )
    return {
        "host": platform.node(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "gpus_on_host": gpus,
        "world_size": world_size,
    }


def run_info(recipe_dict: dict, world_size: int) -> dict:
    return {
        "recipe": recipe_dict,
        "git": _git_commit(),
        "versions": _versions(),
        "hardware": _hardware(world_size),
    }


class WandbLogger:
    """Weights & Biases, offline unless WANDB_MODE says otherwise: no network needed; `wandb sync` later."""

    def __init__(self, out_dir: Path, project: str, name: str, config: dict):
        import wandb

        os.environ.setdefault("WANDB_MODE", "offline")
        self.run = wandb.init(project=project, name=name, dir=str(out_dir), config=config)

    def log(self, scalars: dict, step: int) -> None:
        self.run.log({k: v for k, v in scalars.items() if isinstance(v, int | float)}, step=step)

    def finish(self) -> None:
        self.run.finish()
