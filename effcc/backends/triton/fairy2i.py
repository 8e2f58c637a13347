"""Triton kernel for Fairy2i layers: products with {±1, ±i} codes without multiplying by weights.

Layout and math: effcc.ops.complex_linear.  A code is P + iQ with P, Q ∈ {−1, 0, 1}; with
a = bit 0 and b = bit 1 of the code, P = 1 − a − (a XOR b) and Q = (a XOR b) − a.  So for output
row j, stage s and each of A, B, with z = x_r + i·x_i (z̄ for B), only two 0/1 sums are needed per
input part, Σ_a x and Σ_{a XOR b} x, and
    contribution = s_re·P·z + i·s_im·Q·z.
With the signed sums σ_a = Σ (−1)^a x and σ_e = Σ (−1)^(a XOR b) x, P·x = (σ_a + σ_e)/2 and
Q·x = (σ_a − σ_e)/2: per code a bit moved to the sign (a shift), an XOR into x (one LOP3) and an
addition for each sum and part: sign flips and additions only, no multiplication and no select,
into per-element sums reduced once after the loop; the scales (and the halves) are applied once per
row and stage.  Programs split
(rows, stage × part of the input); the last program of a row block to arrive adds the parts
(store_output_tile).  For 1-16 tokens (decode); the codes are read as int32 words (16 codes:
inputs 16w + j) where the row length allows, else bytes, and x as 16 (or 4) strided slices.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quantized_linear import arrival_counters, autotune_configs, splits_and_smallest_block, store_output_tile


@triton.jit
def _signed_inputs(unit, mixed, x_re, x_im, j: tl.constexpr):
    """Code j of each unit (bits 2j = a, 2j+1 = b; bit 2j of `mixed` = a XOR b): x with its sign
    flipped by a, and by a XOR b.  The bit is moved to the sign bit (a shift) and XOR-ed into x
    (one LOP3): no multiplication."""
    sign_a = (unit << (31 - 2 * j)) & 0x80000000
    sign_e = (mixed << (31 - 2 * j)) & 0x80000000
    re_bits = x_re.to(tl.uint32, bitcast=True)
    im_bits = x_im.to(tl.uint32, bitcast=True)
    return ((re_bits ^ sign_a).to(tl.float32, bitcast=True), (im_bits ^ sign_a).to(tl.float32, bitcast=True),
            (re_bits ^ sign_e).to(tl.float32, bitcast=True), (im_bits ^ sign_e).to(tl.float32, bitcast=True))


@triton.jit
def _p_and_q(sigma_a_re, sigma_a_im, sigma_e_re, sigma_e_im):
    """Per-element signed sums → (P·x_re, P·x_im, Q·x_re, Q·x_im): P·x = (σ_a + σ_e)/2, Q·x = (σ_a − σ_e)/2."""
    a_re, a_im = tl.sum(sigma_a_re, axis=2), tl.sum(sigma_a_im, axis=2)
    e_re, e_im = tl.sum(sigma_e_re, axis=2), tl.sum(sigma_e_im, axis=2)
    return 0.5 * (a_re + e_re), 0.5 * (a_im + e_im), 0.5 * (a_re - e_re), 0.5 * (a_im - e_im)


@triton.jit
def _fairy2i_kernel(
    X, CODES, SCALES, BIAS, C, PARTIAL, ARRIVED,
    M, M_OUT, N_IN, stride_xm, stride_cs, stride_ct, stride_cr, stride_cm,
    HAS_BIAS: tl.constexpr, PER_UNIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, SPLIT: tl.constexpr,
):
    # Grid: (row blocks, 1, stages × SPLIT); each program takes one stage and one SPLIT-th of the
    # input, for A and B; the stages and splits are added by the last program to arrive.
    stage = tl.program_id(2) // SPLIT
    split = tl.program_id(2) % SPLIT
    rm = tl.arange(0, BLOCK_M)
    rj = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # complex output rows
    rb = tl.arange(0, BLOCK_B)  # code units along the input
    j_ok = rj < M_OUT
    m_ok = rm < M
    units = N_IN // PER_UNIT
    per_split = tl.cdiv(tl.cdiv(units, SPLIT), BLOCK_B) * BLOCK_B
    u_start = split * per_split
    u_end = tl.minimum(u_start + per_split, units)
    # Signed sums σ_a, σ_e per element of each input part (module docstring), reduced after the loop.
    zero = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_B), dtype=tl.float32)
    aa_re, aa_im, ae_re, ae_im = zero, zero, zero, zero  # A: σ_a, σ_e of x_re and x_im
    ba_re, ba_im, be_re, be_im = zero, zero, zero, zero  # B (its products take z̄: combined below)
    codes_a = CODES + stage * stride_cs + rj[None, :, None].to(tl.int64) * stride_cr
    codes_b = codes_a + stride_ct
    for b0 in range(u_start, u_end, BLOCK_B):
        b = b0 + rb
        ok = j_ok[None, :, None] & (b[None, None, :] < u_end)
        unit_a = tl.load(codes_a + b[None, None, :], mask=ok, other=0).to(tl.uint32)
        unit_b = tl.load(codes_b + b[None, None, :], mask=ok, other=0).to(tl.uint32)
        mixed_a, mixed_b = unit_a ^ (unit_a >> 1), unit_b ^ (unit_b >> 1)  # bit 2j: a XOR b
        for j in tl.static_range(PER_UNIT):  # input PER_UNIT·b + j is bits 2j..2j+1 of unit b
            col = PER_UNIT * b + j
            x_ok = m_ok[:, None] & (b[None, :] < u_end)
            x_re = tl.load(X + rm[:, None].to(tl.int64) * stride_xm + col[None, :], mask=x_ok, other=0.0).to(tl.float32)[:, None, :]
            x_im = tl.load(X + rm[:, None].to(tl.int64) * stride_xm + N_IN + col[None, :], mask=x_ok, other=0.0).to(tl.float32)[:, None, :]
            s_are, s_aim, s_ere, s_eim = _signed_inputs(unit_a, mixed_a, x_re, x_im, j)
            aa_re += s_are
            aa_im += s_aim
            ae_re += s_ere
            ae_im += s_eim
            s_are, s_aim, s_ere, s_eim = _signed_inputs(unit_b, mixed_b, x_re, x_im, j)
            ba_re += s_are
            ba_im += s_aim
            be_re += s_ere
            be_im += s_eim
    pa_re, pa_im, qa_re, qa_im = _p_and_q(aa_re, aa_im, ae_re, ae_im)
    pb_re, pb_im, qb_re, qb_im = _p_and_q(ba_re, ba_im, be_re, be_im)
    # scales of this stage, per row: [A s_re, A s_im, B s_re, B s_im]
    s_ptr = SCALES + stage * (2 * M_OUT * 2) + rj * 2
    sa_re = tl.load(s_ptr, mask=j_ok, other=0.0)[None, :]
    sa_im = tl.load(s_ptr + 1, mask=j_ok, other=0.0)[None, :]
    sb_re = tl.load(s_ptr + M_OUT * 2, mask=j_ok, other=0.0)[None, :]
    sb_im = tl.load(s_ptr + M_OUT * 2 + 1, mask=j_ok, other=0.0)[None, :]
    # A z = (s_re P + i s_im Q)(x_re + i x_im);  B z̄ = (s_re P + i s_im Q)(x_re − i x_im)
    w_re = sa_re * pa_re - sa_im * qa_im + sb_re * pb_re + sb_im * qb_im
    w_im = sa_re * pa_im + sa_im * qa_re - sb_re * pb_im + sb_im * qb_re
    # output columns: j (real part) and M_OUT + j (imaginary part); rows past the end are masked
    out = tl.reshape(tl.join(w_re, w_im), (BLOCK_M, 2 * BLOCK_N))
    rj2 = tl.reshape(tl.join(rj, rj + M_OUT), (2 * BLOCK_N,))
    ok2 = tl.reshape(tl.join(j_ok, j_ok), (2 * BLOCK_N,))
    cols = tl.where(ok2, rj2, 2 * M_OUT)
    store_output_tile(out, tl.program_id(2), rm, cols, M, 2 * M_OUT, BIAS, C, PARTIAL, ARRIVED, stride_cm, HAS_BIAS, BLOCK_M, 2 * BLOCK_N)


_fairy2i = triton.autotune(
    configs=autotune_configs(
        [
            {"BLOCK_N": bn, "BLOCK_B": bb, "SPLIT": sp, "num_warps": w, "num_stages": 1}
            # measured on an H100: the first of these win; more rows per thread (x loaded once for
            # them) did not help (BLOCK_N 128-256)
            for bn, bb, sp, w in [(32, 8, 1, 4), (32, 8, 4, 4), (32, 4, 8, 4), (16, 8, 8, 4), (16, 4, 16, 4), (64, 4, 4, 4),
                                  (32, 8, 8, 8), (64, 8, 8, 8), (32, 2, 16, 4), (16, 8, 4, 4)]
        ],
        {"BLOCK_N": 16, "BLOCK_B": 2, "SPLIT": 2},
    ),
    key=["M", "M_OUT", "N_IN", "PER_UNIT"],
)(_fairy2i_kernel)

_MAX_SPLIT, _SMALLEST_BLOCK_N = splits_and_smallest_block(_fairy2i, split="SPLIT")


def fairy2i_linear(x, codes, scales, bias) -> torch.Tensor:
    """x [M, 2n] (M ≤ 16) with codes [stages, 2, m, n/4], scales [stages, 2, m, 2] → [M, 2m] in x's dtype."""
    m_tokens = x.shape[0]
    stages, _, m_out, quarter = codes.shape
    if m_tokens > 16:
        raise ValueError(f"the Fairy2i kernel is for 1-16 tokens, not {m_tokens}")
    out = torch.empty((m_tokens, 2 * m_out), dtype=x.dtype, device=x.device)
    partial = torch.empty((stages * _MAX_SPLIT * m_tokens * 2 * m_out,), dtype=torch.float32, device=x.device)
    arrived = arrival_counters(x.device, triton.cdiv(m_out, _SMALLEST_BLOCK_N))
    codes = codes.contiguous()
    per_unit = 16 if quarter % 4 == 0 else 4  # int32 words (little-endian: byte k holds inputs 4k..4k+3)
    if per_unit == 16:
        codes = codes.view(torch.int32)
    _fairy2i[lambda meta: (triton.cdiv(m_out, meta["BLOCK_N"]), 1, stages * meta["SPLIT"])](
        x, codes, scales.float().contiguous(), bias if bias is not None else scales, out, partial, arrived,
        m_tokens, m_out, 4 * quarter, x.stride(0), codes.stride(0), codes.stride(1), codes.stride(2), out.stride(0),
        HAS_BIAS=bias is not None, PER_UNIT=per_unit, BLOCK_M=triton.next_power_of_2(m_tokens),
    )
    return out
