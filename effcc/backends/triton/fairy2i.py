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

_fairy2i_mma_kernel does the same products on the tensor cores (codes decoded by PTX to 2P and 2Q,
0 or ±2, exact), autotuned; the default for 16-bit activations and two or more stages, where it
was measured 1.45–1.6× faster (fairy2i_linear).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quantized_linear import (
    INTERPRETING,
    arrival_counters,
    autotune_configs,
    splits_and_smallest_block,
    store_output_tile,
    tensor_core_dot,
)


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
    _store_complex_rows(w_re, w_im, rm, rj, j_ok, M, M_OUT, BIAS, C, PARTIAL, ARRIVED, stride_cm, HAS_BIAS, BLOCK_M, BLOCK_N)


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


# ---- tensor cores --------------------------------------------------------------------------------
# Four bytes of codes in $16 → for code j of each byte (bits 2j = a, 2j+1 = b), 2P in $2j, $2j+1 and 2Q in
# $8+2j, $9+2j, as 16-bit floats two a register (bytes 0, 1 in the first, 2, 3 in the second):
#   2P = ±2 or 0: sign a, magnitude 2 (the bits 0x4000, in bfloat16 and float16 alike) where b = 0;
#   2Q = ±2 or 0: sign a, magnitude 2 where b = 1.
# prmt spreads two bytes over the 16-bit lanes; (t & odd bits) | ((t << 2) & even bits) puts each
# code's a just above its b; one left shift per code then puts a on the sign bit and b on bit 14,
# and one logic op makes each of 2P (select: a's bit, else the complement of b's) and 2Q (a and b's bits).
_DOUBLED_PARTS_PTX = tl.constexpr("{\n.reg .b32 t<2>, s<2>, c<2>, u;\n"
    + "prmt.b32 t0, $16, 0, 0x4140;\nprmt.b32 t1, $16, 0, 0x4342;\n"
    + "".join(f"shl.b32 s{h}, t{h}, 2;\nlop3.b32 c{h}, t{h}, s{h}, 0x55555555, 0xD8;\n" for h in range(2))
    + "".join(f"shl.b32 u, c{h}, {13 - 2 * j};\n"
              f"lop3.b32 ${2 * j + h}, u, 0x80008000, 0x40004000, 0xCA;\n"
              f"and.b32 ${8 + 2 * j + h}, u, 0xC000C000;\n" for j in range(4) for h in range(2))
    + "}")
_SIXTEEN_OUT_ONE_IN = tl.constexpr("=r," * 16 + "r")


