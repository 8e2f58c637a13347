"""Inference on sparse layers that skips the zeros: `freeze` lowers masked linears to block-sparse ones.

    fast = effcc.sparsity.freeze(trained).to("cuda", torch.bfloat16)   # a copy; `trained` keeps training

A masked linear whose mask is constant over (bo, bi) blocks with bo, bi ∈ {16, 32, 64, 128} becomes a
`BlockSparseLinear`: its kept blocks only (BSR) and effcc::block_sparse_linear, a Triton kernel on
CUDA that reads no masked block (effcc/backends/triton/sparse_linear.py).  Unstructured masks
(block (1, 1)) and convolutions stay masked dense, and `freeze` says which and why: on a GPU an
unstructured 75 % sparse matrix has almost no empty tile to skip.
"""

from __future__ import annotations

import copy
import logging

from torch import Tensor, nn

from ..ops import sparse as ops
from .layers import MaskedLayer, masked_layers

log = logging.getLogger("effcc")


class BlockSparseLinear(nn.Module):
    """y = x · Wᵀ + b with only W's kept blocks stored (inference)."""

    def __init__(self, packed: ops.BlockSparseWeight, bias: Tensor | None):
        super().__init__()
        self.out_features, self.in_features = packed.out_features, packed.in_features
        self.register_buffer("values", packed.values)
        self.register_buffer("row_offsets", packed.row_offsets)
        self.register_buffer("col_blocks", packed.col_blocks)
        self.register_buffer("bias", bias.detach().clone() if bias is not None else None)

    def forward(self, x: Tensor) -> Tensor:
        return ops.block_sparse_linear(x, self.values, self.row_offsets, self.col_blocks, self.bias, self.out_features)

    def extra_repr(self) -> str:
        blocks, bi, bo = self.values.shape
        total = (self.out_features // bo) * (self.in_features // bi)
        return f"{self.in_features}→{self.out_features}, {blocks}/{total} blocks of {bo}×{bi}"


def why_not_frozen(layer: MaskedLayer) -> str | None:
    """Why a masked layer cannot become block-sparse, or None when it can."""
    if layer.spec.kind != "linear":
        return "a convolution (the block-sparse kernel is for linears)"
    bo, bi = layer.block
    if bo not in ops.KERNEL_BLOCK_SIZES or bi not in ops.KERNEL_BLOCK_SIZES:
        return f"its mask blocks are {bo}×{bi}; the kernel needs sides in {ops.KERNEL_BLOCK_SIZES} (sparse_ift option `block`)"
    if layer.spec.out_features % bo or layer.spec.in_features % bi:
        return f"its {layer.spec.out_features}×{layer.spec.in_features} weight is not a whole number of {bo}×{bi} blocks"
    return None


def freeze(model: nn.Module) -> nn.Module:
    """A copy of `model` for inference in which every masked linear that can be is block-sparse."""
    frozen = copy.deepcopy(model)
    for name, layer in masked_layers(frozen):
        reason = why_not_frozen(layer)
        if reason is not None:
            log.warning("effcc.sparsity.freeze: %s stays masked dense: %s", name, reason)
            continue
        packed = ops.pack_blocks(layer.weight * layer.mask, layer.mask, layer.block)
        parent, _, leaf = name.rpartition(".")
        setattr(frozen.get_submodule(parent) if parent else frozen, leaf, BlockSparseLinear(packed, layer.bias))
    return frozen
