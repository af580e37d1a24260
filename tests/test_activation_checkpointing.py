"""Activation checkpointing changes nothing numerically; `model.compile` changes only rounding (CPU, fp32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from lipnext_scale.config import load_recipe
from lipnext_scale.loss import classification_loss
from lipnext_scale.pretrained import build_model

QUICKSTART = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml"
SMALL = ["model.size=L6W64", "train.precision=fp32"]  # 6 blocks of width 64, 8×8 tokens


def build(*overrides: str, state: dict | None = None):
    model = build_model(load_recipe(QUICKSTART, [*SMALL, *overrides]))
    if state is not None:
        model.load_state_dict(state)  # strict: also proves compiling keeps the parameter names
    return model.train()


def loss_and_grads(model, images, labels) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training micro-step as the trainer computes it (EMMA loss with the normalised head rows)."""
    logits = model(images)
    loss = classification_loss("emma", logits, labels, model.head.normalized_weight().float(), 36 / 255)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = build()
    images, labels = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    loss, grads = loss_and_grads(model, images, labels)
    assert all(g.abs().max() > 0 for g in grads.values())
    return {"state": model.state_dict(), "images": images, "labels": labels, "loss": loss, "grads": grads}


@pytest.mark.parametrize("every", [1, 2])
def test_checkpointing_is_bit_identical(reference, every):
    model = build(f"model.activation_checkpointing={every}", state=reference["state"])
    calls = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda *_: calls.append(1))
    loss, grads = loss_and_grads(model, reference["images"], reference["labels"])

    depth = len(model.blocks)
    recomputed = len(range(0, depth, every))
    assert len(calls) == depth + recomputed  # checkpointed blocks really ran again in backward
    assert torch.equal(loss, reference["loss"])
    assert grads.keys() == reference["grads"].keys()
    for name, grad in grads.items():
        assert torch.equal(grad, reference["grads"][name]), name


@pytest.mark.parametrize("every", [0, 1])
def test_compiled_blocks_match_within_1e6(reference, every):
    frames = counters["frames"]["ok"]
    model = build("model.compile=true", f"model.activation_checkpointing={every}", state=reference["state"])
    loss, grads = loss_and_grads(model, reference["images"], reference["labels"])

    assert all(block._compiled_call_impl is not None for block in model.blocks)
    assert counters["frames"]["ok"] > frames or every == 1  # the second case reuses the compiled blocks
    assert counters["frames"]["ok"] >= 1
    assert abs(loss - reference["loss"]) <= 1e-6 * max(1.0, abs(reference["loss"].item()))
    for name, grad in grads.items():
        ref = reference["grads"][name]
        # Rounding of re-ordered fp32 reductions: relative to the tensor's scale.
        assert (grad - ref).abs().max() <= 1e-6 * ref.abs().max(), name
