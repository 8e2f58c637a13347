"""RMSNorm Triton kernels: forward (optionally fused with the residual add) and backward.

A program normalises a tile of whole rows in registers (BLOCK is the next power of two of
the width; narrow rows are taken several at a time), so each element of x is read once and
y written once: the kernel is bound by memory bandwidth, which the benchmark holds it to.
The backward walks a slice of rows, several per step so that enough loads are in flight,
computes dx per row and accumulates dγ, dβ per program.  The programs' sums are then added
into dγ, dβ with atomics: a separate reduction of per-program partials cost two more kernels,
6% of the backward at d = 512.  Atomic float adds land in any order, so the last bits vary from
run to run; under torch.use_deterministic_algorithms the partials are summed afterwards instead.

Runs on the CPU under TRITON_INTERPRET=1 (tests in CI), on CUDA otherwise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton


@triton.jit
def _forward_kernel(
    X,
    R,
    S,
    Y,
    W,
    B,
    RSTD,
    stride_x,
    stride_r,
    stride_s,
    stride_y,
    n_rows,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    col_ok = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_ok[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # The stream value is the rounded sum, exactly what an unfused add would have stored.
        x = (x + tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)).to(S.dtype.element_ty)
        tl.store(S + rows[:, None] * stride_s + cols[None, :], x, mask=mask)
    x = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    y = x * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rows < n_rows)


@triton.jit
def _backward_kernel(
    DY,
    X,
    W,
    RSTD,
    DS,
    DX,
    DW_PART,
    DB_PART,
    stride_dy,
    stride_x,
    stride_ds,
    stride_dx,
    n_rows,
    n_cols,
    rows_per_program,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    STAGES: tl.constexpr,
    ATOMIC: tl.constexpr,
    SUM_AT_END: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    col_ok = cols < n_cols
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    # SUM_AT_END keeps a tile of sums and reduces its rows once after the loop: no cross-warp
    # reduction in every step, at the price of registers.
    if SUM_AT_END:
        dw = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        db = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    else:
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        db = tl.zeros([BLOCK], dtype=tl.float32)
    start = pid.to(tl.int64) * rows_per_program  # int64 offsets: tensors may pass 2³¹ elements
    end = tl.minimum(start + rows_per_program, n_rows)
    # ROWS rows per step: several rows' loads in flight at once, which one row alone cannot keep up;
    # STAGES > 1 also issues the next steps' loads while this one computes (software pipelining).
    for first in tl.range(start, end, ROWS, num_stages=STAGES):
        rows = first + tl.arange(0, ROWS)
        row_ok = rows < end
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)[:, None]
        xhat = x * rstd
        g = dy
        if HAS_WEIGHT:
            g = dy * w
        dx = (g - xhat * (tl.sum(g * xhat, axis=1) / n_cols)[:, None]) * rstd
        if HAS_DS:  # the stream's own gradient (fused residual add): d(a + b) flows to both
            dx += tl.load(DS + rows[:, None] * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if SUM_AT_END:
            if HAS_WEIGHT:
                dw += dy * xhat
            if HAS_BIAS:
                db += dy
        else:
            if HAS_WEIGHT:
                dw += tl.sum(dy * xhat, axis=0)
            if HAS_BIAS:
                db += tl.sum(dy, axis=0)
    if SUM_AT_END:
        dw = tl.sum(dw, axis=0)
        db = tl.sum(db, axis=0)
    # ATOMIC: DW_PART, DB_PART are the zeroed dγ, dβ themselves; otherwise one row of partials per program.
    if HAS_WEIGHT:
        if ATOMIC:
            tl.atomic_add(DW_PART + cols, dw, mask=col_ok, sem="relaxed")
        else:
            tl.store(DW_PART + pid * n_cols + cols, dw, mask=col_ok)
    if HAS_BIAS:
        if ATOMIC:
            tl.atomic_add(DB_PART + cols, db, mask=col_ok, sem="relaxed")
        else:
            tl.store(DB_PART + pid * n_cols + cols, db, mask=col_ok)


def _block(n_cols: int) -> int:
    return triton.next_power_of_2(n_cols)


def _rows_per_tile(block: int, elements: int) -> int:
    """Rows handled together so that a tile holds about `elements` values (at least one row)."""
    return max(1, elements // block)


def _warps(elements: int) -> int:
    return min(max(elements // 256, 1), 16)


# Tuned on an H200 from CUDA-graph replays (benchmarks/sweep_rms_norm_tiles.py; results/rms_norm_*_h200.json).
# Forward, by row block: (values per program, warps), the pick whose worst case over a model's batch (ViT-L/16,
# GPT-2-medium, ...) and a 128 MiB tensor is closest to that size's own best (rms_norm_model_shapes_h200.json).
FORWARD_CONFIG = {512: (1024, 2), 1024: (2048, 4), 2048: (2048, 8), 4096: (4096, 16)}  # with the residual add
PLAIN_FORWARD_CONFIG = {512: (2048, 2), 1024: (2048, 2), 2048: (4096, 8), 4096: (4096, 8)}  # without it
FORWARD_TILE = 2048  # other widths; warps from the tile's size
# Backward: one program per SM, 4096 values per step, 4 warps, 4 pipeline stages, sums kept per element until
# the end: 94-96% of the copy bandwidth at widths 512-4096 with atomics (rms_norm_bwd_op_h200.json).  Wider
# rows: a row per step, warps from the row's size, sums reduced every step (fewer registers).
BACKWARD_CONFIG = (1, 4096, 4, 4, True)  # (programs per SM, values per step, warps, stages, sum at end)
WIDE_BACKWARD_CONFIG = (1, 4096, None, 3, False)


def adds_atomically() -> bool:
    """Whether the backward adds the programs' dγ, dβ with atomics (run-to-run order), or sums partials in a fixed order."""
    return not torch.are_deterministic_algorithms_enabled()


