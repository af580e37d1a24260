"""Certified radii and certified robust accuracy (docs/soundness.md).

For a backbone with Lipschitz bound L and head rows w_i, the prediction ŷ cannot change within

    r(x) = min_{j≠ŷ} (z_ŷ − z_j) / (L · ‖w_ŷ − w_j‖₂)

The documented entry point takes the model and the images and computes the logits itself:

    radius, pred = certify(model, images)                  # fp32 mode
    radius, pred = certify(model, images, mode="sound")    # float64 classifier, rounding covered

Two modes (`MODES`):

- "fp32": the IEEE fp32 forward pass (eager, exact fp32 matmuls, never inside torch.autocast), with each
  block's P = fl(M·Rᵀ) formed once and the same P used in the forward pass and in L (so the rounding of
  the product is covered); L is rounded outward. The rounding of the forward pass itself is not covered:
  the certificate is for the real-arithmetic network evaluated at the fp32 logits, and a rounding attack
  can break points whose margin is within rounding of the boundary (`lipnext_scale.audit` measures how
  often).
- "sound": `lipnext_scale.sound`: the forward pass in float64 with a rigorous a-priori bound on its
  rounding error over the whole certified ball. The certificate holds for the float64 classifier exactly.

A point counts as certified at ε when radius > ε (the radius guarantees only ‖δ‖ < r).

`Certifier` takes a model in memory. `StreamedCertifier` gives the same fp32-mode certificates for a model
whose fp32 weights are spread over ranks (the trainer's evaluation): it fetches one block at a time and runs
the batches through it in chunks, so no rank holds the whole fp32 model.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from lipnext_scale import distributed
from lipnext_scale.model.layers import beta_abs, l2_spatial_pool, spatial_shift
from lipnext_scale.model.lipnext import LipNeXt
from lipnext_scale.rounding import U64, norm_up, operator_norm_bound, product_up, tensor_down, tensor_up, up

DEFAULT_EPS = (36 / 255, 72 / 255, 108 / 255, 1.0)
MODES = ("fp32", "sound")


def require_fp32(model: LipNeXt) -> None:
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise ValueError(f"certify with fp32 weights only; the model holds {sorted(map(str, dtypes))}")


# fp32 matmul settings that round to fewer mantissa bits: TF32 (10 bits) on GPUs, bf16 passes on CPUs.
_REDUCED_FP32_MATMULS = ("tf32", "bf16")


def _fp32_matmul_settings() -> dict[str, str]:
    b = torch.backends
    return {"cuda": b.cuda.matmul.fp32_precision, "mkldnn": b.mkldnn.matmul.fp32_precision}


def require_no_autocast() -> None:
    """Refuse to certify inside torch.autocast: it silently runs the matmuls in bf16/fp16, so the logits
    would not be those of the certified classifier. Leaving the region is the caller's decision."""
    autocast = [d for d in ("cpu", "cuda", "xpu", "mps") if _autocast_enabled(d)]
    if autocast:
        raise ValueError(
            f"certification inside a torch.autocast region ({', '.join(autocast)}): the logits would be "
            "computed in reduced precision; call certify() outside the autocast block"
        )


def require_exact_fp32_matmuls() -> None:
    """Refuse reduced-precision fp32 matmuls and autocast regions: both change the logits being certified.

    TF32 perturbs logits by about 1e-3 relative, far beyond what the certificate accounts for.
    `Certifier` computes its logits inside `exact_fp32_matmuls()` whatever the process set.
    """
    require_no_autocast()
    reduced = {k: v for k, v in _fp32_matmul_settings().items() if v in _REDUCED_FP32_MATMULS}
    if reduced:
        raise ValueError(
            f"reduced-precision fp32 matmuls are enabled ({reduced}, e.g. by "
            "torch.set_float32_matmul_precision('high')): certificates need exact fp32 logits; compute them "
            "inside lipnext_scale.exact_fp32_matmuls()"
        )


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type this build does not know
        return False


@contextlib.contextmanager
def exact_fp32_matmuls() -> Iterator[None]:
    """IEEE fp32 matmuls inside, whatever the process set (TF32 for training, say); restored on exit."""
    b = torch.backends
    saved = _fp32_matmul_settings()
    b.cuda.matmul.fp32_precision = b.mkldnn.matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        b.cuda.matmul.fp32_precision, b.mkldnn.matmul.fp32_precision = saved["cuda"], saved["mkldnn"]


