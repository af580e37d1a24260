#!/usr/bin/env python
"""Speed of one LipNeXt block against its two matrix multiplications, and of the whole model.

    python tools/bench_block.py RECIPE.yaml [--micro-batch B] [--steps 10] [--peak-tflops P] [key=value ...]

Measured side by side in one run, forward + backward, median over steps after warm-up:

- the block Z = β-Abs(M·Rᵀ·Shift((X + p)·Rᵀ) + b) at the recipe's width, token grid and precision, in the
  form the model picks for N tokens (fused M·Rᵀ when N ≥ W, else two token matmuls: layers.fuse_second_mix);
- the same token matmuls alone (X·Rᵀ, then ·(M·Rᵀ)ᵀ with the W×W product, or ·R then ·Mᵀ), i.e. the block
  without shift, β-Abs, positional term and bias: the share of the block's time beyond them is the
  non-matmul share;
- the whole model (stem, every block, pooling, head): images/s.

FLOPs: the model's definition in lipnext_scale/flops.py (block: `block_flops`, model: `model_flops`).
MFU = achieved FLOP/s over `--peak-tflops` (default: flops.PEAK_BF16_FLOPS for a known GPU in bf16;
0 = not reported).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lipnext_scale.build import resolve_precision
from lipnext_scale.config import load_recipe
from lipnext_scale.flops import block_flops, model_flops, peak_flops
from lipnext_scale.model.layers import LipNeXtBlock, fuse_second_mix, random_orthogonal
from lipnext_scale.pretrained import build_model


def timed(fns: list, steps: int, device: torch.device) -> list[float]:
    """Median seconds of each function, run in turn within every step so that drifts in the machine's
    speed hit all of them alike (their ratios are what the benchmark reports)."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(steps):
        for fn, out in zip(fns, times):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument(
        "--micro-batch", type=int, default=0, help="default: the recipe's train.micro_batch_size"
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--no-model", action="store_true", help="skip the whole-model measurement")
    args = parser.parse_intermixed_args()

    recipe = load_recipe(args.recipe, args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_precision(recipe.train.precision, device)
    m = recipe.model
    batch = args.micro_batch or recipe.train.micro_batch_size or 8
    tokens = m.image_size // m.patch
    with torch.device("meta"):
        width = build_model(recipe).blocks[0].R.shape[0]
    n_tokens = batch * tokens * tokens

    block = LipNeXtBlock(width, (tokens, tokens), m.alpha, m.beta)
    with torch.no_grad():
        block.R.copy_(random_orthogonal(width, width))
        block.M.copy_(random_orthogonal(width, width))
    block = block.to(device=device, dtype=dtype)
    x = torch.randn(batch, tokens, tokens, width, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn_like(x)

    def block_step():
        torch.autograd.backward(block(x), grad_out)

    fused = fuse_second_mix(n_tokens, width)

    def matmuls_step():
        mixed = F.linear(x, block.R)
        y = F.linear(mixed, block.M @ block.R.t()) if fused else F.linear(mixed @ block.R, block.M)
        torch.autograd.backward(y, grad_out)

    t_block, t_mm = timed([block_step, matmuls_step], args.steps, device)
    flops = block_flops(n_tokens, width).total
    peak = args.peak_tflops
    if peak is None:
        peak = (peak_flops(device, dtype) or 0.0) / 1e12
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    form = "fused M·Rᵀ" if fused else "unfused (two token matmuls)"
    print(
        f"{m.size}  width {width}  tokens {tokens}x{tokens}  micro-batch {batch}  {dtype}  on {name}  {form}"
    )
    print(f"block fwd+bwd          {1e3 * t_block:9.3f} ms   {flops / t_block / 1e12:8.2f} TFLOP/s")
    print(f"two matmuls fwd+bwd    {1e3 * t_mm:9.3f} ms   {flops / t_mm / 1e12:8.2f} TFLOP/s")
    print(f"non-matmul share       {max(0.0, 1 - t_mm / t_block):9.1%}")
    if peak:
        print(f"block MFU              {flops / t_block / 1e12 / peak:9.1%}   (peak {peak:g} TFLOP/s)")

    if not args.no_model:
        model = build_model(recipe).to(device=device, dtype=dtype)
        images = torch.rand(batch, 3, m.image_size, m.image_size, device=device)
        labels = torch.randint(0, m.num_classes, (batch,), device=device)

        def model_step():
            F.cross_entropy(model(images), labels).backward()

        (t_model,) = timed([model_step], args.steps, device)
        total = model_flops(m, batch).total
        print(
            f"model fwd+bwd          {1e3 * t_model:9.3f} ms   {batch / t_model:8.1f} images/s   "
            f"{total / t_model / 1e12:.2f} TFLOP/s"
            + (f"   MFU {total / t_model / 1e12 / peak:.1%}" if peak else "")
        )


if __name__ == "__main__":
    main()
