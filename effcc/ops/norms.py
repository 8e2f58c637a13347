"""effcc::rms_norm and effcc::add_rms_norm: RMSNorm with optional γ, β and fused residual add.

    rms_norm(x, γ, β, ε)          = x / sqrt(mean(x²) + ε) · γ + β
    add_rms_norm(x, r, γ, β, ε)   = (rms_norm(x + r, γ, β, ε), x + r)

Ops are `torch.library.triton_op`s so that Inductor sees and schedules the kernels
(a plain custom_op would be opaque to it).  On CUDA they run the Triton kernels of
effcc.backends.triton.rms_norm; on the CPU the reference below (the same math in PyTorch,
float32 accumulation) unless TRITON_INTERPRET=1, which runs the kernels themselves.
Backward is a kernel too, registered with torch.library.register_autograd.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor
from torch.library import triton_op

from ..backends.triton import rms_norm as kernels


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _wide(t: Tensor) -> Tensor:
    """At least float32, as the kernels accumulate (float64 stays float64)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def rms_norm_reference(x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None, eps: float):
    """(y, stream, rstd) computed with PyTorch ops: the definition the kernels are tested against."""
    stream = x + residual if residual is not None else x
    wide = _wide(stream)
    rstd = torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
    y = wide * rstd
    if weight is not None:
        y = y * _wide(weight)
    if bias is not None:
        y = y + _wide(bias)
    return y.to(x.dtype), stream, rstd.squeeze(-1)


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1]).contiguous()


# ---- the ops: Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1) ---------------------------
def _kernel_fwd(x, residual, weight, bias, eps):
    y, stream, rstd = kernels.forward(_rows(x), _rows(residual) if residual is not None else None, weight, bias, eps)
    return y.view(x.shape), stream.view(x.shape) if residual is not None else None, rstd.view(x.shape[:-1])


def _kernel_bwd(dy, x, weight, rstd, ds, has_bias):
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
    dx, dw, db = kernels.backward(_rows(dy), _rows(x), weight, rstd.reshape(-1), _rows(ds) if ds is not None else None, has_bias, sms)
    return dx.view(x.shape), dw, db


@triton_op("effcc::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    y, _, rstd = _kernel_fwd(x, None, weight, bias, eps)
    return y, rstd


@triton_op("effcc::add_rms_norm_fwd", mutates_args=())
def add_rms_norm_fwd(x: Tensor, residual: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return _kernel_fwd(x, residual, weight, bias, eps)


@triton_op("effcc::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(dy: Tensor, x: Tensor, weight: Tensor | None, rstd: Tensor, ds: Tensor | None, has_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _kernel_bwd(dy, x, weight, rstd, ds, has_bias)


# ---- CPU: the reference, unless the Triton interpreter is asked for ---------------------------
@rms_norm_fwd.register_kernel("cpu")
def _(x, weight, bias, eps):
    y, _, rstd = (_kernel_fwd if _interpreting() else rms_norm_reference)(x, None, weight, bias, eps)
    return y, rstd


@add_rms_norm_fwd.register_kernel("cpu")
def _(x, residual, weight, bias, eps):
    if _interpreting():
        return _kernel_fwd(x, residual, weight, bias, eps)
    y, stream, rstd = rms_norm_reference(x, residual, weight, bias, eps)
    return y, stream, rstd


@rms_norm_bwd.register_kernel("cpu")
def _(dy, x, weight, rstd, ds, has_bias):
    return (_kernel_bwd if _interpreting() else _reference_backward)(dy, x, weight, rstd, ds, has_bias)


def _reference_backward(dy, x, weight, rstd, ds, has_bias):
    xf, dyf = _wide(x), _wide(dy)
    xhat = xf * rstd.unsqueeze(-1)
    g = dyf * _wide(weight) if weight is not None else dyf
    dx = (g - xhat * (g * xhat).mean(-1, keepdim=True)) * rstd.unsqueeze(-1)
    if ds is not None:
        dx = dx + _wide(ds)
    rows = dyf.reshape(-1, dyf.shape[-1])
    dw = (rows * xhat.reshape(rows.shape)).sum(0) if weight is not None else x.new_empty(0, dtype=torch.float32)
    db = rows.sum(0) if has_bias else x.new_empty(0, dtype=torch.float32)
    return dx.to(x.dtype), dw, db


# ---- autograd -----------------------------------------------------------------------------------
def _grads_of_affine(weight, bias, dw, db):
    return (dw.to(weight.dtype) if weight is not None and weight.requires_grad else None,
            db.to(bias.dtype) if bias is not None and bias.requires_grad else None)


def _setup_norm(ctx, inputs, output):
    x, weight, bias, _ = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.has_bias = bias is not None
    ctx.bias = bias


def _backward_norm(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw, db = torch.ops.effcc.rms_norm_bwd(dy.contiguous(), x, weight, rstd, None, ctx.has_bias)
    return (dx, *_grads_of_affine(weight, ctx.bias, dw, db), None)


def _setup_add_norm(ctx, inputs, output):
    _, _, weight, bias, _ = inputs
    ctx.save_for_backward(output[1], weight, output[2])
    ctx.has_bias = bias is not None
    ctx.bias = bias


def _backward_add_norm(ctx, dy, dstream, _drstd):
    stream, weight, rstd = ctx.saved_tensors
    ds = dstream.contiguous() if dstream is not None else None
    dsum, dw, db = torch.ops.effcc.rms_norm_bwd(dy.contiguous(), stream, weight, rstd, ds, ctx.has_bias)
    return (dsum, dsum, *_grads_of_affine(weight, ctx.bias, dw, db), None)


rms_norm_fwd.register_autograd(_backward_norm, setup_context=_setup_norm)
add_rms_norm_fwd.register_autograd(_backward_add_norm, setup_context=_setup_add_norm)


# ---- the public functions -----------------------------------------------------------------------
def rms_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    return torch.ops.effcc.rms_norm_fwd(x, weight, bias, eps)[0]


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """(rms_norm(x + residual), x + residual)."""
    y, stream, _ = torch.ops.effcc.add_rms_norm_fwd(x, residual, weight, bias, eps)
    return y, stream
