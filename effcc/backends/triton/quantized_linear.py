"""Triton kernels for effcc's quantised linears (layouts: effcc.ops.quantized_linear).

quantize_rows      x [M, K] float → int8 codes [M, K] and one float32 scale per row
                   (symmetric, absmax / 127): one program per row, the row in registers.
int8_linear        int8 [M, K] × int8 [N, K]ᵀ → int32 on the tensor cores, tiles brought in
                   by the tensor memory accelerator (TMA descriptors); the epilogue rescales
                   by row scale × channel scale, adds the bias and casts, so the int32
                   product never reaches memory.
int4_linear        x [M, K] (bf16 / fp16 / fp32) × 4-bit codes [N, K/2] with a scale and zero
                   point per group of the input dimension, by token count:
                   1-16 tokens tensor cores on one 16-row tile of tokens (the rest padding), scale
                               per group, the codes wgmma's register operand or the second one:
                               they become q − z, exact in 16 bits, by PTX (0x4300 | q is the
                               bfloat16 128 + q, 0x6400 | q the float16 1024 + q; then one paired
                               subtraction of 128 + z), about 1.5 instructions a code.  Up to
                               2026-12 one token took a CUDA-core GEMV (git history): the tensor
                               cores were 2-13% faster, at about 3.5 instructions a weight to its 5.5.
                   more        dequantise once (a Triton kernel) and the library GEMM.
                   The decode kernel can split the input dimension over programs (SPLIT_K);
                   the last program of a tile to arrive adds the partial sums and resets the
                   tile's counter (one launch, no memset: arrival_counters).

The GEMM and the decode kernel are autotuned per (N, K, M bucket).  Under TRITON_INTERPRET=1 (CPU tests) each
has one small configuration so that tests stay fast.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
# Triton's interpreter multiplies bfloat16 matrices wrongly (3.9: off by 1e10); there the
# int4 kernel's products run on float32 copies of the same exact values.


# EFFCC_TRITON_CONFIGS=smallest: on a GPU, each kernel's configuration with the smallest tiles alone (it fits
# in shared memory wherever any does), no autotuning.  For test runs on a GPU, where autotuning every
# kernel for every shape costs minutes.
SMALLEST_CONFIG_ONLY = os.environ.get("EFFCC_TRITON_CONFIGS") == "smallest"


def _tile_footprint(config: dict) -> int:
    """Elements of a configuration's tiles times its pipeline stages: what its shared memory grows with."""
    size = config.get("num_stages", 3)
    for name, value in config.items():
        if name.startswith("BLOCK_"):
            size *= value
    return size


def autotune_configs(full: list[dict], small: dict, pre_hook=None) -> list[triton.Config]:
    """Autotuning configurations: `full` on a GPU (the smallest alone under EFFCC_TRITON_CONFIGS=smallest),
    only `small` in the interpreter."""
    chosen = [small] if INTERPRETING else [min(full, key=_tile_footprint)] if SMALLEST_CONFIG_ONLY else full
    out = []
    for c in chosen:
        c = dict(c)
        warps, stages = c.pop("num_warps", 4), c.pop("num_stages", 3)
        out.append(triton.Config(c, num_warps=warps, num_stages=stages, pre_hook=pre_hook))
    return out


def m_bucket(m: int) -> int:
    """Autotuning key for the token count (the kernels' M_BUCKET argument, used only as a key):
    decode sizes exactly, then powers of two."""
    return m if m <= 16 else min(triton.next_power_of_2(m), 4096)


# ---- per-token int8 quantisation ----------------------------------------------------------------
@triton.jit
def _quantize_rows_kernel(X, Q, S, stride_x, stride_q, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0) / 127.0, 1e-12)
    q = _round_half_even(x / scale)
    q = tl.minimum(tl.maximum(q, -127.0), 127.0)
    tl.store(Q + row * stride_q + cols, q.to(tl.int8), mask=mask)
    tl.store(S + row, scale)