def backward_config(block: int) -> tuple:
    return BACKWARD_CONFIG if block <= 4096 else WIDE_BACKWARD_CONFIG


def forward(x2d, residual2d, weight, bias, eps: float, *, tile: int | None = None, warps: int | None = None):
    """(y, stream, rstd) for rows of x2d (stream is empty when there is no residual); tile, warps override the tuned ones."""
    n_rows, n_cols = x2d.shape
    y = torch.empty_like(x2d)
    stream = torch.empty_like(x2d) if residual2d is not None else x2d.new_empty(0)
    rstd = torch.empty(n_rows, device=x2d.device, dtype=torch.float32)
    block = _block(n_cols)
    configs = FORWARD_CONFIG if residual2d is not None else PLAIN_FORWARD_CONFIG  # half the bytes per row without it
    tuned_tile, tuned_warps = configs.get(block, (FORWARD_TILE, None))
    rows = _rows_per_tile(block, tile or tuned_tile)
    warps = warps or tuned_warps
    wrap_triton(_forward_kernel)[(triton.cdiv(n_rows, rows),)](
        x2d,
        residual2d if residual2d is not None else x2d,
        stream,
        y,
        weight if weight is not None else x2d,
        bias if bias is not None else x2d,
        rstd,
        x2d.stride(0),
        residual2d.stride(0) if residual2d is not None else 0,
        n_cols if residual2d is not None else 0,
        y.stride(0),
        n_rows,
        n_cols,
        eps,
        HAS_RESIDUAL=residual2d is not None,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        ROWS=rows,
        BLOCK=block,
        num_warps=warps or _warps(rows * block),
    )
    return y, stream, rstd


def backward(
    dy2d, x2d, weight, rstd, ds2d, has_bias: bool, sms: int, *, per_sm=None, tile=None, warps=None, stages=None,
    sum_at_end=None, atomic=None,
):
    """(dx, dγ, dβ) in float32 (dγ, dβ empty when absent) for rows of x2d.

    sms: the device's multiprocessors; per_sm, tile, warps, stages, sum_at_end override the tuned ones;
    atomic defaults to on unless torch.use_deterministic_algorithms is."""
    n_rows, n_cols = x2d.shape
    dx = torch.empty_like(x2d)
    block = _block(n_cols)
    tuned = backward_config(block)
    per_sm, tile, warps, stages = per_sm or tuned[0], tile or tuned[1], warps or tuned[2], stages or tuned[3]
    sum_at_end = tuned[4] if sum_at_end is None else sum_at_end
    atomic = adds_atomically() if atomic is None else atomic
    programs = max(1, min(sms * per_sm, n_rows))
    rows_per_program = triton.cdiv(n_rows, programs)
    # Atomic: the programs add into one zeroed row each of dγ, dβ; otherwise each writes its own row of partials.
    sums = torch.zeros if atomic else torch.empty
    shape = (n_cols,) if atomic else (programs, n_cols)
    dw = sums(shape, device=x2d.device, dtype=torch.float32) if weight is not None else x2d.new_empty(0, dtype=torch.float32)
    db = sums(shape, device=x2d.device, dtype=torch.float32) if has_bias else x2d.new_empty(0, dtype=torch.float32)
    rows = min(_rows_per_tile(block, tile), triton.next_power_of_2(rows_per_program))
    wrap_triton(_backward_kernel)[(programs,)](
        dy2d,
        x2d,
        weight if weight is not None else x2d,
        rstd,
        ds2d if ds2d is not None else dy2d,
        dx,
        dw,
        db,
        dy2d.stride(0),
        x2d.stride(0),
        ds2d.stride(0) if ds2d is not None else 0,
        dx.stride(0),
        n_rows,
        n_cols,
        rows_per_program,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=has_bias,
        HAS_DS=ds2d is not None,
        ROWS=rows,
        BLOCK=block,
        STAGES=stages,
        ATOMIC=atomic,
        SUM_AT_END=sum_at_end,
        num_warps=warps or _warps(rows * block),
    )
    if not atomic:
        dw, db = (dw.sum(0) if weight is not None else dw), (db.sum(0) if has_bias else db)
    return dx, dw, db