@triton.jit
def _doubled_parts(packed, dtype: tl.constexpr, IN_FP32: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Bytes of four codes [ROWS, COLS/4] → (2P, 2Q) [ROWS, COLS] in the tensor cores' fragment order
    (_to_code_fragment_order): every value 0 or ±2, exact in any float type, so that the products are exact
    and only the row scales (halved) multiply.  16-bit types by PTX, about two instructions a code
    for both; float32 (and the interpreter) in integer arithmetic."""
    if IN_FP32:
        v = packed.to(tl.int32)
        a0, b0, a1, b1 = v & 1, (v >> 1) & 1, (v >> 2) & 1, (v >> 3) & 1
        a2, b2, a3, b3 = (v >> 4) & 1, (v >> 5) & 1, (v >> 6) & 1, (v >> 7) & 1
        # P = 1 − a − (a XOR b), Q = (a XOR b) − a
        p0, q0 = (2 * (1 - a0 - (a0 ^ b0))).to(tl.float32), (2 * ((a0 ^ b0) - a0)).to(tl.float32)
        p1, q1 = (2 * (1 - a1 - (a1 ^ b1))).to(tl.float32), (2 * ((a1 ^ b1) - a1)).to(tl.float32)
        p2, q2 = (2 * (1 - a2 - (a2 ^ b2))).to(tl.float32), (2 * ((a2 ^ b2) - a2)).to(tl.float32)
        p3, q3 = (2 * (1 - a3 - (a3 ^ b3))).to(tl.float32), (2 * ((a3 ^ b3) - a3)).to(tl.float32)
    elif dtype == tl.bfloat16:  # (the bits of ±2 are the same in both 16-bit types)
        p0, p1, p2, p3, q0, q1, q2, q3 = tl.inline_asm_elementwise(
            asm=_DOUBLED_PARTS_PTX, constraints=_SIXTEEN_OUT_ONE_IN, args=[packed],
            dtype=(tl.bfloat16,) * 8, is_pure=True, pack=4)
    else:
        p0, p1, p2, p3, q0, q1, q2, q3 = tl.inline_asm_elementwise(
            asm=_DOUBLED_PARTS_PTX, constraints=_SIXTEEN_OUT_ONE_IN, args=[packed],
            dtype=(tl.float16,) * 8, is_pure=True, pack=4)
    # code j of byte i is column 4i + j: join(join(v0, v2), join(v1, v3))[..., i, s] is v(2i + s)
    p = tl.reshape(tl.join(tl.join(p0, p2), tl.join(p1, p3)), (ROWS, COLS))
    q = tl.reshape(tl.join(tl.join(q0, q2), tl.join(q1, q3)), (ROWS, COLS))
    return _to_code_fragment_order(p, ROWS, COLS), _to_code_fragment_order(q, ROWS, COLS)


@triton.jit
def _to_code_fragment_order(tile, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Columns 4e + j (code j of byte e) reordered for the tensor cores' register operand (in each
    run of 16 columns, thread c = lane % 4 holds columns 2c, 2c+1, 2c+8, 2c+9, two to a register):
    a register's two columns are one code position of two adjacent bytes, as the PTX decoder leaves
    them, and a thread's bytes of a row are one contiguous run.  Logical column
    16 (2 R2 + R1) + 8 half + 2 c + pair comes from byte COLS/16 · c + 2 R2 + pair, code 2 R1 + half.
    The activations are put in the same order."""
    t = tl.reshape(tile, (ROWS, 4, COLS // 32, 2, 2, 2))  # c, R2, pair, R1, half
    return tl.reshape(tl.permute(t, (0, 2, 4, 5, 1, 3)), (ROWS, COLS))


@triton.jit
def _fairy2i_mma_kernel(
    X, CODES, SCALES, BIAS, C, PARTIAL, ARRIVED,
    M, M_OUT, N_IN, stride_xm, stride_cs, stride_ct, stride_cr, stride_cm,
    HAS_BIAS: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
):
    """1-16 tokens on the tensor cores: per stage and part (A, B) the code matrices P and Q (entries
    0, ±1, decoded as 2P and 2Q: _doubled_parts) times [x_re | x_im] of the tokens, the row scales
    applied once after the loop.  The codes are wgmma's register operand, the tokens' real and
    imaginary parts the columns of the other ([BLOCK_K, 2·BLOCK_M], BLOCK_M ≥ 8 so that it is 16
    wide).  Grid: (row blocks, token blocks, stages × SPLIT), as _fairy2i_kernel."""
    IN_FP32: tl.constexpr = DOT_IN_FP32 or X.dtype.element_ty == tl.float32
    stage = tl.program_id(2) // SPLIT
    split = tl.program_id(2) % SPLIT
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rj = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # complex output rows
    rk = tl.arange(0, BLOCK_K)
    rb = tl.arange(0, BLOCK_K // 4)
    m_ok, j_ok = rm < M, rj < M_OUT
    per_split = tl.cdiv(tl.cdiv(N_IN, SPLIT), BLOCK_K) * BLOCK_K
    k_start = split * per_split
    k_end = tl.minimum(k_start + per_split, N_IN)  # a multiple of 4: whole bytes of codes
    x_rows = X + rm[:, None].to(tl.int64) * stride_xm
    codes_a = CODES + stage * stride_cs + rj[:, None].to(tl.int64) * stride_cr
    codes_b = codes_a + stride_ct
    zero = tl.zeros((BLOCK_N, 2 * BLOCK_M), dtype=tl.float32)
    pa, qa, pb, qb = zero, zero, zero, zero  # 2P·[x_re | x_im] and 2Q·[x_re | x_im] of A and B
    for k0 in range(k_start, k_end, BLOCK_K):
        cols = k0 + rk
        x_ok = m_ok[:, None] & (cols < k_end)[None, :]
        x_re = _to_code_fragment_order(tl.load(x_rows + cols[None, :], mask=x_ok, other=0.0), BLOCK_M, BLOCK_K)
        x_im = _to_code_fragment_order(tl.load(x_rows + N_IN + cols[None, :], mask=x_ok, other=0.0), BLOCK_M, BLOCK_K)
        xs = tl.reshape(tl.permute(tl.join(x_re, x_im), (1, 0, 2)), (BLOCK_K, 2 * BLOCK_M))  # column 2m: x_re, 2m+1: x_im
        byte = k0 // 4 + rb
        byte_ok = j_ok[:, None] & (byte < k_end // 4)[None, :]
        p, q = _doubled_parts(tl.load(codes_a + byte[None, :], mask=byte_ok, other=0), x_re.dtype, IN_FP32, BLOCK_N, BLOCK_K)
        pa = tensor_core_dot(p, xs, pa, IN_FP32)
        qa = tensor_core_dot(q, xs, qa, IN_FP32)
        p, q = _doubled_parts(tl.load(codes_b + byte[None, :], mask=byte_ok, other=0), x_re.dtype, IN_FP32, BLOCK_N, BLOCK_K)
        pb = tensor_core_dot(p, xs, pb, IN_FP32)
        qb = tensor_core_dot(q, xs, qb, IN_FP32)
    pa_re, pa_im = tl.split(tl.reshape(pa, (BLOCK_N, BLOCK_M, 2)))
    qa_re, qa_im = tl.split(tl.reshape(qa, (BLOCK_N, BLOCK_M, 2)))
    pb_re, pb_im = tl.split(tl.reshape(pb, (BLOCK_N, BLOCK_M, 2)))
    qb_re, qb_im = tl.split(tl.reshape(qb, (BLOCK_N, BLOCK_M, 2)))
    # scales of this stage, per row, halved (the products took 2P and 2Q): [A s_re, A s_im, B s_re, B s_im]
    s_ptr = SCALES + stage * (2 * M_OUT * 2) + rj * 2
    sa_re = 0.5 * tl.load(s_ptr, mask=j_ok, other=0.0)[:, None]
    sa_im = 0.5 * tl.load(s_ptr + 1, mask=j_ok, other=0.0)[:, None]
    sb_re = 0.5 * tl.load(s_ptr + M_OUT * 2, mask=j_ok, other=0.0)[:, None]
    sb_im = 0.5 * tl.load(s_ptr + M_OUT * 2 + 1, mask=j_ok, other=0.0)[:, None]
    # A z = (s_re P + i s_im Q)(x_re + i x_im);  B z̄ = (s_re P + i s_im Q)(x_re − i x_im)
    w_re = sa_re * pa_re - sa_im * qa_im + sb_re * pb_re + sb_im * qb_im  # [BLOCK_N, BLOCK_M]
    w_im = sa_re * pa_im + sa_im * qa_re - sb_re * pb_im + sb_im * qb_re
    _store_complex_rows(tl.trans(w_re), tl.trans(w_im), rm, rj, j_ok, M, M_OUT, BIAS, C, PARTIAL, ARRIVED, stride_cm, HAS_BIAS, BLOCK_M, BLOCK_N)


# The tensor-core kernel's configurations (64 code rows per warp group); bench_fairy2i.py times each.
TENSOR_CORE_CONFIGS = [
    {"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": sp, "num_warps": w, "num_stages": 3}
    for bn, w in ((64, 4), (128, 4), (128, 8)) for bk in (64, 128, 256) for sp in (2, 4, 8)
]
# The autotuner's: those among the five fastest at 4096 × 4096, 11008 × 4096 or 4096 × 11008 (two
# stages, one token, H100; benchmarks/results/fairy2i_gemv_tc_h100.json), (BLOCK_N, BLOCK_K, SPLIT, warps).
_TENSOR_CORE_TUNED = {(64, 256, 4, 4), (64, 128, 4, 4), (128, 128, 4, 8), (128, 256, 4, 8), (64, 256, 2, 4),
                      (64, 128, 2, 4), (64, 64, 2, 4), (64, 64, 8, 4), (64, 128, 8, 4), (128, 64, 8, 8)}
_fairy2i_mma = triton.autotune(
    configs=autotune_configs(
        [c for c in TENSOR_CORE_CONFIGS if (c["BLOCK_N"], c["BLOCK_K"], c["SPLIT"], c["num_warps"]) in _TENSOR_CORE_TUNED],
        {"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT": 2},
    ),
    key=["M", "M_OUT", "N_IN"],
)(_fairy2i_mma_kernel)

_MAX_SPLIT, _SMALLEST_BLOCK_N = splits_and_smallest_block(_fairy2i, _fairy2i_mma, split="SPLIT")


@triton.jit
def _store_complex_rows(w_re, w_im, rm, rj, j_ok, M, M_OUT, BIAS, C, PARTIAL, ARRIVED, stride_cm,
                        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_M, BLOCK_N] real and imaginary parts of complex rows rj → output columns rj and M_OUT + rj
    (rows past the end masked), through store_output_tile (splits and stages added there)."""
    out = tl.reshape(tl.join(w_re, w_im), (BLOCK_M, 2 * BLOCK_N))
    rj2 = tl.reshape(tl.join(rj, rj + M_OUT), (2 * BLOCK_N,))
    ok2 = tl.reshape(tl.join(j_ok, j_ok), (2 * BLOCK_N,))
    cols = tl.where(ok2, rj2, 2 * M_OUT)
    store_output_tile(out, tl.program_id(2), rm, cols, M, 2 * M_OUT, BIAS, C, PARTIAL, ARRIVED, stride_cm, HAS_BIAS, BLOCK_M, 2 * BLOCK_N)


def on_tensor_cores_by_default(dtype: torch.dtype, stages: int) -> bool:
    """The default kernel: the tensor cores for 16-bit activations and two or more stages, 1.45–1.6×
    faster than the multiplication-free kernel there (H100, bf16, one token, benchmarks/bench_fairy2i.py
    --tensor-cores); one stage keeps the multiplication-free kernel (the tensor cores untimed there),
    and so does float32 (exact float32 products do not run on the tensor cores)."""
    return dtype in (torch.bfloat16, torch.float16) and stages >= 2


def fairy2i_linear(x, codes, scales, bias, config: dict | None = None, tensor_cores: bool | None = None) -> torch.Tensor:
    """x [M, 2n] (M ≤ 16) with codes [stages, 2, m, n/4], scales [stages, 2, m, 2] → [M, 2m] in x's dtype.

    tensor_cores: run _fairy2i_mma_kernel (True) or the multiplication-free _fairy2i_kernel (False);
    by default as on_tensor_cores_by_default says.
    config: one configuration in place of autotuning, for tests and sweeps; one with BLOCK_K is the
    tensor-core kernel's (BLOCK_N, BLOCK_K, SPLIT, num_warps, num_stages)."""
    m_tokens = x.shape[0]
    stages, _, m_out, quarter = codes.shape
    if m_tokens > 16:
        raise ValueError(f"the Fairy2i kernel is for 1-16 tokens, not {m_tokens}")
    out = torch.empty((m_tokens, 2 * m_out), dtype=x.dtype, device=x.device)
    splits, smallest_block = (config["SPLIT"], config["BLOCK_N"]) if config else (_MAX_SPLIT, _SMALLEST_BLOCK_N)
    partial = torch.empty((stages * splits * m_tokens * 2 * m_out,), dtype=torch.float32, device=x.device)
    arrived = arrival_counters(x.device, triton.cdiv(m_out, smallest_block))
    codes, scales = codes.contiguous(), scales.float().contiguous()
    if config is not None:
        tensor_cores = "BLOCK_K" in config
    elif tensor_cores is None:
        tensor_cores = on_tensor_cores_by_default(x.dtype, stages)
    if tensor_cores:
        block_m = max(8, triton.next_power_of_2(m_tokens))  # the tokens' real and imaginary parts: ≥ 16 columns
        kernel = _fairy2i_mma if config is None else _fairy2i_mma_kernel
        kernel[lambda meta: (triton.cdiv(m_out, meta["BLOCK_N"]), triton.cdiv(m_tokens, block_m), stages * meta["SPLIT"])](
            x, codes, scales, bias if bias is not None else scales, out, partial, arrived,
            m_tokens, m_out, 4 * quarter, x.stride(0), codes.stride(0), codes.stride(1), codes.stride(2), out.stride(0),
            HAS_BIAS=bias is not None, DOT_IN_FP32=INTERPRETING, BLOCK_M=block_m, **(config or {}),
        )
        return out
    per_unit = 16 if quarter % 4 == 0 else 4  # int32 words (little-endian: byte k holds inputs 4k..4k+3)
    if per_unit == 16:
        codes = codes.view(torch.int32)
    kernel = _fairy2i if config is None else _fairy2i_kernel
    kernel[lambda meta: (triton.cdiv(m_out, meta["BLOCK_N"]), 1, stages * meta["SPLIT"])](
        x, codes, scales, bias if bias is not None else scales, out, partial, arrived,
        m_tokens, m_out, 4 * quarter, x.stride(0), codes.stride(0), codes.stride(1), codes.stride(2), out.stride(0),
        HAS_BIAS=bias is not None, PER_UNIT=per_unit, BLOCK_M=triton.next_power_of_2(m_tokens), **(config or {}),
    )
    return out
