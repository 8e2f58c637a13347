"""Numerical equivalence in float64: the measure every pass is held to.

The reference is the original model run eagerly in float64.  A rewritten program is
*promoted* to float64 (its tensors and every floating dtype written into its graph, such
as the casts and dtype asserts that torch.export records), so what is compared is the
algebra of the rewrite, not the rounding of the dtype it will run in.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_map

from .errors import EffccError

_LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Comparison:
    """How far `actual` is from `reference`, over all floating outputs.

    max_rel is max|a − r| / max|r| per output (a norm-wise relative error: entries near
    zero do not blow it up), the largest over the outputs."""

    max_abs: float
    max_rel: float
    outputs: int

    def within(self, rtol: float) -> bool:
        return self.max_rel <= rtol

    def __str__(self) -> str:
        return f"max abs {self.max_abs:.2e}, max rel {self.max_rel:.2e} over {self.outputs} output(s)"


def to_float64(value):
    """Floating tensors in a pytree of inputs → float64; everything else unchanged."""
    return tree_map(lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, value)


def _promote_dtype(arg):
    return torch.float64 if isinstance(arg, torch.dtype) and arg in _LOW_PRECISION else arg


def promote_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A float64 copy of a captured graph module (the original is left as it is)."""
    with warnings.catch_warnings():  # torch's own pytree deprecation, raised by deepcopy
        warnings.simplefilter("ignore", FutureWarning)
        gm = copy.deepcopy(gm)
    for module in gm.modules():
        if isinstance(module, fx.GraphModule):
            for node in module.graph.nodes:
                node.args = fx.node.map_aggregate(node.args, _promote_dtype)
                node.kwargs = fx.node.map_aggregate(node.kwargs, _promote_dtype)
            module.recompile()
        for name, value in list(vars(module).items()):  # lifted constants
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not isinstance(value, nn.Parameter):
                setattr(module, name, value.double())
    return gm.double()


def floating_leaves(output) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(output)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def compare(actual, reference) -> Comparison:
    """Compare two model outputs (any pytree: tensors, tuples, Hugging Face ModelOutputs)."""
    got, want = floating_leaves(actual), floating_leaves(reference)
    if len(got) != len(want) or not want:
        raise EffccError(
            f"outputs differ in structure: {len(got)} floating tensor(s) vs {len(want)} in the reference"
        )
    max_abs = max_rel = 0.0
    for a, r in zip(got, want):
        if a.shape != r.shape:
            raise EffccError(f"an output has shape {tuple(a.shape)} where the reference has {tuple(r.shape)}")
        a, r = a.detach().double(), r.detach().double()
        if not torch.isfinite(a).all():
            return Comparison(float("inf"), float("inf"), len(want))
        err = (a - r).abs().max().item() if a.numel() else 0.0
        scale = r.abs().max().item() if r.numel() else 0.0
        max_abs = max(max_abs, err)
        max_rel = max(max_rel, err / scale if scale > 0 else err)
    return Comparison(max_abs, max_rel, len(want))


@torch.no_grad()
def reference_outputs(model: nn.Module, args: tuple, kwargs: dict | None = None):
    """The original model's outputs in float64 (on a copy, in eval mode)."""
    reference = copy.deepcopy(model).double().eval()
    return reference(*to_float64(args), **to_float64(kwargs or {}))


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@torch.no_grad()
def run_float64(gm: fx.GraphModule, args: tuple, kwargs: dict | None = None):
    """Run a float64 copy of `gm`.  Tensors the graph creates without a dtype (ones, full)
    take the default dtype, which export recorded as float32: make it float64 too."""
    promoted = promote_graph_module(gm)
    with default_dtype(torch.float64):
        return promoted(*to_float64(args), **to_float64(kwargs or {}))


def verify(original: nn.Module, rewritten: nn.Module, inputs: tuple, kwargs: dict | None = None) -> Comparison:
    """Max abs / rel error of `rewritten` against `original`, both computed in float64.

    `rewritten` may be an effcc result model (a captured graph) or any nn.Module."""
    if isinstance(rewritten, fx.GraphModule):
        actual = run_float64(rewritten, inputs, kwargs)
    else:
        actual = reference_outputs(rewritten, inputs, kwargs)
    return compare(actual, reference_outputs(original, inputs, kwargs))


def count_flops(model: nn.Module, args: tuple, kwargs: dict | None = None) -> int:
    """Forward FLOPs of `model` on the inputs (torch's FlopCounterMode; effcc's masked layers count kept weights)."""
    from torch.utils.flop_counter import FlopCounterMode

    from .capture import eval_mode

    with torch.no_grad(), eval_mode(model), FlopCounterMode(display=False) as counter:
        model(*args, **(kwargs or {}))
    return counter.get_total_flops()
