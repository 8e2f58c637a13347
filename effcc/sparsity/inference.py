"""Inference for Sparse-IFT models: `freeze` turns what was trained into what runs fastest.

    fast = effcc.sparsity.freeze(trained).to("cuda", torch.bfloat16)   # a copy; `trained` keeps training

Parallel, factorized and doped layers have no nonlinearity inside, so each folds exactly into one
dense layer of the original shape: at inference they cost what the dense layer costs.  A sparse
linear that stands alone (Sparse Wide) whose mask is constant over (bo, bi) blocks with bo, bi in
{16, 32, 64, 128} and whose density is low enough becomes a `BlockSparseLinear`: its kept blocks
only (BSR) and effcc::block_sparse_linear, a Triton kernel on CUDA that reads no masked block
(effcc/backends/triton/sparse_linear.py).  Other masked layers (unstructured masks, convolutions,
dense-ish masks) get W ⊙ M baked into a plain layer, and `freeze` logs why: on a GPU an
unstructured 75 % sparse matrix has almost no empty tile to skip.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import Tensor, nn

from ..ops import sparse as ops
from .blocks import not_whole_blocks
from .layers import MaskedLayer, SparseDoped, SparseFactorized, SparseParallel, dense_layer

log = logging.getLogger("effcc")
# Above this density the library GEMM on the baked W ⊙ M beats the block-sparse kernel
# (H100, bf16, 64×64 blocks: 0.82-0.95× at density 0.5, 1.4-1.9× at 0.25; benchmarks/bench_sparse_ift.py).
KERNEL_MAX_DENSITY = 0.35


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
    """Why a masked layer cannot run on the block-sparse kernel, or None when it can."""
    if layer.spec.kind != "linear":
        return "a convolution (the block-sparse kernel is for linears)"
    bo, bi = layer.block
    if bo not in ops.KERNEL_BLOCK_SIZES or bi not in ops.KERNEL_BLOCK_SIZES:
        return f"its mask blocks are {bo}×{bi}; the kernel needs sides in {ops.KERNEL_BLOCK_SIZES} (sparse_ift option `block`)"
    if why := not_whole_blocks(layer.spec.out_features, layer.spec.in_features, layer.block):
        return why
    if layer.density > KERNEL_MAX_DENSITY:
        return f"density {layer.density:.2f} > {KERNEL_MAX_DENSITY}: the dense library GEMM on W ⊙ M is faster there (H100, README)"
    return None


def _effective(module: nn.Module) -> Tensor:
    """The weight a layer multiplies by, in float64 (W ⊙ M for a masked layer)."""
    w = module.weight.detach().double()
    return w * module.mask if isinstance(module, MaskedLayer) else w


def _compose(outer: nn.Module, inner: nn.Module) -> Tensor:
    """The one weight of outer ∘ inner, where outer is pointwise (1×1 conv or linear) over inner's outputs."""
    w_outer, w_inner = _effective(outer), _effective(inner)
    return torch.einsum("or,ri...->oi...", w_outer.reshape(w_outer.shape[0], w_outer.shape[1]), w_inner)


def fold(module: nn.Module) -> nn.Module | None:
    """The single dense layer that a parallel, factorized or doped structure computes, or None.

    Σ_i x·(W_i ⊙ M_i)ᵀ = x·(Σ_i W_i ⊙ M_i)ᵀ, and a linear (or a 1×1 conv) after a linear (or conv)
    is one linear (conv) with the product weight: each folds exactly (float64 products, then one
    rounding) into a layer of the original's shape, hence the original's FLOPs."""
    if isinstance(module, SparseParallel):
        spec, weight = module.branches[0].spec, sum(_effective(b) for b in module.branches)
        bias = module.branches[0].bias
    elif isinstance(module, SparseFactorized):
        spec, weight, bias = module.u.spec.resized(out_features=module.v.spec.out_features, bias=module.v.bias is not None), _compose(module.v, module.u), module.v.bias
    elif isinstance(module, SparseDoped):
        spec, weight, bias = module.sparse.spec, _effective(module.sparse) + _compose(module.v, module.u), module.sparse.bias
    else:
        return None
    return _dense(spec, weight, bias, like=next(module.parameters()))


def _dense(spec, weight: Tensor, bias: Tensor | None, like: Tensor) -> nn.Module:
    """A plain nn.Linear / nn.Conv2d for `spec` holding `weight` and `bias`, in `like`'s dtype and device."""
    dense = dense_layer(spec, device=like.device, dtype=like.dtype)
    with torch.no_grad():
        dense.weight.copy_(weight)
        if bias is not None:
            dense.bias.copy_(bias)
    return dense


def freeze(model: nn.Module) -> nn.Module:
    """A copy of `model` for inference: Sparse-IFT structures as fast as the hardware allows.

    parallel / factorized / doped  → folded into one dense layer of the original shape (exact)
    sparse linears (wide)          → BlockSparseLinear when the kernel applies, else W ⊙ M baked in
    """
    frozen = copy.deepcopy(model)
    replaced: list[str] = []
    for name, module in list(frozen.named_modules()):  # parents come before their children
        if any(name.startswith(f"{prefix}.") for prefix in replaced):
            continue  # inside a structure already folded
        replacement = fold(module)
        if replacement is None and isinstance(module, MaskedLayer):
            reason = why_not_frozen(module)
            if reason is None:
                # Only kept blocks are packed, and the mask is all ones inside them: no W ⊙ M needed.
                replacement = BlockSparseLinear(ops.pack_blocks(module.weight, module.mask, module.block), module.bias)
            else:
                log.info("effcc.sparsity.freeze: %s runs dense with W ⊙ M: %s", name, reason)
                replacement = _dense(module.spec, _effective(module), module.bias, like=module.weight)  # W ⊙ M baked in
        if replacement is not None:
            parent, _, leaf = name.rpartition(".")
            setattr(frozen.get_submodule(parent) if parent else frozen, leaf, replacement)
            replaced.append(name)
    return frozen
