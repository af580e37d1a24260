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


def count_compiled_calls(model) -> list:
    """Wraps each block's compiled forward (what `Module.compile` installed) to count the calls that reach it:
    a block called some other way (e.g. `checkpoint(block.forward, …)`) runs eager and is not counted."""
    calls = []
    for block in model.blocks:
        compiled = block._compiled_call_impl
        assert compiled is not None, "model.compile=true must compile every block"

        def counted(*args, _compiled=compiled, **kwargs):
            calls.append(1)
            return _compiled(*args, **kwargs)

        block._compiled_call_impl = counted
    return calls


@pytest.mark.parametrize("every", [0, 1])
def test_compiled_blocks_match_within_1e6(reference, every):
    model = build("model.compile=true", f"model.activation_checkpointing={every}", state=reference["state"])
    calls = count_compiled_calls(model)
    loss, grads = loss_and_grads(model, reference["images"], reference["labels"])

    # Dynamo compiled the block (in this case, or in the first one: all blocks share one code object), and
    # every block ran that compiled code: once forward, and once more in backward where it is checkpointed.
    assert counters["frames"]["ok"] >= 1
    depth = len(model.blocks)
    assert len(calls) == depth + (depth if every == 1 else 0)
    assert abs(loss - reference["loss"]) <= 1e-6 * max(1.0, abs(reference["loss"].item()))
    for name, grad in grads.items():
        ref = reference["grads"][name]
        # Rounding of re-ordered fp32 reductions: relative to the tensor's scale.
        assert (grad - ref).abs().max() <= 1e-6 * ref.abs().max(), name


def test_compiled_blocks_certify_like_eager_blocks(reference, tmp_path):
    """The evaluation and certification path (eval mode, no autograd): a recipe with model.compile=true,
    saved and reloaded as tools/certify.py does, gives the eager model's logits and certificates."""
    from lipnext_scale.certify import Certifier
    from lipnext_scale.pretrained import load_pretrained, save_pretrained

    eager = build(state=reference["state"]).eval()
    recipe = load_recipe(QUICKSTART, [*SMALL, "model.compile=true"])
    save_pretrained(tmp_path / "model.safetensors", reference["state"], recipe)
    models = {"built": build("model.compile=true", state=reference["state"]).eval()}
    models["reloaded"] = load_pretrained(tmp_path / "model.safetensors")
    images = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_logits = eager(images)
        ref_radius, ref_pred = Certifier(eager)(images)
        for how, model in models.items():
            assert all(block._compiled_call_impl is not None for block in model.blocks), how
            # The compiled blocks' own eval forward: fp32 rounding of re-ordered reductions only.
            logits = model(images)
            assert (logits - ref_logits).abs().max() <= 1e-6 * ref_logits.abs().max(), how
            # Certification is eager whatever the recipe compiles (lipnext_scale.certify.fp32_forward), so a
            # compiled model's certificates are the eager model's, bit for bit.
            radius, pred = Certifier(model)(images)
            assert torch.equal(pred, ref_pred) and torch.equal(radius, ref_radius), how
