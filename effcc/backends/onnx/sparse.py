"""ONNX translations of effcc's masked layers (effcc.ops.sparse), in standard ops.

sparse_linear  MatMul(x, Transpose(Where(M, W, 0))) + b
sparse_conv2d  Conv(x, Where(M, W, 0), b) with the layer's strides, pads and dilations
The mask stays a bool initializer; ONNX Runtime folds Where into a dense weight when the session
loads, so the file keeps weights and masks (as the PyTorch state does) and the session runs dense.
"""

from __future__ import annotations

import torch
from onnxscript import opset18 as op

from ...ops import sparse  # noqa: F401 - registers torch.ops.effcc.sparse_linear / sparse_conv2d


def _masked(weight, mask):
    return op.Where(mask, weight, op.CastLike(op.Constant(value_float=0.0), weight))


def sparse_linear(x, weight, mask, bias=None):
    y = op.MatMul(x, op.Transpose(_masked(weight, mask), perm=[1, 0]))
    return y if bias is None else op.Add(y, bias)


def sparse_conv2d(x, weight, mask, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups: int = 1):
    pads = [*padding, *padding]
    w = _masked(weight, mask)
    if bias is None:
        return op.Conv(x, w, strides=list(stride), pads=pads, dilations=list(dilation), group=groups)
    return op.Conv(x, w, bias, strides=list(stride), pads=pads, dilations=list(dilation), group=groups)


TRANSLATIONS = {
    torch.ops.effcc.sparse_linear.default: sparse_linear,
    torch.ops.effcc.sparse_conv2d.default: sparse_conv2d,
}
