"""Widely-linear complex layers and Fairy2i {±1, ±i} codes: the stored tensors and the reference math.

Pairing.  A real linear R^{2n} → R^{2m} is read as a map of complex vectors by pairing feature j
with feature j + n (the first half of the features is the real part, the second the imaginary
part), on the input and on the output:
    z = x[:n] + i·x[n:],   y = [Re w; Im w]  with  w = A z + B z̄,
    W = [[W11, W12], [W21, W22]]  →  A = ½[(W11 + W22) + i(W21 − W12)],  B = ½[(W11 − W22) + i(W21 + W12)].
Every real linear has exactly one such (A, B), so the rewrite is exact.  A and B are stored as
real and imaginary parts, each [m, n] in the model's dtype.

Fairy2i.  Each complex weight is sent to the one of {+1, −1, +i, −i} nearest by phase and
scaled: s_re for the real directions, s_im for the imaginary ones, s_re = mean |Re w| over the
weights sent to ±1 and s_im = mean |Im w| over those sent to ±i (one pair per tensor as in the
paper, or one per row).  Stage k quantises what stages 1..k−1 left: W ≈ Q1 + Q2 + …
Stored:  codes uint8 [stages, 2 (A, B), m, n/4], four 2-bit codes per byte, column 4b + j in bits
2j..2j+1; code 0 = +1, 1 = −1, 2 = +i, 3 = −i.  scales float32 [stages, 2 (A, B), m, 2 (re, im)]
(per-tensor scales are the same in every row).  A product with a code only swaps and negates the
real and imaginary parts of the input: the kernel needs no multiplication inside the dot product.
On CUDA, 1-16 tokens run that kernel (effcc.backends.triton.fairy2i); otherwise the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import custom_op

DIRECTIONS = torch.tensor([1, -1, 1j, -1j], dtype=torch.complex128)  # code → value


# ---- real ↔ widely linear -------------------------------------------------------------------------
def to_widely_linear(weight: Tensor) -> tuple[Tensor, Tensor]:
    """[2m, 2n] real → (A, B) complex [m, n] (float64 arithmetic, exact up to the final rounding)."""
    w = weight.double()
    m, n = w.shape[0] // 2, w.shape[1] // 2
    w11, w12, w21, w22 = w[:m, :n], w[:m, n:], w[m:, :n], w[m:, n:]
    return torch.complex(w11 + w22, w21 - w12) / 2, torch.complex(w11 - w22, w21 + w12) / 2


def from_widely_linear(a: Tensor, b: Tensor) -> Tensor:
    """(A, B) → the real [2m, 2n] weight of the same map."""
    top = torch.cat((a.real + b.real, b.imag - a.imag), dim=1)
    bottom = torch.cat((a.imag + b.imag, a.real - b.real), dim=1)
    return torch.cat((top, bottom), dim=0)


def widely_linear_reference(x: Tensor, a_re: Tensor, a_im: Tensor, b_re: Tensor, b_im: Tensor, bias: Tensor | None) -> Tensor:
    """y = [Re w; Im w], w = A z + B z̄, z = x[..., :n] + i·x[..., n:]."""
    n = a_re.shape[1]
    xr, xi = x[..., :n], x[..., n:]
    # Re w = (A_re + B_re) x_r + (B_im − A_im) x_i;  Im w = (A_im + B_im) x_r + (A_re − B_re) x_i
    yr = xr @ (a_re + b_re).t() + xi @ (b_im - a_im).t()
    yi = xr @ (a_im + b_im).t() + xi @ (a_re - b_re).t()
    y = torch.cat((yr, yi), dim=-1)
    return y + bias if bias is not None else y


widely_linear = custom_op("effcc::widely_linear", widely_linear_reference, mutates_args=())


@widely_linear.register_fake
def _(x, a_re, a_im, b_re, b_im, bias):
    return x.new_empty((*x.shape[:-1], 2 * a_re.shape[0]))


# ---- Fairy2i codes ------------------------------------------------------------------------------
def nearest_direction(w: Tensor) -> Tensor:
    """Code of the direction in {+1, −1, +i, −i} nearest by phase (±45° sectors; ties to the real axis)."""
    real_axis = w.real.abs() >= w.imag.abs()
    return torch.where(real_axis, (w.real < 0).to(torch.uint8), 2 + (w.imag < 0).to(torch.uint8))


def _stage_scales(w: Tensor, codes: Tensor, per_row: bool) -> tuple[Tensor, Tensor]:
    """(s_re, s_im) [m]: mean |Re w| over the weights sent to ±1, mean |Im w| over those sent to ±i."""
    dims = (1,) if per_row else (0, 1)
    real_axis = codes < 2

    def mean_where(values, mask):
        total = (values * mask).sum(dim=dims, keepdim=True)
        count = mask.sum(dim=dims, keepdim=True).clamp(min=1)
        return (total / count).expand(w.shape[0], 1).squeeze(1)

    return mean_where(w.real.abs(), real_axis), mean_where(w.imag.abs(), ~real_axis)


def dequantize_stage(codes: Tensor, s_re: Tensor, s_im: Tensor) -> Tensor:
    """codes [m, n] with per-row scales [m] → complex128 [m, n]."""
    direction = DIRECTIONS.to(codes.device)[codes.long()]
    scale = torch.where(codes < 2, s_re.double()[:, None], s_im.double()[:, None])
    return direction * scale


def quantize_fairy2i(w: Tensor, stages: int, per_row: bool = False) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Recursive residual quantisation of complex w [m, n]: (codes uint8 [stages, m, n], scales [stages, m, 2],
    the approximation after each stage)."""
    residual = w.to(torch.complex128)
    approx = torch.zeros_like(residual)
    codes, scales, approximations = [], [], []
    for _ in range(stages):
        c = nearest_direction(residual)
        s_re, s_im = _stage_scales(residual, c, per_row)
        q = dequantize_stage(c, s_re, s_im)
        approx, residual = approx + q, residual - q
        codes.append(c)
        scales.append(torch.stack((s_re, s_im), dim=-1))
        approximations.append(approx.clone())
    return torch.stack(codes), torch.stack(scales).float(), approximations


