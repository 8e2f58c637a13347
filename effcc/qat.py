"""Quantisation-aware fine-tuning for Fairy2i: how the paper recovers quality from a real checkpoint.

    model = effcc.qat.fairy2i_prepare(model, stages=2)   # a copy; your model is not changed
    ...train as usual...                                  # forward uses the quantised weights
    plain = effcc.qat.fairy2i_finish(model)              # nn.Linear again, holding the trained weights
    res = effcc.optimize(plain, (ids,), passes=["real_to_complex", ("fairy2i", {"stages": 2})])

The trainable parameter stays the real weight W.  The forward quantises it exactly as the
`fairy2i` pass will (W → A, B → {±1, ±i} codes and scales, stage by stage → back to a real
matrix) and passes gradients straight through the rounding (W_q = W + (Q(W) − W).detach()).
So the deployed model computes what the fine-tuned one did.  Layers are chosen as in
`real_to_complex` (inside numbered blocks, or `include` / `exclude` regular expressions).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .ops import complex_linear as cl
from .passes.real_to_complex import selected


def fairy2i_quantize_weight(weight: torch.Tensor, stages: int, per_row: bool = False) -> torch.Tensor:
    """The real weight that the fairy2i pass stores for `weight` (float64 arithmetic, weight's dtype)."""
    a, b = cl.to_widely_linear(weight.detach())
    quantised = []
    for part in (a, b):  # rebuilt from the codes and the float32 scales, as the pass stores them
        codes, scales, _ = cl.quantize_fairy2i(part, stages, per_row)
        quantised.append(sum(cl.dequantize_stage(codes[s], scales[s, :, 0], scales[s, :, 1]) for s in range(stages)))
    return cl.from_widely_linear(*quantised).to(weight.dtype)


class Fairy2iLinear(nn.Linear):
    """nn.Linear whose forward uses the Fairy2i-quantised weight, with straight-through gradients."""

    stages: int
    per_row: bool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quantised = fairy2i_quantize_weight(self.weight, self.stages, self.per_row)
        weight = self.weight + (quantised - self.weight).detach()
        return nn.functional.linear(x, weight, self.bias)


def fairy2i_prepare(model: nn.Module, stages: int = 2, per_row: bool = False, include: str | None = None, exclude: str | None = None) -> nn.Module:
    """A copy of `model` whose selected linears train through Fairy2i quantisation."""
    model = copy.deepcopy(model)
    for name, module in model.named_modules():
        if type(module) is nn.Linear and selected(f"{name}.weight", include, exclude) and not module.in_features % 2 and not module.out_features % 2:
            module.__class__ = Fairy2iLinear
            module.stages, module.per_row = stages, per_row
    return model


def fairy2i_finish(model: nn.Module) -> nn.Module:
    """A copy with plain nn.Linear layers holding the fine-tuned real weights, ready for the passes."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, Fairy2iLinear):
            module.__class__ = nn.Linear
            del module.stages, module.per_row
    return model
