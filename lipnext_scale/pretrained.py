"""Single-file fp32 weights: `model.safetensors` with the resolved recipe in its metadata."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lipnext_scale.config import Recipe, recipe_from_dict
from lipnext_scale.model.lipnext import LipNeXt, build_lipnext

RECIPE_KEY = "recipe"


def build_model(recipe: Recipe, activation_checkpointing: int | None = None) -> LipNeXt:
    """The recipe's model. `activation_checkpointing` overrides the recipe's; its "auto" needs the run's
    memory budget (the trainer resolves it with `memory_plan.resolve_activation_checkpointing`) and
    builds without recomputation here."""
    m = recipe.model
    if activation_checkpointing is None:
        ac = m.activation_checkpointing
        activation_checkpointing = 0 if ac == "auto" else ac
    return build_lipnext(
        m.size,
        num_classes=m.num_classes,
        image_size=m.image_size,
        patch=m.patch,
        alpha=m.alpha,
        beta=m.beta,
        activation_checkpointing=activation_checkpointing,
        compile_blocks=m.compile,
    )


def save_pretrained(
    path: str | Path, state: dict[str, torch.Tensor], recipe: Recipe, extra: dict | None = None
):
    """Write fp32 `state` atomically (temp file + rename), so a crash never leaves a half-written file."""
    bad = [k for k, v in state.items() if v.dtype != torch.float32]
    if bad:
        raise ValueError(f"save_pretrained stores fp32 weights only; not fp32: {', '.join(bad[:5])}")
    path = Path(path)
    metadata = {RECIPE_KEY: json.dumps(recipe.to_dict())}
    metadata.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_recipe(path: str | Path) -> Recipe:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if RECIPE_KEY not in metadata:
        raise ValueError(
            f"{path}: no '{RECIPE_KEY}' in the safetensors metadata; not a lipnext_scale model file"
        )
    return recipe_from_dict(json.loads(metadata[RECIPE_KEY]), f"{path} (embedded recipe)")


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> LipNeXt:
    """The fp32 model from a `model.safetensors`, in eval mode."""
    from safetensors.torch import load_file

    recipe = read_recipe(path)
    with torch.device("meta"):
        model = build_model(recipe)
    state = load_file(str(path), device=str(device))
    missing = set(model.state_dict()) - set(state)
    unexpected = set(state) - set(model.state_dict())
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not match the recipe: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    model.load_state_dict(state, assign=True)
    return model.float().eval()