def pack_codes(codes: Tensor) -> Tensor:
    """uint8 [..., n] of 2-bit codes → [..., n/4], column 4b + j in bits 2j..2j+1."""
    c = codes.reshape(*codes.shape[:-1], -1, 4).to(torch.uint8)
    return c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)


def unpack_codes(packed: Tensor) -> Tensor:
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    return ((packed[..., None] >> shifts) & 3).reshape(*packed.shape[:-1], -1)


def dequantize_parts(codes: Tensor, scales: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Packed codes [stages, 2, m, n/4] and scales [stages, 2, m, 2] → (A_re, A_im, B_re, B_im) [m, n] in
    `dtype`, summed over the stages (real arithmetic: runs on any device)."""
    index = unpack_codes(codes).long()
    real_part = torch.tensor([1, -1, 0, 0], dtype=dtype, device=codes.device)[index]
    imag_part = torch.tensor([0, 0, 1, -1], dtype=dtype, device=codes.device)[index]
    re = (real_part * scales[..., 0:1].to(dtype)).sum(0)  # [2, m, n]
    im = (imag_part * scales[..., 1:2].to(dtype)).sum(0)
    return re[0], im[0], re[1], im[1]


def dequantize_fairy2i(codes: Tensor, scales: Tensor) -> tuple[Tensor, Tensor]:
    """(A, B) complex128 [m, n]."""
    a_re, a_im, b_re, b_im = dequantize_parts(codes, scales, torch.float64)
    return torch.complex(a_re, a_im), torch.complex(b_re, b_im)


def fairy2i_linear_reference(x: Tensor, codes: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    parts = dequantize_parts(codes, scales, wide)
    y = widely_linear_reference(x.to(wide), *parts, None if bias is None else bias.to(wide))
    return y.to(x.dtype)


fairy2i_linear = custom_op("effcc::fairy2i_linear", fairy2i_linear_reference, mutates_args=())


@fairy2i_linear.register_fake
def _(x, codes, scales, bias):
    return x.new_empty((*x.shape[:-1], 2 * codes.shape[2]))


@fairy2i_linear.register_kernel("cuda")
def _(x, codes, scales, bias):
    from ..backends.triton import fairy2i as kernels

    rows = x.reshape(-1, x.shape[-1])
    if x.dtype == torch.float64 or rows.shape[0] > 16:  # verification, or prefill: dequantise (reference)
        return fairy2i_linear_reference(x, codes, scales, bias)
    return kernels.fairy2i_linear(rows.contiguous(), codes, scales, bias).view(*x.shape[:-1], -1)
