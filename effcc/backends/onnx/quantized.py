"""ONNX translations of effcc's quantised linears (effcc.ops.quantized_linear), for ONNX Runtime.

torch.onnx traces these functions (onnxscript ops on the exporter's values) where the FX graph
calls the op; export_onnx passes them as its custom_translation_table.

W8A8 is spelled out in standard ONNX ops rather than DynamicQuantizeLinear: that op quantises
the whole tensor with one asymmetric uint8 scale and zero point, while the reference quantises
each token symmetrically (absmax / 127 over the last axis, codes in [-127, 127]), so its codes
would differ.  ONNX Round is half-to-even like torch.round.  The codes go to MatMulInteger as
int8 × int8: ONNX Runtime's CPU kernel accepts that and sums exactly in int32 (checked with
ORT 1.32, extremes included).  Shifting A to uint8 with a_zero_point 128 is exact too on a VNNI
CPU and there ~15× faster (ORT 1.32, 2048 × 2048 layer), but x86 u8s8 kernels without VNNI add
product pairs in saturating int16, which 255·127·2 exceeds; exactness comes first here.
The quantisation runs in float32 where the reference uses float64: a code differs (by one) only
where x / scale lies within float32 rounding of a half-integer, about one code in 10⁶.

W4A16 is ONNX Runtime's contrib op com.microsoft::MatMulNBits, whose layout is ours: codes
packed along K with the even column in the low nibble, a scale and zero point per block of
`group_size` columns, w = (q − zero) · scale.  The zero points are packed two per byte (low
nibble first) in the graph: MatMulNBits also accepts them unpacked in the scales' dtype, with the
same results, but then ORT's CPU kernel takes a slow path (on a 2048 × 2048 layer, measured:
~40× slower for one token, ~3× for 64).
The Reshape / pack nodes on initializers are folded by ONNX Runtime when the session loads.
MatMulNBits needs a power-of-two block_size ≥ 16 and float32/float16 input; otherwise the weight
is dequantised with standard ops (folded to a float weight) and multiplied with MatMul.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch
from onnx.defs import OpSchema
from onnxscript import FLOAT, FLOAT16, INT8
from onnxscript import opset18 as op
from onnxscript.values import Op, Opset

from ...ops import quantized_linear  # noqa: F401 - registers torch.ops.effcc.*


def _matmul_nbits() -> Op:
    """com.microsoft::MatMulNBits for onnxscript, which finds no schema for ORT's contrib ops in
    the onnx package: declare the part used here (nothing is registered globally)."""
    one, optional = OpSchema.FormalParameterOption.Single, OpSchema.FormalParameterOption.Optional
    floats = ["tensor(float)", "tensor(float16)"]
    schema = OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[OpSchema.FormalParameter("A", "T1", param_option=one), OpSchema.FormalParameter("B", "T2", param_option=one),
                OpSchema.FormalParameter("scales", "T1", param_option=one),
                OpSchema.FormalParameter("zero_points", "T3", param_option=optional)],
        outputs=[OpSchema.FormalParameter("Y", "T1")],
        type_constraints=[("T1", floats, ""), ("T2", ["tensor(uint8)"], ""), ("T3", ["tensor(uint8)", *floats], "")],
        attributes=[OpSchema.Attribute(name, OpSchema.AttrType.INT, "") for name in ("K", "N", "bits", "block_size")],
    )
    return Op(Opset("com.microsoft", 1), "MatMulNBits", schema)


MatMulNBits = _matmul_nbits()


def w8a8_linear(x, qweight, weight_scale, bias=None):
    xf = op.Cast(x, to=FLOAT.dtype)  # quantise in float32 whatever the model dtype
    absmax = op.ReduceMax(op.Abs(xf), op.Constant(value_ints=[-1]), keepdims=1)
    scale = op.Max(op.Div(absmax, _float(127)), _float(1e-12))  # [..., 1]; all-zero rows get codes 0
    codes = op.Cast(op.Clip(op.Round(op.Div(xf, scale)), _float(-127), _float(127)), to=INT8.dtype)
    # qweight is an initializer: the exporter folds this Transpose into an [in, out] constant.
    acc = op.MatMulInteger(codes, op.Transpose(qweight, perm=[1, 0]))  # exact int32 sums
    y = op.Mul(op.Mul(op.Cast(acc, to=FLOAT.dtype), scale), weight_scale)
    if bias is not None:
        y = op.Add(y, op.Cast(bias, to=FLOAT.dtype))
    return op.Cast(y, to=x.dtype)


def w4a16_linear(x, qweight, scales, zeros, group_size: int, bias=None):
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    if group_size >= 16 and group_size & (group_size - 1) == 0 and x.dtype in (FLOAT.dtype, FLOAT16.dtype):
        blocks = op.Reshape(qweight, op.Constant(value_ints=[n, k // group_size, group_size // 2]))
        y = MatMulNBits(x, blocks, scales, _pack_int4_columns(zeros), K=k, N=n, bits=4, block_size=group_size)
    else:
        w = _dequantize_int4(qweight, scales, op.Cast(zeros, to=scales.dtype), group_size, n, k)
        y = op.MatMul(x, op.Transpose(w, perm=[1, 0]))
    return y if bias is None else op.Add(y, bias)


def _float(value: float):
    return op.Constant(value_float=value)


def _uint8(value: int):
    return op.Constant(value=ir.tensor(np.uint8(value)))  # a plain Python int would become int64


def _pack_int4_columns(codes):
    """uint8 [rows, cols] of 4-bit values → [rows, ceil(cols / 2)], even column in the low nibble."""
    cols = codes.shape[1]
    if cols % 2:
        codes = op.Pad(codes, op.Constant(value_ints=[0, 0, 0, 1]))  # a zero high nibble
    end, axis, step = op.Constant(value_ints=[cols + 1]), op.Constant(value_ints=[1]), op.Constant(value_ints=[2])
    even = op.Slice(codes, op.Constant(value_ints=[0]), end, axis, step)
    odd = op.Slice(codes, op.Constant(value_ints=[1]), end, axis, step)
    return op.BitwiseOr(even, op.BitShift(odd, _uint8(4), direction="LEFT"))


def _dequantize_int4(qweight, scales, zero_points, group_size: int, n: int, k: int):
    """[out, in] weight in the scales' dtype, as effcc.ops.quantized_linear.dequantize_int4."""
    low = op.BitwiseAnd(qweight, _uint8(15))
    high = op.BitShift(qweight, _uint8(4), direction="RIGHT")
    minus_one = op.Constant(value_ints=[-1])
    codes = op.Concat(op.Unsqueeze(low, minus_one), op.Unsqueeze(high, minus_one), axis=-1)  # even column first
    groups = op.Cast(op.Reshape(codes, op.Constant(value_ints=[n, k // group_size, group_size])), to=scales.dtype)
    w = op.Mul(op.Sub(groups, op.Unsqueeze(zero_points, minus_one)), op.Unsqueeze(scales, minus_one))
    return op.Reshape(w, op.Constant(value_ints=[n, k]))


TRANSLATIONS = {
    torch.ops.effcc.w8a8_linear.default: w8a8_linear,
    torch.ops.effcc.w4a16_linear.default: w4a16_linear,
}