@torch.no_grad()
def head_pair_distances(model: LipNeXt) -> torch.Tensor:
    """Upper bounds on ‖w_i − w_j‖₂ for all class pairs of the fp32-normalised head (as the fp32 forward
    pass forms its rows), in float64 on the model's device, by explicit differences rounded outward."""
    w = model.head.normalized_weight().detach().to(torch.float64)
    computed = torch.stack([norm_up(w - row, dim=1) for row in w])
    return tensor_up(computed * up(1.0 + 2.0 * U64))  # the subtraction's own rounding


def certified_radius(*_args, **_kwargs):
    """Removed: a radius from logits alone cannot know how they were computed. Use `certify`."""
    raise TypeError(
        "certified_radius(model, logits) is gone: it could not check that the logits came from the model, "
        "in fp32, outside autocast. Use lipnext_scale.certify(model, images[, mode='fp32'|'sound']) -> "
        "(radius, pred), or lipnext_scale.Certifier(model) to reuse the bound over many batches."
    )


def _distributed_norms(
    names: list[str], compute: Callable[[str], float], share, everywhere: frozenset[str] = frozenset()
) -> list[float]:
    """Operator-norm bounds of `names`, each computed by one rank (i % world == rank), the scalars
    summed across ranks (adding exact zeros is exact), except the `everywhere` names, which every rank
    computes for itself. `share` = (rank, world, all_reduce_sum on a float64 tensor placed by the caller),
    or None for one process."""
    if share is None:
        return [compute(n) for n in names]
    rank, world, reduce_sum = share
    split = [n for n in names if n not in everywhere]
    local = [compute(n) if i % world == rank else 0.0 for i, n in enumerate(split)]
    shared = dict(zip(split, reduce_sum(local)))
    return [shared[n] if n in shared else compute(n) for n in names]


class Certifier:
    """Certified radii of one model's fp32 weights; the bound and head distances computed once.

    `share` splits the per-matrix bound work across ranks (see `_distributed_norms`); every rank then
    forms L as the same product in the same order. In fp32 mode each rank bounds the products P̂ its own
    forward applies, so L may differ across ranks in its last bits; each rank's certificates use its own.
    """

    def __init__(self, model: LipNeXt, mode: str = "fp32", share=None):
        if mode not in MODES:
            raise ValueError(f"certification mode {mode!r}; allowed: {', '.join(MODES)}")
        require_fp32(model)
        require_no_autocast()
        self.model, self.mode = model, mode
        with torch.no_grad(), exact_fp32_matmuls():
            self.products = model.mixing_products() if mode == "fp32" else None
            factors = model.lipschitz_factors(self.products)
            matrices = dict(factors)  # unique names
            names = list(matrices)
            # Each rank forms its own P̂ = fl(M·Rᵀ), and cuBLAS does not promise the same rounding on every
            # GPU, so every rank bounds the P̂ its own forward applies (a few float64 W³ products per block,
            # on the device); the weights themselves are identical everywhere, so their work is split.
            own = frozenset(n for n in names if n.endswith(".P"))
            bound = lambda n: operator_norm_bound(matrices[n])  # noqa: E731
            norms = dict(zip(names, _distributed_norms(names, bound, share, own)))
            self.lipschitz = product_up(norms[name] for name, _ in factors)
            if mode == "sound":
                from lipnext_scale.sound import SoundCertifier

                self.sound = SoundCertifier(model, self.lipschitz, norms)
            else:
                self.distances = head_pair_distances(model)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """The fp32 logits this certifier certifies: eager, exact fp32 matmuls, P formed once per block.
        (In sound mode: the float64 logits of the float64 classifier.)"""
        require_no_autocast()
        device = self.model.embed.weight.device
        if self.mode == "sound":
            return self.sound.logits_and_error(images.to(device))[0]
        with exact_fp32_matmuls():
            return fp32_forward(self.model, images.to(device=device, dtype=torch.float32), self.products)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(radius, pred) per image, radius in the L2 norm of pixel space; certified at ε iff radius > ε."""
        require_no_autocast()
        device = self.model.embed.weight.device
        if self.mode == "sound":
            return self.sound(images.to(device=device, dtype=torch.float32))
        return radius_from_logits(self.logits(images), self.lipschitz, self.distances)


def certify(model: LipNeXt, images: torch.Tensor, mode: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """(radius, pred) per image of `model` (fp32 weights) at `images` (in [0, 1], (B, 3, H, W)).

    pred is the prediction of the certified classifier (mode "fp32": the IEEE fp32 forward pass; "sound":
    the float64 one), and no x' with ‖x' − x‖₂ < radius changes it (in "fp32" mode: up to the rounding
    of the forward pass, which only "sound" covers). Refused inside torch.autocast or with reduced-
    precision fp32 matmuls. For many batches build one `Certifier(model, mode)` and call it per batch.
    """
    return Certifier(model, mode)(images)


# fetch(names) starts sending those fp32 weights to this rank and returns wait() -> {name: tensor}; collective
# when the weights live on several ranks (`ShardedManifoldOptimizer.fetch_fp32`).
Fetch = Callable[[list[str]], Callable[[], dict[str, torch.Tensor]]]


def streamed_names(model: LipNeXt) -> tuple[list[str], list[tuple[str, str]]]:
    """(resident names, (R, M) of each block): what `StreamedCertifier` holds throughout, what it streams."""
    blocks = [(f"blocks.{i}.R", f"blocks.{i}.M") for i in range(len(model.blocks))]
    streamed = {name for pair in blocks for name in pair}
    return [n for n, _ in model.named_parameters() if n not in streamed], blocks


def in_memory(state: dict[str, torch.Tensor]) -> Fetch:
    """A `Fetch` over fp32 weights already held, e.g. a model's `state_dict()` (one process, nothing sent)."""
    return lambda names: lambda: {name: state[name] for name in names}


