"""Model FLOPs of LipNeXt, defined once: the trainer's MFU log and tools/bench_block.py both use these.

A matmul of an (m, k) by a (k, n) matrix counts 2·m·k·n FLOPs; its backward counts twice that (the input's
and the weight's gradient), except where no input gradient is needed (the images). For one micro-batch of
B images with T = (S/p)² tokens each, N = B·T tokens, width W, depth L, patch dimension D = 3p², C classes:

    stem         forward 2·N·D·W                 backward 2·N·D·W   (the weight's gradient only)
    per block    forward 2·N·W² (·Rᵀ)            backward 2× forward
                 + fused (N ≥ W):   2·N·W² (·Pᵀ) + 2·W³ to form P = M·Rᵀ;   backward 2·(2·N·W²) + 4·W³
                 + unfused (N < W): 2·(2·N·W²)   (·R, then ·Mᵀ);             backward 2× forward
    head         forward 2·B·W·C                 backward 4·B·W·C

(`layers.fuse_second_mix` chooses the block's form by the same arithmetic.) Left out, each well under 0.1%
of the total at the ImageNet recipes: element-wise work (shift, β-Abs, bias, positional term, pooling) and
the loss's O(C²·W) class-pair distances. These are *model* FLOPs: activation checkpointing recomputes blocks
(hardware FLOPs), which is not counted, so MFU shows what recomputation costs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lipnext_scale.config import ModelConfig
from lipnext_scale.model.layers import fuse_second_mix
from lipnext_scale.model.lipnext import SIZES

# Dense bf16 peak FLOP/s per GPU, by a name in `torch.cuda.get_device_name()`. The H200 figure is the bf16
# 8192³ matmul rate measured on our H200 (DESIGN.md §7), not its datasheet's 989e12; a GPU not listed
# gets FLOP/s logged and no MFU.
PEAK_BF16_FLOPS = {
    "H200": 790e12,
    "H100": 989e12,
    "A100": 312e12,
}


@dataclass(frozen=True)
class Flops:
    forward: float
    backward: float

    @property
    def total(self) -> float:
        return self.forward + self.backward

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.forward + other.forward, self.backward + other.backward)

    def __mul__(self, k: float) -> Flops:
        return Flops(self.forward * k, self.backward * k)


def block_flops(tokens: int, width: int) -> Flops:
    """One block on `tokens` tokens (a whole micro-batch: the W³ product is formed once per forward)."""
    n, w = tokens, width
    token_matmul = 2 * n * w * w
    if fuse_second_mix(n, w):
        return Flops(2 * token_matmul + 2 * w**3, 2 * 2 * token_matmul + 4 * w**3)
    return Flops(3 * token_matmul, 2 * 3 * token_matmul)


def model_flops(model: ModelConfig, micro_batch: int) -> Flops:
    """Forward and backward FLOPs of one training micro-batch of `micro_batch` images."""
    depth, width = SIZES[model.size]
    n = micro_batch * (model.image_size // model.patch) ** 2
    stem = 2 * n * 3 * model.patch**2 * width
    head = 2 * micro_batch * width * model.num_classes
    return Flops(stem, stem) + block_flops(n, width) * depth + Flops(head, 2 * head)


def flops_per_image(model: ModelConfig, micro_batch: int) -> float:
    """Training (forward + backward) FLOPs per image at this micro-batch."""
    return model_flops(model, micro_batch).total / micro_batch


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The peak FLOP/s MFU is measured against, or None where we have no figure (CPUs, fp32, other GPUs)."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)
