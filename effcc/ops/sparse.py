"""Masked (sparse) linear and conv2d: the ops Sparse-IFT layers run while they train.

    y = x · (W ⊙ M)ᵀ + b                    effcc::sparse_linear(x, W, M, b)
    y = conv2d(x, W ⊙ M, b, stride, ...)    effcc::sparse_conv2d(x, W, M, b, stride, padding, dilation, groups)

M is a bool mask of W's shape.  Training runs this masked dense math (as the Sparse-IFT reference
does); `effcc.sparsity.freeze` lowers block-structured masks to a kernel that skips the zeros.

Gradients.  x and b get the exact gradients of the masked layer.  W gets the *dense* gradient
∂L/∂(W ⊙ M), not ∂L/∂W = ∂L/∂(W ⊙ M) ⊙ M: RigL grows the connections whose dense gradient is
largest, so it must be there after backward().  The forward never reads a masked weight, so
what an optimizer writes there changes nothing until a connection is grown, and growing sets it
to zero first (effcc.sparsity.dst).

FLOPs.  torch's FlopCounterMode counts these ops by their *active* multiply-adds (nonzeros of M
times output positions, ×2), which is how Sparse-IFT's iso-FLOP promise is checked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import custom_op
from torch.utils.flop_counter import register_flop_formula


def _masked(weight: Tensor, mask: Tensor) -> Tensor:
    return weight * mask.to(weight.dtype)


# ---- linear ---------------------------------------------------------------------------------------
@custom_op("effcc::sparse_linear", mutates_args=())
def sparse_linear(x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor | None) -> Tensor:
    """x · (W ⊙ M)ᵀ + b for W [out, in], M bool [out, in]."""
    return F.linear(x, _masked(weight, mask), bias)


@sparse_linear.register_fake
def _(x, weight, mask, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _linear_setup(ctx, inputs, output):
    x, weight, mask, bias = inputs
    ctx.save_for_backward(x, weight, mask)
    ctx.has_bias = bias is not None


def _linear_backward(ctx, grad):
    x, weight, mask = ctx.saved_tensors
    grad_x = grad @ _masked(weight, mask)
    grad_weight = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])  # dense: see the module doc
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return grad_x, grad_weight, None, grad_bias


sparse_linear.register_autograd(_linear_backward, setup_context=_linear_setup)


# ---- conv2d ---------------------------------------------------------------------------------------
@custom_op("effcc::sparse_conv2d", mutates_args=())
def sparse_conv2d(
    x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor | None, stride: list[int], padding: list[int], dilation: list[int], groups: int
) -> Tensor:
    """conv2d(x, W ⊙ M, b) for W [out, in/groups, kh, kw], M bool of W's shape."""
    return F.conv2d(x, _masked(weight, mask), bias, stride, padding, dilation, groups)


@sparse_conv2d.register_fake
def _(x, weight, mask, bias, stride, padding, dilation, groups):
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)  # shape only: fake tensors


def _conv_setup(ctx, inputs, output):
    x, weight, mask, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, weight, mask)
    ctx.conv = (stride, padding, dilation, groups)
    ctx.has_bias = bias is not None


def _conv_backward(ctx, grad):
    x, weight, mask = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv
    grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad, x, _masked(weight, mask), [weight.shape[0]] if ctx.has_bias else None,
        stride, padding, dilation, False, [0, 0], groups, [True, True, ctx.has_bias],
    )  # fmt: skip
    return grad_x, grad_weight, None, grad_bias, None, None, None, None


sparse_conv2d.register_autograd(_conv_backward, setup_context=_conv_setup)


# ---- active FLOPs ---------------------------------------------------------------------------------
def _nonzeros(mask: Tensor) -> int:
    # Under fake tensors (torch.compile tracing) values are unknown: count the dense layer.
    return mask.numel() if isinstance(mask, torch._subclasses.FakeTensor) else int(mask.count_nonzero())


