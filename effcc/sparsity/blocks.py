"""Masks constant over blocks: the shape every Sparse-IFT mask has, and the arithmetic on it.

A layer's weight is read as a matrix [out, in·kh·kw] (a linear's own shape; a conv's flattened
per output channel).  A mask with block (bo, bi) is constant over each bo × bi tile of that
matrix; (1, 1) is ordinary unstructured sparsity.  Blocks are what lets a GPU kernel skip zeros
(effcc.sparsity.freeze); masks are initialised, dropped and grown block by block.
"""

from __future__ import annotations

import torch
from torch import Tensor


def as_matrix(t: Tensor) -> Tensor:
    """A weight or mask as [out, everything else] (a view)."""
    return t.reshape(t.shape[0], -1)


def grid(shape: torch.Size | tuple, block: tuple[int, int]) -> tuple[int, int]:
    """How many blocks the matrix form of a weight of `shape` has: (rows, columns).

    The last row/column of blocks may be partial when a size is not a multiple of the block."""
    rows, cols = shape[0], int(torch.Size(shape[1:]).numel())
    return -(-rows // block[0]), -(-cols // block[1])


def not_whole_blocks(rows: int, cols: int, block: tuple[int, int]) -> str | None:
    """Why a rows × cols weight matrix cannot be cut into whole blocks, or None when it can."""
    if rows % block[0] or cols % block[1]:
        return f"its {rows}×{cols} weight is not a whole number of {block[0]}×{block[1]} blocks"
    return None


def block_sums(t: Tensor, block: tuple[int, int]) -> Tensor:
    """Σ over each block of the matrix form of `t` → [block rows, block columns] (float64)."""
    m = as_matrix(t).double()
    rows, cols = grid(t.shape, block)
    padded = m.new_zeros(rows * block[0], cols * block[1])
    padded[: m.shape[0], : m.shape[1]] = m
    return padded.reshape(rows, block[0], cols, block[1]).sum(dim=(1, 3))


def block_sizes(shape: torch.Size | tuple, block: tuple[int, int], device=None) -> Tensor:
    """How many weights each block holds (partial edge blocks hold fewer) → [block rows, block columns]."""
    return block_sums(torch.ones(shape, device=device), block).long()


def expand(block_mask: Tensor, shape: torch.Size | tuple, block: tuple[int, int]) -> Tensor:
    """A bool mask over blocks → the bool mask of a weight of `shape`."""
    rows, cols = shape[0], int(torch.Size(shape[1:]).numel())
    full = block_mask.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return full[:rows, :cols].reshape(shape).contiguous()


def collapse(mask: Tensor, block: tuple[int, int]) -> Tensor:
    """The mask over blocks of an element mask (True where the block is kept); checks it is block-constant."""
    kept = block_sums(mask, block)
    full = block_sizes(mask.shape, block, mask.device)
    if not bool(((kept == 0) | (kept == full)).all()):
        raise ValueError(f"mask of shape {tuple(mask.shape)} is not constant over blocks of {block}")
    return kept > 0
