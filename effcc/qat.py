"""Quantisation-aware fine-tuning for Fairy2i: how the paper recovers quality from a real checkpoint.

    model = effcc.qat.fairy2i_prepare(model, stages=2)   # a copy; your model is not changed
    ...train as usual...                                  # forward uses the quantised weights
    plain = effcc.qat.fairy2i_finish(model)              # nn.Linear again, holding the trained weights
    res = effcc.optimize(plain, (ids,), passes=["real_to_complex", ("fairy2i", {"stages": 2})])

The trainable parameter stays the real weight W (a torch parametrization, so nn.Linear and
GPT-2's Conv1D alike).  The forward quantises it exactly as the
`fairy2i` pass will (W → A, B → {±1, ±i} codes and scales, stage by stage → back to a real
matrix) and passes gradients straight through the rounding (W_q = W + (Q(W) − W).detach()).
So the deployed model computes what the fine-tuned one did.  Layers are chosen as in
`real_to_complex` (inside numbered blocks, or `include` / `exclude` regular expressions).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import EffccError
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


class Fairy2iWeight(nn.Module):
    """A parametrization: the weight as the fairy2i pass will store it, with straight-through gradients."""

    def __init__(self, stages: int, per_row: bool, transposed: bool):
        super().__init__()
        self.stages, self.per_row, self.transposed = stages, per_row, transposed

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        oriented = weight.t() if self.transposed else weight  # [out, in]
        quantised = fairy2i_quantize_weight(oriented, self.stages, self.per_row)
        quantised = quantised.t() if self.transposed else quantised
        return weight + (quantised - weight).detach()


def _linear_weight(module: nn.Module) -> tuple[int, int, bool] | None:
    """(out, in, stored transposed?) for nn.Linear and Hugging Face's Conv1D (GPT-2), else None."""
    if type(module) is nn.Linear:
        return module.out_features, module.in_features, False
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None and module.weight.dim() == 2:
        return module.weight.shape[1], module.weight.shape[0], True
    return None


def fairy2i_prepare(model: nn.Module, stages: int = 2, per_row: bool = False, include: str | None = None, exclude: str | None = None) -> nn.Module:
    """A copy of `model` whose selected linears train through Fairy2i quantisation."""
    model = copy.deepcopy(model)
    prepared = 0
    for name, module in model.named_modules():
        shape = _linear_weight(module)
        if shape is None or not selected(f"{name}.weight", include, exclude) or shape[0] % 2 or shape[1] % 2:
            continue
        parametrize.register_parametrization(module, "weight", Fairy2iWeight(stages, per_row, transposed=shape[2]))
        prepared += 1
    if not prepared:
        raise EffccError("fairy2i_prepare found no linear with even sizes inside numbered blocks (or matching `include`)")
    return model


def fairy2i_finish(model: nn.Module) -> nn.Module:
    """A copy whose layers hold the fine-tuned real weights as plain parameters, ready for the passes."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            # Not parametrize.remove_parametrizations: it edits the parametrized class, which the
            # copy shares with the model being trained.
            original = module.parametrizations.weight.original
            module.__class__ = type(module).__bases__[0]
            del module._modules["parametrizations"]
            module.weight = nn.Parameter(original.detach(), requires_grad=original.requires_grad)
    return model


def prepared_layers(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if parametrize.is_parametrized(m, "weight") and isinstance(m.parametrizations.weight[0], Fairy2iWeight))