class StreamedCertifier:
    """fp32-mode certification of a model whose fp32 weights are never all on this rank at once.

    Held throughout: the small parameters (stem, head, positional terms, biases: `streamed_names`) and the
    head distances. Streamed: each block's R and M, fetched from their owners (`fetch`, the next block's while
    this one computes), used, dropped. The validation batches go through block-major in chunks: a chunk of
    batches is embedded, then block k is fetched, its P̂ = fl(M·Rᵀ) formed as `LipNeXt.mixing_products` forms
    it, ‖P̂‖ bounded, and every batch of the chunk passed through it, then block k + 1, and so on; the chunk's
    logits give its radii at the end.

    Trade-off: memory against communication. Per rank the evaluation holds the resident parameters, at most
    two blocks' R and M (the one in use, the next arriving) and its P̂, the chunk's activations (one
    N·W fp32 tensor per batch, N = batch·tokens, and one batch's block intermediates), and the float64 bound
    of one matrix — no full fp32 copy and no list of every block's P̂. Each chunk receives every block matrix
    once: (number of chunks) × the fp32 block bytes per evaluation, where gathering the model once cost one.
    So chunks are made as large as memory allows (`memory_plan.evaluation_plan` sizes them to the training
    phases' peak), and with one rank nothing is sent: `fetch` hands out the masters themselves.

    Soundness, as `Certifier`: the P̂ bounded is the P̂ the forward applies. A chunk forms its own P̂ of each
    block and bounds it, and that chunk's certificates use the L of its own P̂s: no assumption that forming
    P̂ again gives the same bits (cuBLAS promises that only on the same GPU model, same settings). Where it
    does (CPUs, one GPU), every chunk's L is the `Certifier`'s L, and the radii, predictions and counts are
    bit for bit those of `Certifier` on the gathered model (tests/test_streamed_certify.py). The bounds of E
    and of each R depend on the weights only, identical everywhere: they are computed once, in the first
    chunk, split across ranks as `Certifier` splits them, the scalars summed. Bounding P̂ again per chunk
    costs ~8·W³ float64 FLOPs per block per chunk (the chunk's forward: 4·N·W² fp32 per block).

    Collective when `fetch` is: every rank constructs it and calls `counts`. The ranks agree on the number of
    chunks first (the largest over ranks, one scalar all-reduce); a rank whose batches run out first takes
    part in the later chunks' fetches with no batches of its own, so unequal batch counts or chunk sizes
    cannot hang them.
    """

    def __init__(self, skeleton: LipNeXt, fetch: Fetch):
        """`skeleton`: the model's structure (e.g. built on the meta device); its resident parameters are
        replaced by the fetched fp32 ones, its R and M are never read."""
        require_no_autocast()
        resident, self.block_names = streamed_names(skeleton)
        weights = fetch(resident)()
        skeleton.load_state_dict(weights, assign=True, strict=False)
        skeleton.eval()
        self.model, self.fetch = skeleton, fetch
        self.device = skeleton.embed.weight.device
        _require_fp32_tensors(weights)
        # The weight-only bounds, in `Certifier`'s order: E, then each block's R; rank i % world does entry i.
        self._rank, self._world = distributed.rank(), distributed.world_size()
        self._weight_norms: list[float] | None = None
        self._local = [operator_norm_bound(skeleton.embed.weight) if self._assigned(0) else 0.0]
        with torch.no_grad():
            self.distances = head_pair_distances(skeleton)
        self.lipschitz = 0.0  # the largest L any chunk certified with (this rank)

    def _assigned(self, index: int) -> bool:
        return index % self._world == self._rank

    @torch.no_grad()
    def counts(
        self,
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
        eps_list: list[float],
        chunk_batches: int,
        keep: list | None = None,
    ) -> torch.Tensor:
        """[correct, certified at each ε…, total] over `batches` (with a length: a list, a loader), as
        `certification_counts`, `chunk_batches` batches at a time (collective when `fetch` is)."""
        require_no_autocast()
        counts = torch.zeros(len(eps_list) + 2, dtype=torch.long)
        chunk_batches = max(1, chunk_batches)
        chunks = int(distributed.max_over_ranks(float(-(-len(batches) // chunk_batches))))
        iterator = iter(batches)
        for _ in range(chunks):
            xs, labels = [], []  # each batch's images are dropped once embedded
            with exact_fp32_matmuls():
                for images, y in itertools.islice(iterator, chunk_batches):
                    x = images.to(device=self.device, dtype=torch.float32) - 0.5
                    del images
                    xs.append(self.model.embed(x.to(self.model.embed.weight.dtype)))
                    labels.append(y)
                    del x
            logits, lipschitz = self._through_blocks(xs)
            self.lipschitz = max(self.lipschitz, lipschitz)
            for z, y in zip(logits, labels, strict=True):
                radius, pred = radius_from_logits(z, lipschitz, self.distances)
                _count(counts, radius, pred, y, eps_list, keep)
        return counts

    def _through_blocks(self, xs: list[torch.Tensor]) -> tuple[list[torch.Tensor], float]:
        """Each block, fetched in turn, applied to every batch of the chunk: (logits per batch, chunk L)."""
        blocks = self.model.blocks
        pending = self.fetch(list(self.block_names[0]))
        p_norms = []
        first = self._weight_norms is None
        with exact_fp32_matmuls():
            for i, block in enumerate(blocks):
                weights = pending()
                if i + 1 < len(blocks):
                    pending = self.fetch(list(self.block_names[i + 1]))
                _require_fp32_tensors(weights)
                r, m = (weights[name] for name in self.block_names[i])
                p = m @ r.t()  # as `LipNeXt.mixing_products` forms it
                p_norms.append(operator_norm_bound(p))
                if first:
                    self._local.append(operator_norm_bound(r) if self._assigned(i + 1) else 0.0)
                for j in range(len(xs)):  # (a loop variable would keep the last input alive)
                    xs[j] = _block_forward(block, xs[j], p, r)
                del weights, r, m, p
            logits = [self.model.head(l2_spatial_pool(x)).float() for x in xs]
        del xs[:]
        if first:
            self._weight_norms = distributed.sum_over_ranks(self._local)
        embed, r_norms = self._weight_norms[0], self._weight_norms[1:]
        lipschitz = product_up([embed, *(f for pair in zip(r_norms, p_norms, strict=True) for f in pair)])
        return logits, lipschitz


def _require_fp32_tensors(weights: dict[str, torch.Tensor]) -> None:
    dtypes = {t.dtype for t in weights.values()}
    if dtypes - {torch.float32}:
        raise ValueError(f"certify with fp32 weights only; fetched {sorted(map(str, dtypes))}")


def radius_from_logits(
    logits: torch.Tensor, lipschitz: float, distances: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """min_{j≠ŷ} (z_ŷ − z_j) / (L·d_ŷj) in float64, the margin rounded down and the divisor up."""
    z = logits.detach().to(torch.float64)
    pred = z.argmax(dim=1)
    margins = tensor_down(z.gather(1, pred[:, None]) - z)
    divisor = tensor_up(lipschitz * distances.to(z.device)[pred])
    ratio = tensor_down(margins / divisor).clamp_min(0.0)
    ratio.scatter_(1, pred[:, None], math.inf)
    return ratio.min(dim=1).values, pred


def fp32_forward(model: LipNeXt, images: torch.Tensor, products: list[torch.Tensor]) -> torch.Tensor:
    """The model's forward pass with each block's P = M·Rᵀ given (formed once by the caller), eager.

    Op for op what `LipNeXtBlock.forward` does in its fused form (tests/test_certify.py compares the
    logits), but with the P whose norm the bound measured rather than one recomputed per call: this P-once
    forward *is* the certified fp32 classifier, whatever form training uses.
    """
    x = model.embed((images - 0.5).to(model.embed.weight.dtype))
    for block, p in zip(model.blocks, products, strict=True):
        x = _block_forward(block, x, p)
    return model.head(l2_spatial_pool(x)).float()


def _block_forward(block, x: torch.Tensor, p: torch.Tensor, r: torch.Tensor | None = None) -> torch.Tensor:
    # A function of its own so that its intermediates die on return, as in the block's own forward. `r`: the
    # block's R when it is not held by the block itself (`StreamedCertifier`); the same ops either way.
    r = block.R if r is None else r
    shifted = spatial_shift((x + block.pos) @ r.t(), block.alpha)
    return beta_abs(F.linear(shifted, p, block.bias), block.beta)


@torch.no_grad()
def certification_counts(
    certifier: Certifier,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    eps_list: list[float],
    keep: list | None = None,
) -> torch.Tensor:
    """[correct, certified at each ε…, total] over `batches`: counts, so ranks can sum theirs.

    Certified at ε: correct and radius > ε. With `keep` (a list), (radius, pred, label) of every batch
    is appended to it on the CPU.
    """
    model = certifier.model
    was_training = model.training
    model.eval()
    counts = torch.zeros(len(eps_list) + 2, dtype=torch.long)
    try:
        for images, labels in batches:
            radius, pred = certifier(images)
            _count(counts, radius, pred, labels, eps_list, keep)
    finally:
        model.train(was_training)
    return counts


def _count(counts: torch.Tensor, radius, pred, labels, eps_list: list[float], keep: list | None) -> None:
    radius, pred, labels = radius.cpu(), pred.cpu(), labels.cpu()
    hit = pred == labels
    counts[0] += hit.sum()
    counts[1:-1] += torch.stack([(hit & (radius > eps)).sum() for eps in eps_list])
    counts[-1] += len(labels)
    if keep is not None:
        keep.append((radius, pred, labels))


def summarize(counts: torch.Tensor, eps_list: list[float], lipschitz: float, mode: str = "fp32") -> dict:
    total = int(counts[-1])
    if total == 0:
        raise ValueError("evaluation saw no samples")
    return {
        "clean_acc": int(counts[0]) / total,
        "cra": [{"eps": eps, "cra": int(c) / total} for eps, c in zip(eps_list, counts[1:-1])],
        "lipschitz_bound": lipschitz,
        "num_samples": total,
        "mode": mode,
    }


def evaluate(
    model: LipNeXt,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    eps_list: Iterable[float] = DEFAULT_EPS,
    mode: str = "fp32",
) -> dict:
    """Clean accuracy and CRA at each ε over `batches` of (images in [0,1], labels); fp32 weights only."""
    eps_list = list(eps_list)
    certifier = Certifier(model, mode)
    counts = certification_counts(certifier, batches, eps_list)
    return summarize(counts, eps_list, certifier.lipschitz, mode)


def format_table(result: dict) -> str:
    """The clean/CRA table printed at the end of a run."""
    lines = [f"{'ε':>10}  {'accuracy':>9}", f"{'clean':>10}  {100 * result['clean_acc']:8.2f}%"]
    for row in result["cra"]:
        lines.append(f"{row['eps']:10.4f}  {100 * row['cra']:8.2f}%")
    mode = result.get("mode", "fp32")
    lines.append(
        f"Lipschitz bound of the backbone: {result['lipschitz_bound']:.6f} (fp32 weights, float64, "
        f"rounded outward; {mode} mode)"
    )
    return "\n".join(lines)