@register_flop_formula(torch.ops.effcc.sparse_linear, get_raw=True)
def active_linear_flops(x: Tensor, weight: Tensor, mask: Tensor, bias=None, *, out_val=None, **_) -> int:
    """2 × tokens × nonzeros of the mask."""
    return 2 * (x.numel() // x.shape[-1]) * _nonzeros(mask)


@register_flop_formula(torch.ops.effcc.sparse_conv2d, get_raw=True)
def active_conv2d_flops(x: Tensor, weight: Tensor, mask: Tensor, *args, out_val=None, **_) -> int:
    """2 × batch × output positions × nonzeros of the mask (each kept weight is one MAC per position)."""
    return 2 * out_val.shape[0] * out_val.shape[2] * out_val.shape[3] * _nonzeros(mask)


# ---- block-sparse inference ------------------------------------------------------------------------
# A frozen layer keeps only its kept blocks, row-block by row-block (BSR): for output row-block r,
# col_blocks[row_offsets[r]:row_offsets[r + 1]] are its kept column blocks and values[j] is block j,
# stored transposed ([bi, bo]) because the kernel multiplies x [tokens, bi] by it directly.
KERNEL_BLOCK_SIZES = (16, 32, 64, 128)


@dataclass(frozen=True)
class BlockSparseWeight:
    values: Tensor  # [kept blocks, bi, bo]
    row_offsets: Tensor  # int32 [out / bo + 1]
    col_blocks: Tensor  # int32 [kept blocks]
    out_features: int
    in_features: int


def pack_blocks(weight: Tensor, mask: Tensor, block: tuple[int, int]) -> BlockSparseWeight:
    """The kept blocks of a linear's W ⊙ M [out, in] in BSR form."""
    from ..sparsity.blocks import collapse, not_whole_blocks

    out_features, in_features = weight.shape
    bo, bi = block
    if why := not_whole_blocks(out_features, in_features, block):
        raise ValueError(f"cannot pack into blocks: {why}")
    kept = collapse(mask, block)  # raises unless the mask is constant over blocks
    rows, cols = kept.nonzero(as_tuple=True)  # row-major: grouped by row-block, as BSR needs
    tiles = weight.detach().reshape(out_features // bo, bo, in_features // bi, bi).permute(0, 2, 3, 1)  # [R, C, bi, bo]
    counts = kept.sum(dim=1)
    offsets = torch.zeros(kept.shape[0] + 1, dtype=torch.int32, device=weight.device)
    offsets[1:] = counts.cumsum(0).to(torch.int32)
    return BlockSparseWeight(tiles[rows, cols].contiguous(), offsets, cols.to(torch.int32).contiguous(), out_features, in_features)


def unpack_blocks(packed: BlockSparseWeight) -> Tensor:
    """The dense [out, in] weight (zeros where no block is kept)."""
    _, bi, bo = packed.values.shape
    rows = torch.repeat_interleave(torch.arange(len(packed.row_offsets) - 1, device=packed.values.device), packed.row_offsets.diff().long())
    tiles = packed.values.new_zeros(packed.out_features // bo, packed.in_features // bi, bi, bo)
    tiles[rows, packed.col_blocks.long()] = packed.values
    return tiles.permute(0, 3, 1, 2).reshape(packed.out_features, packed.in_features)


@custom_op("effcc::block_sparse_linear", mutates_args=())
def block_sparse_linear(x: Tensor, values: Tensor, row_offsets: Tensor, col_blocks: Tensor, bias: Tensor | None, out_features: int) -> Tensor:
    """x · Wᵀ + b for a BSR weight (inference: no autograd).  CUDA: effcc's Triton kernel; CPU: the reference."""
    if x.is_cuda:
        from ..backends.triton.sparse_linear import block_sparse_linear as kernel

        return kernel(x, values, row_offsets, col_blocks, bias, out_features)
    return block_sparse_linear_reference(x, values, row_offsets, col_blocks, bias, out_features)


@block_sparse_linear.register_fake
def _(x, values, row_offsets, col_blocks, bias, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


def block_sparse_linear_reference(x, values, row_offsets, col_blocks, bias, out_features) -> Tensor:
    in_features = x.shape[-1]
    weight = unpack_blocks(BlockSparseWeight(values, row_offsets, col_blocks, out_features, in_features))
    return F.linear(x, weight.to(x.dtype), bias)


@register_flop_formula(torch.ops.effcc.block_sparse_linear, get_raw=True)
def active_block_sparse_flops(x: Tensor, values: Tensor, *args, out_val=None, **_) -> int:
    """2 × tokens × stored weights."""
    return 2 * (x.numel() // x.shape[-1]) * values.numel()
