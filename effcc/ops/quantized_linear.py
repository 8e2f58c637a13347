"""Quantised linears: the tensors a quantisation pass stores, and the reference math.

W8A8   weight int8 [out, in], symmetric, one scale per output channel (float32 [out]);
       activations quantised per token at run time (symmetric int8, absmax / 127);
       int8 × int8 products accumulated exactly (int32 semantics), one rescale at the end.
W4A16  weight as unsigned 4-bit codes in groups of `group_size` along the input dim, with a
       scale and a zero point per group: w = (q − zero) · scale.  Codes are packed two per byte,
       even input column in the low nibble: qweight uint8 [out, in / 2]; scales [out, in / g]
       (the model's dtype), zeros uint8 [out, in / g].  Activations stay in the model's dtype.
These layouts are what the fast kernels consume; these functions are their reference.

The ops run the reference on the CPU (and for float64 inputs, as in effcc's verification)
and effcc's Triton kernels (effcc.backends.triton.quantized_linear) on CUDA.  The
torch.compile backend splits w8a8_linear into per-token quantisation written in ATen ops,
which Inductor fuses into whatever produces the activation, and `int8_linear`, the int8
GEMM with its rescale, bias and cast fused.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import custom_op


# ---- W8A8 ---------------------------------------------------------------------------------------
def quantize_weight_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per-output-channel symmetric int8: (q int8 [out, in], scale float32 [out])."""
    w = weight.double()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale.float()


def quantize_per_token_int8(x: Tensor, compute_dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Per-token (last dim) symmetric int8: (q int8, scale float32 [..., 1]), computed in `compute_dtype`."""
    xd = x.to(compute_dtype)
    scale = (xd.abs().amax(dim=-1, keepdim=True) / 127).clamp(min=1e-12)
    return torch.round(xd / scale).clamp(-127, 127).to(torch.int8), scale.float()


def quantize_per_token_int8_f32(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token quantisation as the kernels do it (float32 arithmetic).

    Written in ATen ops so that a compiler can fuse it into the op producing x."""
    return quantize_per_token_int8(x, torch.float32)


def fake_quant_w8a8(x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """(x, W) as W8A8 sees them after quantisation, dequantised: for error searches."""
    xq, xs = quantize_per_token_int8(x)
    wq, ws = quantize_weight_int8(weight)
    return xq.double() * xs.double(), wq.double() * ws.double()[:, None]


def int8_linear_reference(xq: Tensor, x_scale: Tensor, qweight: Tensor, weight_scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """(xq int8 [..., in], x_scale float32 [..., 1]) × (qweight int8 [out, in], weight_scale [out]) + bias."""
    # int8 × int8 sums are integers below 2^53: float64 holds them exactly, as int32 would.
    y = (xq.double() @ qweight.double().t()) * x_scale.double() * weight_scale.double()
    if bias is not None:
        y = y + bias.double()
    return y.to(out_dtype)


def w8a8_linear_reference(x: Tensor, qweight: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
    xq, xs = quantize_per_token_int8(x)
    return int8_linear_reference(xq, xs, qweight, weight_scale, bias, x.dtype)


w8a8_linear = custom_op("effcc::w8a8_linear", w8a8_linear_reference, mutates_args=())


@w8a8_linear.register_fake
def _(x, qweight, weight_scale, bias):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def _on_kernels(x: Tensor) -> bool:
    """float64 (effcc's verification) stays on the reference; the kernels take 16/32-bit floats."""
    return x.dtype != torch.float64


@w8a8_linear.register_kernel("cuda")
def _(x, qweight, weight_scale, bias):
    if not _on_kernels(x):
        return w8a8_linear_reference(x, qweight, weight_scale, bias)
    from ..backends.triton import quantized_linear as kernels

    xq, xs = kernels.quantize_rows(_rows(x))
    return kernels.int8_linear(xq, xs, qweight, weight_scale, bias, x.dtype).view(*x.shape[:-1], -1)


int8_linear = custom_op("effcc::int8_linear", int8_linear_reference, mutates_args=())


@int8_linear.register_fake
def _(xq, x_scale, qweight, weight_scale, bias, out_dtype):
    return xq.new_empty((*xq.shape[:-1], qweight.shape[0]), dtype=out_dtype)


@int8_linear.register_kernel("cuda")
def _(xq, x_scale, qweight, weight_scale, bias, out_dtype):
    from ..backends.triton import quantized_linear as kernels

    y = kernels.int8_linear(_rows(xq), x_scale.reshape(-1).float().contiguous(), qweight, weight_scale, bias, out_dtype)
    return y.view(*xq.shape[:-1], -1)


# ---- W4A16 --------------------------------------------------------------------------------------
def quantize_weight_int4(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric 4-bit codes per group: (qweight uint8 [out, in/2], scales [out, in/g], zeros uint8 [out, in/g])."""
    out_features, in_features = weight.shape
    w = weight.double().reshape(out_features, in_features // group_size, group_size)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    zero = torch.round(-lo / scale).clamp(0, 15)
    q = torch.round(w / scale[..., None] + zero[..., None]).clamp(0, 15).to(torch.uint8).reshape(out_features, in_features)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return packed, scale.to(weight.dtype), zero.to(torch.uint8)


def dequantize_int4(qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    low, high = qweight & 0xF, qweight >> 4
    q = torch.stack((low, high), dim=-1).reshape(qweight.shape[0], -1).double()
    groups = q.reshape(q.shape[0], -1, group_size)
    return ((groups - zeros.double()[..., None]) * scales.double()[..., None]).reshape(q.shape)


def w4a16_linear_reference(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int, bias: Tensor | None) -> Tensor:
    w = dequantize_int4(qweight, scales, zeros, group_size).to(x.dtype)
    return torch.nn.functional.linear(x, w, bias)


w4a16_linear = custom_op("effcc::w4a16_linear", w4a16_linear_reference, mutates_args=())


@w4a16_linear.register_fake
def _(x, qweight, scales, zeros, group_size, bias):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@w4a16_linear.register_kernel("cuda")
def _(x, qweight, scales, zeros, group_size, bias):
    from ..backends.triton import quantized_linear as kernels

    if not _on_kernels(x) or not kernels.takes_group_size(group_size):
        return w4a16_linear_reference(x, qweight, scales, zeros, group_size, bias)
    return kernels.int4_linear(_rows(x), qweight, scales, zeros, group_size, bias).view(*x.shape[:-1], -1)