@triton.jit
def _round_half_even(v):
    """torch.round's rounding, in plain arithmetic (the interpreter has no rint)."""
    r = tl.floor(v + 0.5)
    tie_to_odd = ((r - v) == 0.5) & ((r - 2.0 * tl.floor(r * 0.5)) == 1.0)
    return tl.where(tie_to_odd, r - 1.0, r)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] → (int8 [M, K], float32 scales [M])."""
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    s = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m:
        block = triton.next_power_of_2(k)
        _quantize_rows_kernel[(m,)](x, q, s, x.stride(0), q.stride(0), k, BLOCK=block, num_warps=min(max(block // 512, 1), 16))
    return q, s


# ---- int8 × int8 GEMM with the rescale fused ------------------------------------------------------
def _set_tile_boxes(nargs):
    """Tensor-memory-accelerator loads copy one tile per request: its box is the config's tile."""
    nargs["A"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["B"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


_INT8_CONFIGS = autotune_configs(
    [
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": w, "num_stages": st}
        for bm, bn, w, st in [(128, 256, 8, 3), (128, 256, 8, 4), (128, 128, 8, 4), (256, 128, 8, 3), (256, 128, 8, 4),
                              (64, 128, 4, 4), (64, 64, 4, 5), (64, 256, 8, 3)]  # the last three: small M (decode)
    ],
    {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 1, "num_warps": 4, "num_stages": 2},
    pre_hook=_set_tile_boxes,
)


@triton.autotune(configs=_INT8_CONFIGS, key=["M_BUCKET", "N", "K"])
@triton.jit
def _int8_linear_kernel(
    A, B, A_SCALE, B_SCALE, BIAS, C,
    M, N, K, M_BUCKET, stride_cm,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped ordering: GROUP_M row blocks share each column block while it is in L2.
    pid = tl.program_id(0)
    blocks_m, blocks_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group
    off_m, off_n = pid_m * BLOCK_M, pid_n * BLOCK_N

    # A and B are tensor descriptors (TMA): tiles past the edges read as zeros.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, K, BLOCK_K):
        a = A.load([off_m, k])
        b = B.load([off_n, k])  # [BLOCK_N, BLOCK_K]: the weight as stored, K contiguous
        acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)

    rm = off_m + tl.arange(0, BLOCK_M)
    rn = off_n + tl.arange(0, BLOCK_N)
    a_scale = tl.load(A_SCALE + rm, mask=rm < M, other=0.0)
    b_scale = tl.load(B_SCALE + rn, mask=rn < N, other=0.0)
    out = acc.to(tl.float32) * a_scale[:, None] * b_scale[None, :]
    if HAS_BIAS:
        out += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    c_ptrs = C + rm[:, None].to(tl.int64) * stride_cm + rn[None, :]
    tl.store(c_ptrs, out.to(C.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def _pad_columns(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """TMA needs rows that start on 16-byte boundaries: zero columns add nothing to the products."""
    extra = -t.shape[1] % multiple
    return torch.nn.functional.pad(t, (0, extra)) if extra else t


def int8_linear(xq, x_scale, qweight, weight_scale, bias, out_dtype) -> torch.Tensor:
    """(xq int8 [M, K], x_scale f32 [M], qweight int8 [N, K], weight_scale f32 [N], bias [N]|None) → [M, N]."""
    m = xq.shape[0]
    n = qweight.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if m == 0:
        return out
    xq, qweight = _pad_columns(xq.contiguous(), 16), _pad_columns(qweight.contiguous(), 16)
    placeholder_box = [16, 16]  # replaced by each config's tile before launch (_set_tile_boxes)
    a = TensorDescriptor.from_tensor(xq, placeholder_box)
    b = TensorDescriptor.from_tensor(qweight, placeholder_box)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _int8_linear_kernel[grid](
        a, b, x_scale, weight_scale, bias if bias is not None else weight_scale, out,
        m, n, xq.shape[1], m_bucket(m), out.stride(0), HAS_BIAS=bias is not None,
    )
    return out


# ---- 4-bit weights, 16-bit activations -----------------------------------------------------------
@triton.jit
def store_output_tile(acc, pid_k, rm, rn, M, N, BIAS, C, PARTIAL, ARRIVED, stride_cm,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Write acc (+ bias) as the output; with a split input dimension (the grid's third axis,
    pid_k = tl.program_id(2)), add the splits first.

    Every split leaves its partial sum; the last program of a tile to arrive (counted with an
    acquire/release atomic) adds them up, writes the output and sets the tile's counter back
    to zero for the next launch (arrival_counters): one launch, no memset."""
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    splits = tl.num_programs(2)
    last = splits == 1
    if splits > 1:
        offsets = rm[:, None] * N + rn[None, :]
        tl.store(PARTIAL + pid_k * M * N + offsets, acc, mask=mask)
        tl.debug_barrier()
        tile = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        last = tl.atomic_add(ARRIVED + tile, 1, sem="acq_rel") == splits - 1
        if last:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for split in range(splits):
                acc += tl.load(PARTIAL + split * M * N + offsets, mask=mask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(ARRIVED + tile, 0)
    if last:
        if HAS_BIAS:
            acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(C + rm[:, None].to(tl.int64) * stride_cm + rn[None, :], acc.to(C.dtype.element_ty), mask=mask)


_COUNTERS: dict = {}


def arrival_counters(device: torch.device, count: int) -> torch.Tensor:
    """Zeroed int32 counters for store_output_tile, kept per device and stream: every launch
    leaves them at zero again, so no launch needs a memset of its own.  (While a CUDA graph is
    being captured a new buffer is made inside the graph instead, as memory allocated there
    belongs to the graph.)"""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    have = _COUNTERS.get(key)
    if have is not None and have.numel() >= count:
        return have
    counters = torch.zeros(max(count, 4096), dtype=torch.int32, device=device)
    if device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
        _COUNTERS[key] = counters
    return counters


@triton.jit
def _group_range(K, GROUP: tl.constexpr, SPLIT_K):
    groups = K // GROUP
    per_split = tl.cdiv(groups, SPLIT_K)
    start = tl.program_id(2) * per_split
    return start, tl.minimum(start + per_split, groups)


@triton.jit
def _int4_mma_kernel(
    X, QW, SCALES, ZEROS, BIAS, C, PARTIAL, ARRIVED,
    M, N, K, M_BUCKET,
    stride_xm, stride_qn, stride_sn, stride_zn, stride_cm,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, WEIGHTS_AS_A: tl.constexpr,
):
    """1-16 tokens: tensor-core products of one 16-row tile with the codes, scale per group.

    WEIGHTS_AS_A: the codes are the first operand, [BLOCK_N, HALF] × x transposed [HALF, BLOCK_M] (the
    output tile transposed), which Hopper's wgmma reads from registers: the codes are decoded where
    the product reads them.  The bytes are reordered so that each thread's fragment is one contiguous
    run (to_fragment_order), and decoded straight to q − z by PTX (_centred_codes).  Compiled for
    sm_90 by Triton 3.6 (benchmarks/sass_offline.py, 16 tokens), instructions per weight in the loop: codes as A, 64-row tiles on 4 warps 3.8 (80 registers), 128
    rows on 8 warps 3.5 (100); codes as B, 64 rows 5.1, 128 rows 3.7.  Before the reordering and the
    PTX decode: 7.0 and 6.0 at 64 rows."""
    HALF: tl.constexpr = GROUP // 2
    IN_FP32: tl.constexpr = DOT_IN_FP32 or X.dtype.element_ty == tl.float32  # exact values, so the same sums
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rh = tl.arange(0, HALF)
    m_ok, n_ok = rm < M, rn < N
    g_start, g_end = _group_range(K, GROUP, SPLIT_K)
    # the activations of a group as one contiguous tile [BLOCK_M, GROUP], split in registers into the
    # columns that meet the low and the high codes
    x_ptrs = X + rm[:, None].to(tl.int64) * stride_xm + tl.arange(0, GROUP)[None, :] + g_start * GROUP
    if WEIGHTS_AS_A:
        w_ptrs = QW + rn[:, None].to(tl.int64) * stride_qn + rh[None, :] + g_start * HALF  # bytes [BLOCK_N, HALF]
        w_mask = n_ok[:, None]
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        w_ptrs = QW + rn[None, :].to(tl.int64) * stride_qn + rh[:, None] + g_start * HALF  # bytes [HALF, BLOCK_N]
        w_mask = n_ok[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(g_start, g_end):
        x_even, x_odd = tl.split(tl.reshape(tl.load(x_ptrs, mask=m_ok[:, None], other=0.0), (BLOCK_M, HALF, 2)))
        if WEIGHTS_AS_A:  # in the order the codes reach the product (to_fragment_order), transposed
            x_even = tl.trans(to_fragment_order(x_even, BLOCK_M, HALF))
            x_odd = tl.trans(to_fragment_order(x_odd, BLOCK_M, HALF))
        packed = tl.load(w_ptrs, mask=w_mask, other=0)
        zero = tl.load(ZEROS + rn.to(tl.int64) * stride_zn + g, mask=n_ok, other=0)
        scale = tl.load(SCALES + rn.to(tl.int64) * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
        if WEIGHTS_AS_A:
            low, high = _centred_codes(to_fragment_order(packed, BLOCK_N, HALF), zero[:, None], x_even.dtype, IN_FP32)
            acc += (tensor_core_dot(low, x_even, None, IN_FP32) + tensor_core_dot(high, x_odd, None, IN_FP32)) * scale[:, None]
        else:
            low, high = _centred_codes(packed, zero[None, :], x_even.dtype, IN_FP32)
            acc += (tensor_core_dot(x_even, low, None, IN_FP32) + tensor_core_dot(x_odd, high, None, IN_FP32)) * scale[None, :]
        x_ptrs += GROUP
        w_ptrs += HALF
    if WEIGHTS_AS_A:
        acc = tl.trans(acc)
    store_output_tile(acc, tl.program_id(2), rm, rn, M, N, BIAS, C, PARTIAL, ARRIVED, stride_cm, HAS_BIAS, BLOCK_M, BLOCK_N)


@triton.jit
def tensor_core_dot(a, b, acc, IN_FP32: tl.constexpr):
    """a · b (+ acc) in float32: on float32 copies with IEEE products where asked (the interpreter, float32
    activations), the 16-bit operands as they are otherwise."""
    if IN_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def to_fragment_order(tile, ROWS: tl.constexpr, COLS: tl.constexpr):
    """The columns of a [ROWS, COLS] tile reordered so that those a thread holds as the tensor cores'
    register operand come from adjacent columns.  In each run of 16 columns a thread holds columns
    2c, 2c+1, 2c+8 and 2c+9 (c = lane % 4: the PTX fragment of mma.m16n8k16 and of wgmma's register
    operand); here they come from columns COLS/4 · c + 4 · run + (0..3), so a thread's columns of a
    row are one contiguous run of COLS/4 (one wide load of packed codes, or one byte of four 2-bit
    codes per run).  A sum over the input dimension is the same in any order, so the activations are
    put in this order too."""
    t = tl.reshape(tile, (ROWS, 4, COLS // 16, 2, 2))  # c, run, half of the run, pair
    return tl.reshape(tl.permute(t, (0, 2, 3, 1, 4)), (ROWS, COLS))


# Four bytes in $4 and their rows' zero points (as 16-bit values offset + z, two a register, in $5 and
# $6) → the four low codes minus their zero points in $0, $1 and the four high ones in $2, $3, two
# 16-bit values a register (byte j's in lane j % 2 of register j // 2).  prmt's selector 0x4140 makes
# bytes (b0, 0, b1, 0); (t & 0x000F000F) | offset puts a code under the exponent of the offset (the
# 16-bit value offset + q, exact), and a subtraction of two such values gives q − z, exact.
_CENTRED_PTX = """{
.reg .b32 t<4>, u<4>;
prmt.b32 t0, $4, 0, 0x4140;
prmt.b32 t1, $4, 0, 0x4342;
shr.u32 t2, t0, 4;
shr.u32 t3, t1, 4;
lop3.b32 u0, t0, 0x000F000F, OFFSET, 0xEA;
lop3.b32 u1, t1, 0x000F000F, OFFSET, 0xEA;
lop3.b32 u2, t2, 0x000F000F, OFFSET, 0xEA;
lop3.b32 u3, t3, 0x000F000F, OFFSET, 0xEA;
sub.TYPE $0, u0, $5;
sub.TYPE $1, u1, $6;
sub.TYPE $2, u2, $5;
sub.TYPE $3, u3, $6;
}"""
_BFLOAT16_CENTRED_PTX = tl.constexpr(_CENTRED_PTX.replace("OFFSET", "0x43004300").replace("TYPE", "rn.bf16x2"))  # 128 + q
_FLOAT16_CENTRED_PTX = tl.constexpr(_CENTRED_PTX.replace("OFFSET", "0x64006400").replace("TYPE", "rn.f16x2"))  # 1024 + q


@triton.jit
def _centred_codes(packed, zero, dtype: tl.constexpr, IN_FP32: tl.constexpr):
    """Bytes of two codes and their zero points (broadcast to them) → (low codes − z, high codes − z):
    small integers, exact in `dtype`, so the product's operand needs no correction afterwards.

    16-bit types by PTX: per four bytes two byte permutes, two shifts, four three-input logic ops and
    four paired subtractions make eight values, 1.5 instructions a code, where Triton's own widening of
    bytes to 16-bit lanes took about three (benchmarks/sass_offline.py).  float32 (and the interpreter,
    which runs no PTX) in plain arithmetic."""
    if IN_FP32:
        z = zero.to(tl.float32)
        return (packed & 0xF).to(tl.float32) - z, (packed >> 4).to(tl.float32) - z
    elif dtype == tl.bfloat16:
        z = (zero.to(tl.uint16) | 0x4300).to(tl.bfloat16, bitcast=True)
        return tl.inline_asm_elementwise(asm=_BFLOAT16_CENTRED_PTX, constraints="=r,=r,=r,=r,r,r,r", args=[packed, z],
                                         dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    else:
        z = (zero.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)
        return tl.inline_asm_elementwise(asm=_FLOAT16_CENTRED_PTX, constraints="=r,=r,=r,=r,r,r,r", args=[packed, z],
                                         dtype=(tl.float16, tl.float16), is_pure=True, pack=4)


@triton.jit
def _dequantize_int4_kernel(QW, SCALES, ZEROS, W, N, stride_qn, stride_sn, stride_zn, stride_wn,
                            GROUP: tl.constexpr, BLOCK_N: tl.constexpr):
    """One group of BLOCK_N rows: codes → (q − z) · s in W's dtype, columns back in order."""
    HALF: tl.constexpr = GROUP // 2
    g = tl.program_id(1)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rh = tl.arange(0, HALF)
    n_ok = rn[:, None] < N
    packed = tl.load(QW + rn[:, None].to(tl.int64) * stride_qn + g * HALF + rh[None, :], mask=n_ok, other=0)
    scale = tl.load(SCALES + rn.to(tl.int64) * stride_sn + g, mask=rn < N, other=0.0).to(tl.float32)[:, None]
    zero = tl.load(ZEROS + rn.to(tl.int64) * stride_zn + g, mask=rn < N, other=0).to(tl.float32)[:, None]
    low = ((packed & 0xF).to(tl.float32) - zero) * scale
    high = ((packed >> 4).to(tl.float32) - zero) * scale
    w = tl.interleave(low, high)  # even input column from the low nibble
    tl.store(W + rn[:, None].to(tl.int64) * stride_wn + g * GROUP + tl.arange(0, GROUP)[None, :], w.to(W.dtype.element_ty), mask=n_ok)


MMA_TOKENS = 16  # up to here: the tensor-core decode kernel; above, dequantise once and use the library GEMM

# The best of benchmarks/sweep_int4_decode.py on an H200 at 1, 4 and 16 tokens (results/int4_sweep_1tok_mma_h200.json,
# int4_sweep_4_16tok_h200.json), the fastest overall first: (BLOCK_N, SPLIT_K, warps, codes as A).
_int4_mma = triton.autotune(
    configs=autotune_configs(
        [
            {"BLOCK_M": 16, "BLOCK_N": bn, "SPLIT_K": sk, "WEIGHTS_AS_A": a, "num_warps": w, "num_stages": 3}
            for bn, sk, w, a in [(128, 8, 8, True), (128, 4, 4, True), (64, 8, 4, True), (128, 4, 4, False), (64, 8, 4, False),
                                 (64, 4, 4, True), (64, 4, 4, False), (64, 2, 4, False), (128, 8, 4, True)]
        ],
        {"BLOCK_M": 16, "BLOCK_N": 16, "SPLIT_K": 2, "WEIGHTS_AS_A": False},
    ),
    key=["M_BUCKET", "N", "K", "GROUP"],
)(_int4_mma_kernel)


def splits_and_smallest_block(*kernels, split="SPLIT_K") -> tuple[int, int]:
    """(most splits, smallest BLOCK_N) over the autotuned kernels' configurations: room for the
    partial sums and one arrival counter per smallest tile."""
    configs = [c.kwargs for kernel in kernels for c in kernel.configs]
    return max(c[split] for c in configs), min(c["BLOCK_N"] for c in configs)


_INT4_MAX_SPLIT, _INT4_SMALLEST_BLOCK_N = splits_and_smallest_block(_int4_mma)


def takes_group_size(group_size: int) -> bool:
    """Group sizes the int4 kernels run (one group is one step of their loops; tl.dot needs ≥ 16 per half)."""
    return group_size % 32 == 0 and group_size <= 256


def dequantize_int4(qweight, scales, zeros, group_size: int, dtype) -> torch.Tensor:
    n = qweight.shape[0]
    w = torch.empty((n, qweight.shape[1] * 2), dtype=dtype, device=qweight.device)
    block_n = 16
    _dequantize_int4_kernel[(triton.cdiv(n, block_n), w.shape[1] // group_size)](
        qweight, scales, zeros, w, n, qweight.stride(0), scales.stride(0), zeros.stride(0), w.stride(0), GROUP=group_size, BLOCK_N=block_n,
    )
    return w


def int4_linear(x, qweight, scales, zeros, group_size: int, bias, config: dict | None = None) -> torch.Tensor:
    """x [M, K] × 4-bit weight [N, K] (packed [N, K/2], scales/zeros [N, K/g]) → [M, N] in x's dtype.

    config: one configuration of the decode kernel (its tl.constexpr values, num_warps, num_stages) in
    place of autotuning, for tests and sweeps."""
    m, k = x.shape
    n = qweight.shape[0]
    if not takes_group_size(group_size):
        raise ValueError(f"the int4 kernels take group sizes that are multiples of 32 up to 256, not {group_size}")
    if k % group_size or qweight.shape[1] * 2 != k:
        raise ValueError(f"input width {k} does not match the packed weight ({qweight.shape[1] * 2} columns in groups of {group_size})")
    if m > MMA_TOKENS:
        return torch.nn.functional.linear(x, dequantize_int4(qweight, scales, zeros, group_size, x.dtype), bias)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    splits, smallest_block = (config["SPLIT_K"], config["BLOCK_N"]) if config else (_INT4_MAX_SPLIT, _INT4_SMALLEST_BLOCK_N)
    partial = torch.empty((splits * m * n,), dtype=torch.float32, device=x.device)
    arrived = arrival_counters(x.device, triton.cdiv(n, smallest_block))

    x = x if x.stride(1) == 1 else x.contiguous()  # the kernel reads rows as contiguous runs
    qweight = qweight if qweight.stride(1) == 1 else qweight.contiguous()
    kernel = _int4_mma if config is None else _int4_mma_kernel
    kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, meta["BLOCK_M"]), meta["SPLIT_K"])](
        x, qweight, scales, zeros, bias if bias is not None else scales, out, partial, arrived,
        m, n, k, m_bucket(m), x.stride(0), qweight.stride(0), scales.stride(0), zeros.stride(0), out.stride(0),
        GROUP=group_size, HAS_BIAS=bias is not None, DOT_IN_FP32=INTERPRETING, **(config or {}))
    return out
