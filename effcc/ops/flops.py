"""FLOPs of effcc's linear-like ops, for torch's FlopCounterMode (the report's FLOPs column).

Each counts the multiply-accumulates of the dense layer it stands for, 2 × tokens × in × out,
whatever the arithmetic: int8 × int8 (W8A8), dequantised int4 (W4A16), or Fairy2i's
additions of ±1/±i codes.  A widely-linear layer does exactly that many (four real products
of half the size each), so real_to_complex keeps the count and the column shows it."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import complex_linear, quantized_linear  # noqa: F401 - defines the ops counted here

LINEAR_LIKE = (
    torch.ops.effcc.w8a8_linear,
    torch.ops.effcc.int8_linear,
    torch.ops.effcc.w4a16_linear,
    torch.ops.effcc.widely_linear,
    torch.ops.effcc.fairy2i_linear,
)


@register_flop_formula(LINEAR_LIKE, get_raw=True)
def dense_linear_flops(x: Tensor, *args, out_val: Tensor, **kwargs) -> int:
    """2 × tokens × in features × out features (the first argument is the layer's input)."""
    out_features = out_val.shape[-1]
    return 2 * (out_val.numel() // out_features) * x.shape[-1] * out_features
