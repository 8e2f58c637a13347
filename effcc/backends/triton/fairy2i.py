"""Triton kernel for Fairy2i layers: products with {±1, ±i} codes by selects and adds only.

Layout and math: effcc.ops.complex_linear.  For output row j, stage s and each of A, B, the
codes split the inputs into four sets; with z = x_r + i·x_i (z̄ for B):
    R = Σ_{code +1} z − Σ_{code −1} z,   I = Σ_{code +i} z − Σ_{code −i} z,
    contribution = s_re·R + i·s_im·I = (s_re·R_re − s_im·I_im) + i·(s_re·R_im + s_im·I_re).
The inner loop only flips sign bits (XOR), selects and adds (no multiplication), into per-element
sums reduced once after the loop; the scales are applied once per row and stage.  One program per (block of rows, stage): the stages are
added by the last program of a row block to arrive, as the int4 kernel's split input dimension.
For 1-16 tokens (decode); the codes are read as int32 words (16 codes: inputs 16w + j) where
the row length allows, else bytes, and x as 16 (or 4) strided slices, so that the codes are
never interleaved in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quantized_linear import INTERPRETING, store_output_tile


@triton.jit
def _flip_sign(x, code):
    """x with its sign flipped where the code is −1 or −i (odd codes): an XOR of the sign bit."""
    bits = x.to(tl.int32, bitcast=True) ^ ((code & 1).to(tl.int32) << 31)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _fairy2i_kernel(
    X, CODES, SCALES, BIAS, C, PARTIAL, ARRIVED,
    M, M_OUT, N_IN, stride_xm, stride_cs, stride_ct, stride_cr, stride_cm,
    STAGES: tl.constexpr, HAS_BIAS: tl.constexpr, PER_UNIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
):
    # CODES is read in units of PER_UNIT codes: bytes (4) or, where the row allows, int32 words (16)
    stage = tl.program_id(2)
    rm = tl.arange(0, BLOCK_M)
    rj = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # complex output rows
    rb = tl.arange(0, BLOCK_B)  # code units along the input
    j_ok = rj < M_OUT
    m_ok = rm < M
    # Per element sums, reduced once after the loop: for A and B (on z̄), R (codes ±1) and I (±i),
    # real and imaginary parts.
    zero = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_B), dtype=tl.float32)
    ar_re, ar_im, ai_re, ai_im = zero, zero, zero, zero
    br_re, br_im, bi_re, bi_im = zero, zero, zero, zero
    # codes read straight into the [1, BLOCK_N, BLOCK_B] layout of the sums (no reshuffle)
    codes_a = CODES + stage * stride_cs + rj[None, :, None].to(tl.int64) * stride_cr
    codes_b = codes_a + stride_ct
    for b0 in range(0, N_IN // PER_UNIT, BLOCK_B):
        b = b0 + rb
        ok = j_ok[None, :, None] & (b[None, None, :] < N_IN // PER_UNIT)
        unit_a = tl.load(codes_a + b[None, None, :], mask=ok, other=0)
        unit_b = tl.load(codes_b + b[None, None, :], mask=ok, other=0)
        for j in tl.static_range(PER_UNIT):  # input PER_UNIT·b + j is bits 2j..2j+1 of unit b
            ca = (unit_a >> (2 * j)) & 3
            cb = (unit_b >> (2 * j)) & 3
            col = PER_UNIT * b + j
            x_ok = m_ok[:, None] & (col[None, :] < N_IN)
            xr = tl.load(X + rm[:, None].to(tl.int64) * stride_xm + col[None, :], mask=x_ok, other=0.0).to(tl.float32)[:, None, :]
            xi = tl.load(X + rm[:, None].to(tl.int64) * stride_xm + N_IN + col[None, :], mask=x_ok, other=0.0).to(tl.float32)[:, None, :]
            # A: ±z goes to R when the code is ±1, to I when it is ±i
            sr, si = _flip_sign(xr, ca), _flip_sign(xi, ca)
            real_axis = ca < 2
            ar_re += tl.where(real_axis, sr, 0.0)
            ar_im += tl.where(real_axis, si, 0.0)
            ai_re += tl.where(real_axis, 0.0, sr)
            ai_im += tl.where(real_axis, 0.0, si)
            # B acts on z̄: the imaginary part enters negated
            sr, si = _flip_sign(xr, cb), _flip_sign(xi, cb)
            real_axis = cb < 2
            br_re += tl.where(real_axis, sr, 0.0)
            br_im -= tl.where(real_axis, si, 0.0)
            bi_re += tl.where(real_axis, 0.0, sr)
            bi_im -= tl.where(real_axis, 0.0, si)
    # scales of this stage, per row: [A s_re, A s_im, B s_re, B s_im]
    s_ptr = SCALES + stage * (2 * M_OUT * 2) + rj * 2
    sa_re = tl.load(s_ptr, mask=j_ok, other=0.0)[None, :]
    sa_im = tl.load(s_ptr + 1, mask=j_ok, other=0.0)[None, :]
    sb_re = tl.load(s_ptr + M_OUT * 2, mask=j_ok, other=0.0)[None, :]
    sb_im = tl.load(s_ptr + M_OUT * 2 + 1, mask=j_ok, other=0.0)[None, :]
    w_re = sa_re * tl.sum(ar_re, axis=2) - sa_im * tl.sum(ai_im, axis=2) + sb_re * tl.sum(br_re, axis=2) - sb_im * tl.sum(bi_im, axis=2)
    w_im = sa_re * tl.sum(ar_im, axis=2) + sa_im * tl.sum(ai_re, axis=2) + sb_re * tl.sum(br_im, axis=2) + sb_im * tl.sum(bi_re, axis=2)
    # output columns: j (real part) and M_OUT + j (imaginary part); rows past the end are masked
    out = tl.reshape(tl.join(w_re, w_im), (BLOCK_M, 2 * BLOCK_N))
    rj2 = tl.reshape(tl.join(rj, rj + M_OUT), (2 * BLOCK_N,))
    ok2 = tl.reshape(tl.join(j_ok, j_ok), (2 * BLOCK_N,))
    cols = tl.where(ok2, rj2, 2 * M_OUT)
    store_output_tile(out, stage, rm, cols, M, 2 * M_OUT, BIAS, C, PARTIAL, ARRIVED, stride_cm, HAS_BIAS, STAGES, BLOCK_M, 2 * BLOCK_N)


def fairy2i_linear(x, codes, scales, bias) -> torch.Tensor:
    """x [M, 2n] (M ≤ 16) with codes [stages, 2, m, n/4], scales [stages, 2, m, 2] → [M, 2m] in x's dtype."""
    m_tokens = x.shape[0]
    stages, _, m_out, quarter = codes.shape
    if m_tokens > 16:
        raise ValueError(f"the Fairy2i kernel is for 1-16 tokens, not {m_tokens}")
    out = torch.empty((m_tokens, 2 * m_out), dtype=x.dtype, device=x.device)
    partial = torch.empty((stages * m_tokens * 2 * m_out,), dtype=torch.float32, device=x.device)
    block_m = triton.next_power_of_2(max(m_tokens, 1))
    block_n = 16 if INTERPRETING else 32
    # eight [BLOCK_M, BLOCK_N, BLOCK_B] accumulators live in registers: fewer units per step for more tokens
    arrived = torch.zeros((triton.cdiv(m_out, block_n),), dtype=torch.int32, device=x.device)
    codes = codes.contiguous()
    per_unit = 16 if quarter % 4 == 0 else 4  # int32 words (little-endian: byte k holds inputs 4k..4k+3)
    if per_unit == 16:
        codes = codes.view(torch.int32)
    units = codes.shape[-1]
    block_b = max(2, min(triton.next_power_of_2(units), (32 if per_unit == 4 else 8) // block_m))
    _fairy2i_kernel[(triton.cdiv(m_out, block_n), 1, stages)](
        x, codes, scales.float().contiguous(), bias if bias is not None else scales, out, partial, arrived,
        m_tokens, m_out, 4 * quarter, x.stride(0), codes.stride(0), codes.stride(1), codes.stride(2), out.stride(0),
        STAGES=stages, HAS_BIAS=bias is not None, PER_UNIT=per_unit,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_B=block_b, num_warps=4 if block_m == 1 else 8,
    )
    return out
