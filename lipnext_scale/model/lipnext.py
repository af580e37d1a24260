"""LipNeXt: centering → patch embedding → L blocks → L2 pooling → LLN head (DESIGN.md §1)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lipnext_scale.model.layers import (
    LipNeXtBlock,
    LLNHead,
    PatchEmbedding,
    init_orthogonal_,
    l2_spatial_pool,
    orthogonality_error,
)
from lipnext_scale.rounding import operator_norm_bound, product_up

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


__all__ = ["SIZES", "LipNeXt", "build_lipnext", "operator_norm_bound"]


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

    def mixing_products(self) -> list[torch.Tensor]:
        """P = M·Rᵀ of every block, formed once as the block's forward forms it (same dtype, same op)."""
        return [block.M.detach() @ block.R.detach().t() for block in self.blocks]

    def lipschitz_factors(self, products: list[torch.Tensor] | None = None) -> list[tuple[str, torch.Tensor]]:
        """(name, matrix) whose operator norms multiply to the backbone's Lipschitz bound, in a fixed order.

        With `products` (the P = fl(M·Rᵀ) that an evaluation actually applies) each block contributes
        ‖R‖₂·‖P‖₂, so the rounding of the product is covered; without, ‖R‖₂²·‖M‖₂ (the exact product's
        bound, used by the float64 sound mode, which charges the rounding of P to its error bound)."""
        out = [("embed.weight", self.embed.weight)]
        for i, block in enumerate(self.blocks):
            out.append((f"blocks.{i}.R", block.R))
            if products is None:
                out += [(f"blocks.{i}.R", block.R), (f"blocks.{i}.M", block.M)]
            else:
                out.append((f"blocks.{i}.P", products[i]))
        return out

    @torch.no_grad()
    def lipschitz_bound(self, products: list[torch.Tensor] | None = None) -> float:
        """Sound upper bound on the backbone's L2 Lipschitz constant (images → pooled features).

        The product of per-use operator-norm bounds (`operator_norm_bound`, rounded outward) of the
        actual weights, on their own device; every other layer is exactly 1-Lipschitz. See
        `lipschitz_factors` for `products`. Compute it on the fp32 weights: bf16 weights make it
        meaningless.
        """
        if self.embed.weight.dtype != torch.float32:
            raise ValueError(f"lipschitz_bound needs fp32 weights, model holds {self.embed.weight.dtype}")
        factors = self.lipschitz_factors(products)
        norms: dict[str, float] = {}
        for name, matrix in factors:
            if name not in norms:
                norms[name] = operator_norm_bound(matrix)
        return product_up(norms[name] for name, _ in factors)

    @torch.no_grad()
    def orthogonality_error(self) -> float:
        """max |XᵀX − I| over all manifold matrices (float64)."""
        return orthogonality_error(p for _, p in self.orthogonal_parameters())


def build_lipnext(size: str, **kwargs) -> LipNeXt:
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; known sizes: {', '.join(SIZES)}")
    depth, width = SIZES[size]
    return LipNeXt(depth=depth, width=width, **kwargs)
