"""Prefix attention Triton kernels (flash-attention style): forward, and backward for dQ, dK, dV.

The packed layout and its mask are those of effcc.ops.prefix_attention: query i sees key j iff
group_start[i] ≤ j ≤ i and (j < prefix_end[i] or j ≥ segment_start[i]); equivalently iff
j ≤ i < visible_until[j].

forward       one program per (head, query block), the last blocks first; online softmax in the log2 domain, fp32
              accumulators.  A query block reads only two key ranges: the prefix part
              [group start, prefix end) of its suffix rows and the own-segment part
              [first segment start, last row]; the keys in between (the other suffixes of the
              group) are never loaded.  Each range is cut into a masked head, a middle of whole
              key blocks that every row of the query block sees (no mask computed there) and a
              masked tail (the diagonal).  Blocks may straddle segments and groups: rows then
              see different keys, and the per-element mask sorts it out.
backward      delta = rowsum(dO · O) first (a small kernel), then one launch whose programs are
              dK, dV: one per (kv head, key block); its queries are the contiguous range
                      [block start, max visible_until of the block), for every query head that
                      reads the kv head, so the sum over shared heads needs no atomics;
              dQ:     one per (head, query block), the key ranges of the forward;
              interleaved heaviest first.  Both mask with visible_until (two comparisons per
              element instead of five).

fp16 and bf16 multiply on the tensor cores; fp32 inputs too, as three TF32 products each
(about fp32 accuracy: the fp32 path stays with the reference).  Head dims up to 256, any size
(BLOCK_D is the next power of two, columns past D masked).

Block sizes are autotuned on the GPU (key: head dim and N rounded up to a power of two, so a
new packed length does not retune); under TRITON_INTERPRET=1 (CPU tests) each kernel has one
small configuration.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from .quantized_linear import INTERPRETING, autotune_configs

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x · log2 e): the kernels work in base 2
LN2 = tl.constexpr(0.6931471805599453)
MAX_HEAD_DIM = 256
MAX_TOKENS = 65535 * 32  # the forward's query blocks (at least 32 rows on the GPU) lie on grid axis 1; the backward's grid is one axis


# ---- shared pieces --------------------------------------------------------------------------------
@triton.jit
def _dot(a, b):
    """a @ b with fp32 accumulation.  fp32 operands take three TF32 products (hi·hi + hi·lo + lo·hi):
    about fp32 accuracy on the tensor cores, where one TF32 product would drift from the reference by
    ~1e-3 and IEEE products compile to unrolled FMAs that spill heavily."""
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="tf32x3")
    else:
        return tl.dot(a, b)


@triton.jit
def _unmasked_span(start, end, full_lo, full_hi, BLOCK: tl.constexpr):
    """Split [start, end) into masked [start, lo), unmasked [lo, hi), masked [hi, end): [lo, hi)
    is the longest run of whole blocks inside [full_lo, full_hi), where no element is masked."""
    end = tl.maximum(end, start)
    lo = tl.minimum(tl.maximum(full_lo, start), end)
    hi = tl.maximum(tl.minimum(full_hi, end), lo)
    hi = lo + (hi - lo) // BLOCK * BLOCK
    return lo, hi, end


@triton.jit
def _key_ranges(GS, PE, SS, m0, N, BLOCK_M: tl.constexpr):
    """The keys that the queries [m0, m0 + BLOCK_M) may see, as two ranges, each with the span
    that every row of the block sees:

      prefix part   [min group start, min(max prefix end, first segment start)) of the suffix rows
                    (a prefix row's prefix keys lie in its own segment, the second range)
      own segments  [min segment start, last row]

    The keys between the two (other suffixes of the group) are masked for every row."""
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    gs = tl.load(GS + rows, mask=row_ok, other=0)
    pe = tl.load(PE + rows, mask=row_ok, other=0)
    ss = tl.load(SS + rows, mask=row_ok, other=0)
    suffix_row = row_ok & (ss >= pe)
    first_own = tl.min(tl.where(row_ok, ss, N), axis=0)
    prefix_lo = tl.min(tl.where(suffix_row, gs, N), axis=0)
    prefix_hi = tl.minimum(tl.max(tl.where(suffix_row, pe, 0), axis=0), first_own)
    own_hi = tl.minimum(m0 + BLOCK_M, N)
    # Seen by every row: j ≥ every group start and j < every prefix end (prefix part), j ≥
    # every segment start (own part), and j ≤ the first row (causality) in both.
    causal_hi = m0 + 1
    prefix_full_lo = tl.max(gs, axis=0)
    prefix_full_hi = tl.minimum(tl.min(tl.where(row_ok, pe, N), axis=0), causal_hi)
    own_full_lo = tl.max(ss, axis=0)
    return gs, pe, ss, prefix_lo, prefix_hi, prefix_full_lo, prefix_full_hi, first_own, own_hi, own_full_lo, causal_hi


@triton.jit
def _heaviest_first(BLOCK_M: tl.constexpr):
    """The first row of this program's query block, last block first.  Causal rows see more keys the
    later they come, so the heaviest blocks start first and the light ones fill the last wave; the
    grid is (heads, blocks), so every head's heavy blocks come before any head's light ones.
    Measured on an H200 (bf16, D = 64, 16 heads, one prefix and G suffixes): the forward 4–14 %
    faster.  The backward's dQ programs take the same order (_backward_kernel)."""
    return (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M


@triton.jit
def _key_walk(K_HEAD, V_HEAD, stride_kn, stride_vn, start, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pointers for walking key/value blocks from row `start`.

    Scalar pointers to the block's first row step through the loop (64-bit: a packed row index
    times a stride may pass 2³¹); the tile's offsets within a block stay fixed.  Carrying whole
    tiles of pointers instead costs registers that the accumulators need."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    k_row = K_HEAD + start.to(tl.int64) * stride_kn
    v_row = V_HEAD + start.to(tl.int64) * stride_vn
    k_tile = offs_n[:, None] * stride_kn + offs_d[None, :]
    v_tile = offs_n[:, None] * stride_vn + offs_d[None, :]
    return offs_n, d_ok, k_row, v_row, k_tile, v_tile


@triton.jit
def _load_kv(k_row, v_row, k_tile, v_tile, col_ok, d_ok):
    k = tl.load(k_row + k_tile, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    v = tl.load(v_row + v_tile, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    return k, v


# ---- forward --------------------------------------------------------------------------------------
@triton.jit
def _attend(acc, m_i, l_i, q, K_HEAD, V_HEAD, stride_kn, stride_vn, rows, gs, pe, ss, start, end, qk_scale,
            HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Online softmax over the keys [start, end) (log2 domain: scores are pre-multiplied by log2 e)."""
    offs_n, d_ok, k_row, v_row, k_tile, v_tile = _key_walk(K_HEAD, V_HEAD, stride_kn, stride_vn, start, HEAD_DIM, BLOCK_N, BLOCK_D)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < end
        k, v = _load_kv(k_row, v_row, k_tile, v_tile, col_ok, d_ok)
        k_row += BLOCK_N * stride_kn
        v_row += BLOCK_N * stride_vn
        s = _dot(q, tl.trans(k)) * qk_scale
        if MASKED:
            j = cols[None, :]
            visible = (j >= gs[:, None]) & (j <= rows[:, None]) & ((j < pe[:, None]) | (j >= ss[:, None])) & col_ok[None, :]
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # A row may have seen no key yet (block straddling groups): exp2(-inf - -inf) is NaN.
            m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_base = m_new
        p = tl.exp2(s - m_base[:, None])
        alpha = tl.exp2(m_i - m_base)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _query_rows(m0, N, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """The rows [m0, m0 + BLOCK_M) of a query block: (rows, offs_d, row_ok, io_mask).

    No pointer goes in: Inductor reads which tensors a kernel writes from its Triton IR, following a
    store's address back through every argument of each call it came out of.  Rows made by a
    function that also took Q would make each store through them count as a write to Q, and
    Inductor would copy q (a 2 × N × H × D-byte clone) before every launch, forward and backward."""
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    io_mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    return rows, offs_d, row_ok, io_mask


@triton.jit
def _row_tile(X, head, stride_xh, stride_xn, rows, offs_d, io_mask):
    """The [rows, head] tile of an [H, N, D] tensor (zeros where io_mask is off)."""
    return tl.load(X + head.to(tl.int64) * stride_xh + rows[:, None].to(tl.int64) * stride_xn + offs_d[None, :], mask=io_mask, other=0.0)


@triton.jit
def _part_spans(part: tl.constexpr, p_lo, p_hi, p_full_lo, p_full_hi, o_lo, o_hi, o_full_lo, o_full_hi, BLOCK_N: tl.constexpr):
    """(start, lo, hi, end) of a query block's keys in part 0 (its prefix) or 1 (its own segments):
    [start, lo) and [hi, end) need the mask, [lo, hi) is visible to every row."""
    if part == 0:
        start = p_lo
        lo, hi, end = _unmasked_span(p_lo, p_hi, p_full_lo, p_full_hi, BLOCK_N)
    else:
        start = o_lo
        lo, hi, end = _unmasked_span(o_lo, o_hi, o_full_lo, o_full_hi, BLOCK_N)
    return start, lo, hi, end


@triton.jit
def _forward_kernel(
    Q, K, V, O, LSE, GS, PE, SS,
    stride_qh, stride_qn, stride_kh, stride_kn, stride_vh, stride_vn, stride_oh, stride_on,
    N, N_BUCKET, heads_per_kv, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor passes Python floats as fp64: keep the math (and loop state) fp32
    head, m0 = tl.program_id(0), _heaviest_first(BLOCK_M)
    kv_head = head // heads_per_kv
    rows, offs_d, row_ok, io_mask = _query_rows(m0, N, HEAD_DIM, BLOCK_M, BLOCK_D)
    q = _row_tile(Q, head, stride_qh, stride_qn, rows, offs_d, io_mask)
    K_HEAD = K + kv_head.to(tl.int64) * stride_kh
    V_HEAD = V + kv_head.to(tl.int64) * stride_vh

    gs, pe, ss, p_lo, p_hi, p_full_lo, p_full_hi, o_lo, o_hi, o_full_lo, o_full_hi = _key_ranges(GS, PE, SS, m0, N, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for part in tl.static_range(2):  # the prefix part, then the own segments
        start, lo, hi, end = _part_spans(part, p_lo, p_hi, p_full_lo, p_full_hi, o_lo, o_hi, o_full_lo, o_full_hi, BLOCK_N)
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, K_HEAD, V_HEAD, stride_kn, stride_vn, rows, gs, pe, ss, start, lo, qk_scale,
                                HEAD_DIM, True, BLOCK_N, BLOCK_D)
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, K_HEAD, V_HEAD, stride_kn, stride_vn, rows, gs, pe, ss, lo, hi, qk_scale,
                                HEAD_DIM, False, BLOCK_N, BLOCK_D)
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, K_HEAD, V_HEAD, stride_kn, stride_vn, rows, gs, pe, ss, hi, end, qk_scale,
                                HEAD_DIM, True, BLOCK_N, BLOCK_D)

    l_i = tl.where(row_ok, l_i, 1.0)  # rows past N (never stored) saw keys too; keep them finite anyway
    out = acc / l_i[:, None]
    tl.store(O + head.to(tl.int64) * stride_oh + rows[:, None].to(tl.int64) * stride_on + offs_d[None, :], out.to(O.dtype.element_ty), mask=io_mask)
    tl.store(LSE + head.to(tl.int64) * N + rows, (m_i + tl.log2(l_i)) * LN2, mask=row_ok)


# ---- backward -------------------------------------------------------------------------------------
@triton.jit
def _delta_kernel(O, DO, DELTA, stride_oh, stride_on, stride_doh, stride_don, N,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[h, i] = Σ_d dO · O: the row term of the softmax gradient, dS = P ∘ (dP − delta)."""
    head = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < N)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + head * stride_oh + rows[:, None].to(tl.int64) * stride_on + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + head * stride_doh + rows[:, None].to(tl.int64) * stride_don + offs_d[None, :], mask=mask, other=0.0)
    tl.store(DELTA + head * N + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1), mask=rows < N)


@triton.jit
def _dkdv_from_queries(dk, dv, k, v, Q_HEAD, DO_HEAD, LSE_HEAD, DELTA_HEAD, stride_qn, stride_don, cols, vu, start, end, qk_scale,
                       HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Accumulate dK, dV of one key block over the queries [start, end) of one head, transposed
    (keys along rows) so that Pᵀ and dSᵀ come out of the products in the layout dK, dV need."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_row = Q_HEAD + start.to(tl.int64) * stride_qn  # scalar pointers step, tile offsets stay (see _attend)
    do_row = DO_HEAD + start.to(tl.int64) * stride_don
    qT_tile = offs_m[None, :] * stride_qn + offs_d[:, None]
    do_tile = offs_m[:, None] * stride_don + offs_d[None, :]
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + offs_m
        row_ok = rows < end
        qT = tl.load(q_row + qT_tile, mask=row_ok[None, :] & d_ok[:, None], other=0.0)
        do = tl.load(do_row + do_tile, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        q_row += BLOCK_M * stride_qn
        do_row += BLOCK_M * stride_don
        lse = tl.load(LSE_HEAD + rows, mask=row_ok, other=0.0) * LOG2E
        delta = tl.load(DELTA_HEAD + rows, mask=row_ok, other=0.0)
        pT = tl.exp2(_dot(k, qT) * qk_scale - lse[None, :])
        if MASKED:
            i = rows[None, :]
            pT = tl.where((i >= cols[:, None]) & (i < vu[:, None]) & row_ok[None, :], pT, 0.0)
        dv += _dot(pT.to(do.dtype), do)
        dpT = _dot(v, tl.trans(do))
        dsT = pT * (dpT - delta[None, :])
        dk += _dot(dsT.to(qT.dtype), tl.trans(qT))
    return dk, dv


@triton.jit
def _dkdv_program(Q, K, V, DO, LSE, DELTA, DK, DV, VU,
                  stride_qh, stride_qn, stride_kh, stride_kn, stride_vh, stride_vn, stride_doh, stride_don,
                  stride_dkh, stride_dkn, stride_dvh, stride_dvn, kv_head, n0, N, heads_per_kv, qk_scale, sm_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dK, dV of the keys [n0, n0 + BLOCK_N) of one kv head, over every query head that reads it (the
    sum over shared heads needs no atomics)."""
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = cols < N
    io_mask = col_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(K + kv_head.to(tl.int64) * stride_kh + cols[:, None].to(tl.int64) * stride_kn + offs_d[None, :], mask=io_mask, other=0.0)
    v = tl.load(V + kv_head.to(tl.int64) * stride_vh + cols[:, None].to(tl.int64) * stride_vn + offs_d[None, :], mask=io_mask, other=0.0)
    vu = tl.load(VU + cols, mask=col_ok, other=0)  # keys past N are seen by no query

    # The queries of key j are [j, visible_until[j]): those of the block are [n0, max vu), and
    # rows in [last key, min vu) see every key of the block.
    end = tl.max(vu, axis=0)
    lo, hi, end = _unmasked_span(n0, end, n0 + BLOCK_N - 1, tl.min(tl.where(col_ok, vu, N), axis=0), BLOCK_M)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    first_head = (kv_head * heads_per_kv).to(tl.int64)
    Q_HEAD, DO_HEAD = Q + first_head * stride_qh, DO + first_head * stride_doh
    LSE_HEAD, DELTA_HEAD = LSE + first_head * N, DELTA + first_head * N
    for _ in range(heads_per_kv):  # the query heads that read this kv head
        dk, dv = _dkdv_from_queries(dk, dv, k, v, Q_HEAD, DO_HEAD, LSE_HEAD, DELTA_HEAD, stride_qn, stride_don, cols, vu, n0, lo, qk_scale,
                                    HEAD_DIM, True, BLOCK_M, BLOCK_D)
        dk, dv = _dkdv_from_queries(dk, dv, k, v, Q_HEAD, DO_HEAD, LSE_HEAD, DELTA_HEAD, stride_qn, stride_don, cols, vu, lo, hi, qk_scale,
                                    HEAD_DIM, False, BLOCK_M, BLOCK_D)
        dk, dv = _dkdv_from_queries(dk, dv, k, v, Q_HEAD, DO_HEAD, LSE_HEAD, DELTA_HEAD, stride_qn, stride_don, cols, vu, hi, end, qk_scale,
                                    HEAD_DIM, True, BLOCK_M, BLOCK_D)
        Q_HEAD += stride_qh
        DO_HEAD += stride_doh
        LSE_HEAD += N
        DELTA_HEAD += N
    dk *= sm_scale  # dS was taken with respect to the scaled scores
    tl.store(DK + kv_head.to(tl.int64) * stride_dkh + cols[:, None].to(tl.int64) * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=io_mask)
    tl.store(DV + kv_head.to(tl.int64) * stride_dvh + cols[:, None].to(tl.int64) * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=io_mask)


@triton.jit
def _dq_from_keys(dq, q, do, lse, delta, K_HEAD, V_HEAD, VU, stride_kn, stride_vn, rows, start, end, qk_scale,
                  HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Accumulate dQ of one query block over the keys [start, end)."""
    offs_n, d_ok, k_row, v_row, k_tile, v_tile = _key_walk(K_HEAD, V_HEAD, stride_kn, stride_vn, start, HEAD_DIM, BLOCK_N, BLOCK_D)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < end
        k, v = _load_kv(k_row, v_row, k_tile, v_tile, col_ok, d_ok)
        k_row += BLOCK_N * stride_kn
        v_row += BLOCK_N * stride_vn
        p = tl.exp2(_dot(q, tl.trans(k)) * qk_scale - lse[:, None])
        if MASKED:
            vu = tl.load(VU + cols, mask=col_ok, other=0)
            i = rows[:, None]
            p = tl.where((cols[None, :] <= i) & (i < vu[None, :]), p, 0.0)
        dp = _dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k)
    return dq


@triton.jit
def _dq_program(Q, K, V, DO, LSE, DELTA, DQ, GS, PE, SS, VU,
                stride_qh, stride_qn, stride_kh, stride_kn, stride_vh, stride_vn, stride_doh, stride_don, stride_dqh, stride_dqn,
                head, m0, N, heads_per_kv, qk_scale, sm_scale,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dQ of the queries [m0, m0 + BLOCK_M) of one head, over the key ranges of the forward."""
    kv_head = head // heads_per_kv
    rows, offs_d, row_ok, io_mask = _query_rows(m0, N, HEAD_DIM, BLOCK_M, BLOCK_D)
    q = _row_tile(Q, head, stride_qh, stride_qn, rows, offs_d, io_mask)
    do = _row_tile(DO, head, stride_doh, stride_don, rows, offs_d, io_mask)
    lse = tl.load(LSE + head.to(tl.int64) * N + rows, mask=row_ok, other=0.0) * LOG2E
    delta = tl.load(DELTA + head.to(tl.int64) * N + rows, mask=row_ok, other=0.0)
    K_HEAD = K + kv_head.to(tl.int64) * stride_kh
    V_HEAD = V + kv_head.to(tl.int64) * stride_vh
    _gs, _pe, _ss, p_lo, p_hi, p_full_lo, p_full_hi, o_lo, o_hi, o_full_lo, o_full_hi = _key_ranges(GS, PE, SS, m0, N, BLOCK_M)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for part in tl.static_range(2):  # the prefix part, then the own segments
        start, lo, hi, end = _part_spans(part, p_lo, p_hi, p_full_lo, p_full_hi, o_lo, o_hi, o_full_lo, o_full_hi, BLOCK_N)
        dq = _dq_from_keys(dq, q, do, lse, delta, K_HEAD, V_HEAD, VU, stride_kn, stride_vn, rows, start, lo, qk_scale, HEAD_DIM, True, BLOCK_N, BLOCK_D)
        dq = _dq_from_keys(dq, q, do, lse, delta, K_HEAD, V_HEAD, VU, stride_kn, stride_vn, rows, lo, hi, qk_scale, HEAD_DIM, False, BLOCK_N, BLOCK_D)
        dq = _dq_from_keys(dq, q, do, lse, delta, K_HEAD, V_HEAD, VU, stride_kn, stride_vn, rows, hi, end, qk_scale, HEAD_DIM, True, BLOCK_N, BLOCK_D)
    dq *= sm_scale
    tl.store(DQ + head.to(tl.int64) * stride_dqh + rows[:, None].to(tl.int64) * stride_dqn + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=io_mask)


@triton.jit
def _backward_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DK, DV, GS, PE, SS, VU,
    stride_qh, stride_qn, stride_kh, stride_kn, stride_vh, stride_vn, stride_doh, stride_don,
    stride_dqh, stride_dqn, stride_dkh, stride_dkn, stride_dvh, stride_dvn,
    N, N_BUCKET, heads_per_kv, kv_heads, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK/dV and dQ on one grid: dK/dV programs (heads fastest, the heavy prefix key blocks first, read
    by up to P + G·S queries each against at most S for a suffix's) alternate with dQ programs (heads
    fastest, the heavy last query blocks first), the rest of the longer list after them.  Both
    lists go from heavy to light, so the light programs of each fill the last wave rather than the
    tail of two launches.  Measured on an H100 (bf16, D = 64, 16 heads, P = 1024, G = 4, S = 256):
    0.086 ms against 0.095 for the two kernels apart, each with its best grid order."""
    qk_scale, sm_scale = tl.cast(qk_scale, tl.float32), tl.cast(sm_scale, tl.float32)  # Inductor passes Python floats as fp64
    pid = tl.program_id(0)
    heads = kv_heads * heads_per_kv
    dkdv_programs = kv_heads * tl.cdiv(N, BLOCK_N)
    query_blocks = tl.cdiv(N, BLOCK_M)
    dq_programs = heads * query_blocks
    paired = tl.minimum(dkdv_programs, dq_programs)
    if pid < 2 * paired:
        is_dq = pid % 2 == 1
        index = pid // 2
    else:
        is_dq = dq_programs > dkdv_programs
        index = pid - paired
    if is_dq:
        _dq_program(Q, K, V, DO, LSE, DELTA, DQ, GS, PE, SS, VU,
                    stride_qh, stride_qn, stride_kh, stride_kn, stride_vh, stride_vn, stride_doh, stride_don, stride_dqh, stride_dqn,
                    index % heads, (query_blocks - 1 - index // heads) * BLOCK_M, N, heads_per_kv, qk_scale, sm_scale,
                    HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D)
    else:
        _dkdv_program(Q, K, V, DO, LSE, DELTA, DK, DV, VU,
                      stride_qh, stride_qn, stride_kh, stride_kn, stride_vh, stride_vn, stride_doh, stride_don,
                      stride_dkh, stride_dkn, stride_dvh, stride_dvn, index % kv_heads, (index // kv_heads) * BLOCK_N, N, heads_per_kv,
                      qk_scale, sm_scale, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D)


# ---- configurations ---------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, warps, stages) for head dims up to 128, and past 128 (tiles of at most 64
# rows, fewer stages: shared memory; the last fits fp32 at D = 256).  The backward's BLOCK_N is a dK/dV
# program's key block and a dQ program's key step, BLOCK_M a dQ program's query block and a dK/dV
# program's query step.  Measured on an H100 (bf16, D = 64, N = 4096, causal and 2 × (P = 1024 +
# 4 × 256)): 64 × 64, 4 warps, 3 stages was the fastest for the forward and the separate dK/dV and dQ
# kernels of the time; the rest are there for other head dims, lengths and dtypes.
_TILES = {
    "forward": ([(64, 64, 4, 3), (64, 64, 4, 2), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3)],
                [(64, 64, 4, 2), (64, 64, 8, 2), (32, 32, 4, 2)]),
    "backward": ([(64, 64, 4, 3), (32, 64, 4, 3), (64, 32, 4, 3), (64, 64, 4, 2), (64, 128, 8, 3), (128, 64, 8, 3)],
                 [(32, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2), (16, 32, 4, 2)]),
}
# More tiles for short packed sequences (head dims ≤ 128): 32 rows where each program walks the whole
# sequence (the queries of the forward and of dQ, the keys of dK/dV).  The heaviest program (the last
# query block; the first prefix key block for dK/dV) runs through all N rows, and at N ≈ 2000–3000
# that path is longer than the average work per SM; halving its tile halves it while the grid grows to
# fill the SMs.  Kept out at longer lengths, where the work per SM is far longer than any one program:
# under torch.compile Inductor tunes a kernel once, on the first length it sees, and so tunes each
# class of lengths apart (SHORT_SEQUENCE: the compiled graph guards on the class).
SHORT_SEQUENCE = 4096
_SHORT_TILES = {"forward": [(32, 64, 4, 3)], "backward": [(32, 32, 4, 3)]}
# The interpreter's block sizes: small, and different between the kernels so that the tests see
# blocks straddle segments in different places.
_SMALL = {"forward": (16, 16), "backward": (16, 32)}
_KEY = ["N_BUCKET", "HEAD_DIM"]


def _tuned(kernel, name: str) -> dict[tuple[bool, bool], triton.runtime.Autotuner]:
    """`kernel` autotuned over _TILES[name], by (head dim > 128, N ≤ SHORT_SEQUENCE): separate autotuners
    rather than prune_configs_by, which not every torch version traces."""
    small = {"BLOCK_M": _SMALL[name][0], "BLOCK_N": _SMALL[name][1], "num_warps": 4, "num_stages": 1}

    def autotuned(tiles):
        configs = [{"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": s} for m, n, w, s in tiles]
        return triton.autotune(configs=autotune_configs(configs, small), key=_KEY)(kernel)

    narrow, wide = _TILES[name]
    wide_tuned = autotuned(wide)
    return {(False, False): autotuned(narrow), (False, True): autotuned(narrow + _SHORT_TILES[name]),
            (True, False): wide_tuned, (True, True): wide_tuned}


_FORWARD = _tuned(_forward_kernel, "forward")
_BACKWARD = _tuned(_backward_kernel, "backward")
_DELTA_BLOCK_M = 16 if INTERPRETING else 64
# ---- entry points -----------------------------------------------------------------------------------
def _rows_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def tokens_major(shape: tuple[int, int, int], like: Tensor) -> Tensor:
    """An empty [H, N, D] tensor laid out as [N, H, D] in memory, as SDPA's kernels lay out theirs: the
    model reads the output as [N, H·D] (attention output to o_proj) and hands q, k, v and their
    gradients over in that layout, so tokens-major results need no copy on either side of the op."""
    heads, n, d = shape
    return torch.empty((n, heads, d), dtype=like.dtype, device=like.device).transpose(0, 1)


def _tiles_class(n, d: int) -> tuple[bool, bool]:
    """Which autotuner serves this call: (head dim > 128, N ≤ SHORT_SEQUENCE).  A symbolic N (Inductor
    tracing the op) makes that a guard, so a compiled graph serves one class of lengths."""
    return d > 128, bool(n <= SHORT_SEQUENCE)


def _n_bucket(n) -> int:
    """Autotuning key for the packed length: powers of two, so that new lengths reuse a tuning.
    A symbolic length (Inductor tracing the op) gets 0: Inductor tunes the kernel on its first
    call itself, and rounding a symbol would tie the compiled graph to one bucket."""
    return min(triton.next_power_of_2(n), 1 << 16) if isinstance(n, int) else 0


def _block_d(d: int) -> int:
    return max(triton.next_power_of_2(d), 16)


def _check(q: Tensor, k: Tensor, v: Tensor, group_start: Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"expected q [H, N, D] and k, v [Hkv, N, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    heads, n, d = q.shape
    if k.shape[1:] != (n, d) or heads % k.shape[0]:
        raise ValueError(f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)} (H must be a multiple of Hkv)")
    if n > MAX_TOKENS:
        raise ValueError(f"a packed sequence of {n} tokens is past the kernels' {MAX_TOKENS} (query blocks are a grid axis of at most 65535)")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head dim {d} is past the kernels' {MAX_HEAD_DIM}")
    if group_start.shape != (n,) or group_start.dtype != torch.int32:
        raise ValueError(f"layout vectors must be int32 [{n}], got {group_start.dtype} {tuple(group_start.shape)}")


def forward(q: Tensor, k: Tensor, v: Tensor, group_start: Tensor, prefix_end: Tensor, segment_start: Tensor,
            scale: float) -> tuple[Tensor, Tensor]:
    """q [H, N, D], k/v [Hkv, N, D] (query head h reads kv head h // (H / Hkv)), the layout's int32
    vectors [N] → (out [H, N, D] in q's dtype, tokens-major, lse float32 [H, N]: the natural-log
    log-sum-exp of each query's scaled scores, for the backward)."""
    _check(q, k, v, group_start)
    q, k, v = _rows_contiguous(q), _rows_contiguous(k), _rows_contiguous(v)
    heads, n, d = q.shape
    out = tokens_major((heads, n, d), q)
    lse = torch.empty((heads, n), dtype=torch.float32, device=q.device)
    if n == 0 or heads == 0:
        return out, lse
    wrap_triton(_FORWARD[_tiles_class(n, d)])[lambda meta: (heads, triton.cdiv(n, meta["BLOCK_M"]))](
        q, k, v, out, lse, group_start, prefix_end, segment_start,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        n, _n_bucket(n), heads // k.shape[0], scale * LOG2E.value,
        HEAD_DIM=d, BLOCK_D=_block_d(d),
    )
    return out, lse


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, group_start: Tensor, prefix_end: Tensor,
             segment_start: Tensor, visible_until: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dq [H, N, D], dk [Hkv, N, D], dv [Hkv, N, D]) in the dtypes of q, k, v, tokens-major; dk and
    dv summed over the query heads that share a kv head."""
    _check(q, k, v, group_start)
    q, k, v = _rows_contiguous(q), _rows_contiguous(k), _rows_contiguous(v)
    grad_out, out, lse = _rows_contiguous(grad_out), _rows_contiguous(out), lse.contiguous()
    heads, n, d = q.shape
    kv_heads = k.shape[0]
    dq, dk, dv = tokens_major((heads, n, d), q), tokens_major((kv_heads, n, d), k), tokens_major((kv_heads, n, d), v)
    if n == 0 or heads == 0:
        return dq, dk, dv
    block_d = _block_d(d)
    delta = torch.empty((heads, n), dtype=torch.float32, device=q.device)
    wrap_triton(_delta_kernel)[(triton.cdiv(n, _DELTA_BLOCK_M), heads)](
        out, grad_out, delta, out.stride(0), out.stride(1), grad_out.stride(0), grad_out.stride(1), n,
        HEAD_DIM=d, BLOCK_M=_DELTA_BLOCK_M, BLOCK_D=block_d,
    )

    def grid(meta):
        return (kv_heads * triton.cdiv(n, meta["BLOCK_N"]) + heads * triton.cdiv(n, meta["BLOCK_M"]),)

    wrap_triton(_BACKWARD[_tiles_class(n, d)])[grid](
        q, k, v, grad_out, lse, delta, dq, dk, dv, group_start, prefix_end, segment_start, visible_until,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), grad_out.stride(0), grad_out.stride(1),
        dq.stride(0), dq.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        n, _n_bucket(n), heads // kv_heads, kv_heads, scale * LOG2E.value, scale, HEAD_DIM=d, BLOCK_D=block_d,
    )
    return dq, dk, dv
