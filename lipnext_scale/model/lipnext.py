"""LipNeXt: centering → patch embedding → L blocks → L2 pooling → LLN head (DESIGN.md §1)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lipnext_scale.model.layers import (
    LipNeXtBlock,
    LLNHead,
    PatchEmbedding,
    gram_defect,
    init_orthogonal_,
    l2_spatial_pool,
    orthogonality_error,
)

# Paper sizes (L = depth, W = width) and small ones for CPU runs and tests. Parameters ≈ 2·L·W².
# The 2B shape is unpublished; L32W5760 gives 2.12B (DESIGN.md §1).
SIZES: dict[str, tuple[int, int]] = {
    "L6W64": (6, 64),
    "L8W128": (8, 128),
    "L32W64": (32, 64),
    "L32W128": (32, 128),
    "L32W1024": (32, 1024),
    "L32W2048": (32, 2048),
    "L32W4096": (32, 4096),
    "L32W5760": (32, 5760),
}


def operator_norm_bound(matrix: torch.Tensor) -> float:
    """A sound upper bound on ‖X‖₂ for a tall X, from its fp32 values in float64.

    ‖X‖₂² = λ_max(XᵀX) ≤ 1 + ‖XᵀX − I‖₂ ≤ 1 + ‖XᵀX − I‖_F. Unlike power iteration (a lower estimate),
    this can only over-state the norm.
    """
    return math.sqrt(1.0 + torch.linalg.matrix_norm(gram_defect(matrix), ord="fro").item())


class LipNeXt(nn.Module):
    def __init__(
        self,
        depth: int,
        width: int,
        num_classes: int,
        image_size: int,
        patch: int,
        alpha: float = 1 / 8,
        beta: float = 0.5,
        in_chans: int = 3,
        activation_checkpointing: int = 0,
        compile_blocks: bool = False,
    ):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"patch {patch} does not divide image size {image_size}")
        tokens = image_size // patch
        self.image_size = image_size
        # Blocks 0, k, 2k, … keep only their input and are recomputed in backward (0 = none).
        self.activation_checkpointing = activation_checkpointing
        self.embed = PatchEmbedding(patch, width, in_chans)
        self.blocks = nn.ModuleList(LipNeXtBlock(width, (tokens, tokens), alpha, beta) for _ in range(depth))
        self.head = LLNHead(width, num_classes)
        self.reset_parameters()
        if compile_blocks:
            # In place (`Module.compile`): parameter names and state_dict keys stay as they are. All blocks
            # share one code object, so torch.compile traces once per input shape/dtype and reuses it.
            for block in self.blocks:
                block.compile()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if hasattr(module, "orthogonal_names"):
                init_orthogonal_(module)
        self.head.reset_parameters()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed((images - 0.5).to(self.embed.weight.dtype))
        for i, block in enumerate(self.blocks):
            k = self.activation_checkpointing
            if self.training and k and i % k == 0:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return l2_spatial_pool(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images)).float()

    def orthogonal_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, param) of every manifold matrix, each stored tall with XᵀX = I as its constraint."""
        for module_name, module in self.named_modules():
            for name in getattr(module, "orthogonal_names", ()):
                yield f"{module_name}.{name}" if module_name else name, getattr(module, name)

    def orthogonal_uses(self) -> Iterator[torch.Tensor]:
        """Every application of a manifold matrix in one forward pass (R is applied twice per block)."""
        yield self.embed.weight
        for block in self.blocks:
            yield from (block.R, block.R, block.M)

    @torch.no_grad()
    def lipschitz_bound(self) -> float:
        """Sound upper bound on the backbone's L2 Lipschitz constant (images → pooled features).

        The product of per-use operator-norm bounds of the actual weights; every other layer is exactly
        1-Lipschitz. Compute it on the fp32 weights: bf16 weights make it meaningless.
        """
        if self.embed.weight.dtype != torch.float32:
            raise ValueError(f"lipschitz_bound needs fp32 weights, model holds {self.embed.weight.dtype}")
        norms = {id(p): operator_norm_bound(p) for _, p in self.orthogonal_parameters()}
        return math.prod(norms[id(p)] for p in self.orthogonal_uses())

    @torch.no_grad()
    def orthogonality_error(self) -> float:
        """max |XᵀX − I| over all manifold matrices (float64)."""
        return orthogonality_error(p for _, p in self.orthogonal_parameters())


def build_lipnext(size: str, **kwargs) -> LipNeXt:
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; known sizes: {', '.join(SIZES)}")
    depth, width = SIZES[size]
    return LipNeXt(depth=depth, width=width, **kwargs)
