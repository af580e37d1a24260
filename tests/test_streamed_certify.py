"""The streamed evaluation (certify.StreamedCertifier over ShardedManifoldOptimizer.fetch_fp32) on 1, 2 and 4
gloo ranks against the single-process `Certifier` on the whole model: the same radii, predictions, counts and
Lipschitz bound, bit for bit, whatever the chunk size, with each rank holding only the masters it owns."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lipnext_scale.build import manifold_hyper, named_parameters_with_kinds
from lipnext_scale.certify import Certifier, StreamedCertifier, certification_counts, in_memory
from lipnext_scale.config import load_recipe
from lipnext_scale.optim.sharded import ShardedManifoldOptimizer
from lipnext_scale.pretrained import build_model
from lipnext_scale.trainer import Trainer
from tests.conftest import QUICKSTART

EPS = [0.01, 0.03, 0.1, 0.3]
CHUNKS = (1, 2, 3, 64)


def _recipe():
    return load_recipe(QUICKSTART, ["model.size=L6W64", "model.beta=0.5"])


def _model(recipe):
    """The same model on every rank: its weights moved off the manifold a little, so that every bound is
    above 1 and differs from matrix to matrix (a bound taken from the wrong matrix would show)."""
    torch.manual_seed(0)
    model = build_model(recipe)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    return model.eval()


def _batches(rank: int, count: int, recipe) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + rank)
    size, classes = recipe.model.image_size, recipe.model.num_classes
    return [
        (torch.rand(5, 3, size, size, generator=g), torch.randint(0, classes, (5,), generator=g))
        for _ in range(count)
    ]


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb, strict=True)
    )


def _worker(rank: int, world: int, store: str, bf16: bool, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        recipe = _recipe()
        model = _model(recipe)
        # Unequal batch counts across ranks: rank 0 has one more (the others join its last chunk's fetches).
        batches = _batches(rank, 4 if rank == 0 else 3, recipe)
        reference = Certifier(model)
        expected = []
        expected_counts = certification_counts(reference, batches, EPS, keep=expected)
        fp32_counts = certification_counts(reference, batches, recipe.certify.eps)
        sound = Certifier(model, "sound")
        sound_counts = certification_counts(sound, batches, recipe.certify.eps)
        optimizer = ShardedManifoldOptimizer(named_parameters_with_kinds(model), manifold_hyper(recipe))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if bf16:  # as the trainer casts: the fp32 masters are the owners' own copies
                    p.data = p.data.to(torch.bfloat16)
                if optimizer.owners[name] != rank:  # what this rank does not own, it must fetch
                    p.data.fill_(math.nan)
        results = []
        for chunk in CHUNKS:
            certifier = StreamedCertifier(Trainer.fp32_model(recipe), optimizer.fetch_fp32)
            kept = []
            counts = certifier.counts(batches, EPS, chunk, keep=kept)
            results.append(
                (chunk, torch.equal(counts, expected_counts), _same(kept, expected),
                 certifier.lipschitz == reference.lipschitz)
            )  # fmt: skip
        # The trainer's entry point: fp32 mode streams (its default eps), sound mode gathers every master.
        counts, lipschitz = Trainer.certified_counts(recipe, optimizer, batches, 2)
        same_bound = lipschitz == reference.lipschitz
        results.append(("trainer fp32", torch.equal(counts, fp32_counts), True, same_bound))
        sound_recipe = load_recipe(QUICKSTART, ["model.size=L6W64", "model.beta=0.5", "certify.mode=sound"])
        counts, lipschitz = Trainer.certified_counts(sound_recipe, optimizer, batches, 2)
        same_bound = lipschitz == sound.lipschitz
        results.append(("trainer sound", torch.equal(counts, sound_counts), True, same_bound))
        torch.save({"results": results, "lipschitz": reference.lipschitz}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world,bf16", [(2, False), (2, True), (4, False)])
def test_streamed_evaluation_equals_the_gathered_certifier(tmp_path, world, bf16):
    out = str(tmp_path / "result")
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), bf16, out), nprocs=world, join=True)
    for rank in range(world):
        r = torch.load(f"{out}.{rank}")
        assert r["lipschitz"] > 1.0
        for chunk, counts, radii, lipschitz in r["results"]:
            assert counts and radii and lipschitz, (rank, chunk, counts, radii, lipschitz)


def test_streamed_certifier_in_one_process_is_the_certifier():
    """No process group: `in_memory` over a model's own weights, every chunk size, bit for bit."""
    recipe = _recipe()
    model = _model(recipe)
    batches = _batches(0, 5, recipe)
    reference = Certifier(model)
    expected = []
    expected_counts = certification_counts(reference, batches, EPS, keep=expected)
    for chunk in CHUNKS:
        certifier = StreamedCertifier(Trainer.fp32_model(recipe), in_memory(dict(model.named_parameters())))
        kept = []
        assert torch.equal(certifier.counts(batches, EPS, chunk, keep=kept), expected_counts)
        assert _same(kept, expected) and certifier.lipschitz == reference.lipschitz


def test_streamed_certifier_refuses_bf16_weights():
    recipe = _recipe()
    state = {k: v.to(torch.bfloat16) for k, v in _model(recipe).state_dict().items()}
    with pytest.raises(ValueError, match="fp32"):
        StreamedCertifier(Trainer.fp32_model(recipe), in_memory(state))
