"""Triton kernel for block-sparse linears (layout: effcc.ops.sparse.BlockSparseWeight).

y[M, N] = x[M, K] · Wᵀ + b where W keeps only some (bo × bi) blocks, stored row-block by
row-block (BSR): one program per (BLOCK_M tokens, one row-block of bo outputs) walks that
row-block's kept column blocks only, each a tl.dot of the x tile [BLOCK_M, bi] with the stored
block [bi, bo] (kept transposed so no shuffle is needed), accumulating in float32; bias and the
cast to the output dtype happen once in the epilogue.  A row-block with no kept block writes
the bias.  Zeros are never read: the work is the kept blocks', which is what makes Sparse-IFT's
equal-FLOP layers as fast as their dense originals instead of k times slower.
Autotuned per (N, K, M bucket) over the token tile and pipeline depth; one small configuration
under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quantized_linear import autotune_configs, m_bucket

_CONFIGS = [
    {"BLOCK_M": bm, "num_warps": w, "num_stages": s}
    for bm, w, s in [(16, 4, 3), (32, 4, 3), (64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 3), (128, 8, 4), (256, 8, 3)]
]


@triton.autotune(configs=autotune_configs(_CONFIGS, {"BLOCK_M": 16, "num_warps": 4, "num_stages": 1}), key=["N", "K", "M_BUCKET", "BO", "BI"])
@triton.jit
def _block_sparse_linear_kernel(
    X, VALUES, ROW_OFFSETS, COL_BLOCKS, BIAS, Y,
    M, N, K, stride_xm, stride_ym, M_BUCKET,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    # Row-blocks vary fastest: programs running together share one x tile, which stays in L2
    # while the (smaller, sparse) weight streams past; token tiles fastest re-read x from HBM.
    row_block = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = row_block * BO + tl.arange(0, BO)
    offs_i = tl.arange(0, BI)
    in_rows = offs_m[:, None] < M
    acc = tl.zeros((BLOCK_M, BO), dtype=tl.float32)
    start = tl.load(ROW_OFFSETS + row_block)
    end = tl.load(ROW_OFFSETS + row_block + 1)
    for j in range(start, end):
        column = tl.load(COL_BLOCKS + j) * BI
        a = tl.load(X + offs_m[:, None] * stride_xm + column + offs_i[None, :], mask=in_rows, other=0.0)
        b = tl.load(VALUES + j * (BI * BO) + offs_i[:, None] * BO + tl.arange(0, BO)[None, :])
        if IEEE:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n).to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty), mask=in_rows)


def block_sparse_linear(x: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor, col_blocks: torch.Tensor,
                        bias: torch.Tensor | None, out_features: int) -> torch.Tensor:  # fmt: skip
    """x [..., K] → [..., N] with the Triton kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1)."""
    _, bi, bo = values.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, k = x2.shape
    y = torch.empty((m, out_features), device=x.device, dtype=x.dtype)
    if m == 0:
        return y.reshape(*lead, out_features)

    def grid(meta):
        return (out_features // bo, triton.cdiv(m, meta["BLOCK_M"]))

    _block_sparse_linear_kernel[grid](
        x2, values, row_offsets, col_blocks, bias if bias is not None else values, y,
        m, out_features, k, x2.stride(0), y.stride(0), m_bucket(m),
        HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, BO=bo, BI=bi,
    )  # fmt: skip
    return y.reshape(*lead, out_features)
