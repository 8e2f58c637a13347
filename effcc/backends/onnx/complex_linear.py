"""ONNX translations of the widely-linear layers (effcc.ops.complex_linear), in standard ops.

widely_linear  y = [x_r (A_re + B_re)ᵀ + x_i (B_im − A_im)ᵀ ;  x_r (A_im + B_im)ᵀ + x_i (A_re − B_re)ᵀ]:
               two Slices, four MatMuls, a Concat (the weight sums fold to constants in ORT).
fairy2i_linear the 2-bit codes are unpacked (BitShift, BitwiseAnd), looked up in the real and
               imaginary parts of {+1, −1, +i, −i} (Gather), scaled per row and summed over the
               stages, then as widely_linear.  ONNX has no op for the add/subtract-only product,
               so ONNX Runtime folds this into dense float weights when the session loads: the
               file is small (2 bits per complex weight per stage), the session is not.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch
from onnxscript import opset18 as op

from ...ops import complex_linear  # noqa: F401 - registers torch.ops.effcc.widely_linear / fairy2i_linear


def _ints(*values):
    return op.Constant(value_ints=list(values))


def _combine(x, a_re, a_im, b_re, b_im, bias, n: int):
    xr = op.Slice(x, _ints(0), _ints(n), _ints(-1))
    xi = op.Slice(x, _ints(n), _ints(2 * n), _ints(-1))

    def mm(v, w):
        return op.MatMul(v, op.Transpose(w, perm=[1, 0]))

    yr = op.Add(mm(xr, op.Add(a_re, b_re)), mm(xi, op.Sub(b_im, a_im)))
    yi = op.Add(mm(xr, op.Add(a_im, b_im)), mm(xi, op.Sub(a_re, b_re)))
    y = op.Concat(yr, yi, axis=-1)
    return y if bias is None else op.Add(y, bias)


def widely_linear(x, a_re, a_im, b_re, b_im, bias=None):
    return _combine(x, a_re, a_im, b_re, b_im, bias, a_re.shape[1])


def fairy2i_linear(x, codes, scales, bias=None):
    stages, _, m, quarter = codes.shape
    shifts = op.Constant(value=ir.tensor(np.array([0, 2, 4, 6], dtype=np.uint8)))
    unpacked = op.BitwiseAnd(op.BitShift(op.Unsqueeze(codes, _ints(-1)), shifts, direction="RIGHT"),
                             op.Constant(value=ir.tensor(np.uint8(3))))
    index = op.Cast(op.Reshape(unpacked, _ints(stages, 2, m, 4 * quarter)), to=ir.DataType.INT64)
    real_part = op.Gather(op.Constant(value=ir.tensor(np.array([1, -1, 0, 0], dtype=np.float32))), index)
    imag_part = op.Gather(op.Constant(value=ir.tensor(np.array([0, 0, 1, -1], dtype=np.float32))), index)
    s_re = op.Slice(scales, _ints(0), _ints(1), _ints(-1))  # [stages, 2, m, 1]: broadcast over the inputs
    s_im = op.Slice(scales, _ints(1), _ints(2), _ints(-1))
    re = op.ReduceSum(op.Mul(real_part, s_re), _ints(0), keepdims=0)  # [2, m, n]: summed over the stages
    im = op.ReduceSum(op.Mul(imag_part, s_im), _ints(0), keepdims=0)

    def pick(t, which):
        return op.Cast(op.Squeeze(op.Slice(t, _ints(which), _ints(which + 1), _ints(0)), _ints(0)), to=x.dtype)

    return _combine(x, pick(re, 0), pick(im, 0), pick(re, 1), pick(im, 1), bias, 4 * quarter)


TRANSLATIONS = {
    torch.ops.effcc.widely_linear.default: widely_linear,
    torch.ops.effcc.fairy2i_linear.default: fairy2i_linear,
}
