"""ln_to_crmsnorm: Pre-LN → Pre-CRMSNorm (Jiang et al. 2023): a mean-free stream kept in d − 1 dims.

After ln_to_rmsnorm's re-centring the stream x is mean-free, so its last feature is minus the sum of
the others: x = C x̂ with x̂ = x[:d−1] and C = [I; −1ᵀ].  Every writer drops its last output feature
(W ← (W − 1·mean_rows W)[:d−1]), the stream carries x̂, and each norm computes

    r = 1 / sqrt((Σ x̂² + (Σ x̂)²) / d + ε),   norm(x) = C x̂ · r

For a norm read only by linears the expansion C and γ, β fold into them
(W ← (W·diag γ)[:, :d−1] − (W·diag γ)[:, d−1], b ← b + W β), so they read x̂·r directly; otherwise
the d features are rebuilt (cat) before γ, β.  Exact; the same preconditions as ln_to_rmsnorm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from ..analysis import linears_reading
from ..analysis.graph import is_transparent, value_of
from ..analysis.mean_free import Centre, CentreInput, Through
from ..program import Program
from . import register_pass
from .base import Guarantee, Pass, SiteLog
from .fold_norm_affine import fold_into_linear
from .ln_to_rmsnorm import centre_writers, convertible_streams, stream_name

aten = torch.ops.aten
_SHAPE_ARG_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default}


@register_pass
@dataclass
class LayerNormToCRMSNorm(Pass):
    name = "ln_to_crmsnorm"
    contradicts = {"ln_to_rmsnorm": "ln_to_crmsnorm converts the same LayerNorms and already includes the Pre-RMSNorm step"}  # noqa: RUF012
    summary = "Pre-LN → Pre-CRMSNorm: like ln_to_rmsnorm, and the residual stream shrinks from d to d − 1 features"
    guarantee = Guarantee.EXACT

    def apply(self, program: Program, log: SiteLog) -> None:
        changed = False
        for stream, norms, plan in convertible_streams(program, log):
            width = stream.hidden_size
            if any(isinstance(step, CentreInput) for step in plan):
                log.skip(
                    stream_name(stream),
                    "the stream starts at a model input, which would have to arrive with d − 1 features; ln_to_rmsnorm converts it",
                )
                continue
            centre_writers(
                program, plan, trainable=False, write=lambda p, action, width=width: _centre_and_drop_last(p, action, width)
            )
            for step in plan:
                if isinstance(step, Through):
                    _narrow_shape_args(step.node, step.axis, width)
            for add in stream.adds:  # views on the stream itself (OPT flattens it between adds)
                _narrow_path(add, None, width)
            folded = sum(_compress_norm(program, norm, width) for norm in norms)
            changed = True
            log.change(
                stream_name(stream),
                f"stream {width} → {width - 1} features; {len(norms)} LayerNorm(s) → CRMSNorm, {folded} with the expansion folded into their linears",
            )
        if changed:
            program.retrace()  # widths changed: refresh every node's recorded shape


def _centre_and_drop_last(program: Program, action: Centre, width: int) -> None:
    name = program.private_tensor(action.reader, action.attr)
    tensor = program.tensor(name)
    wide = tensor.double()
    centred = wide - wide.mean(action.axis, keepdim=True)
    program.set_tensor(name, centred.narrow(action.axis, 0, width - 1).to(tensor.dtype).contiguous())


def _narrow_shape_args(node: fx.Node, axis: int, width: int) -> None:
    """A view/reshape/expand written with the old width along the feature axis gets the new one."""
    if node.target in _SHAPE_ARG_OPS and len(node.args) > 1 and isinstance(node.args[1], (list, tuple)):
        shape = list(node.args[1])
        if len(shape) >= -axis and shape[axis] == width:
            shape[axis] = width - 1
            node.args = (node.args[0], shape, *node.args[2:])


def _compress_norm(program: Program, norm: fx.Node, width: int) -> bool:
    """Replace one LayerNorm by CRMSNorm; True if its expansion folded into linear readers."""
    x, _, weight, bias, eps = (list(norm.args) + [None, None, 1e-5])[:5]
    gamma, beta = (program.tensor(n.target).double() if n is not None else None for n in (weight, bias))
    linears, others = linears_reading(norm)
    fold = bool(linears) and not others
    graph = program.graph
    dtype = value_of(norm).dtype
    with graph.inserting_before(norm):
        wide = graph.call_function(aten.to.dtype, (x, torch.float32)) if dtype in (torch.float16, torch.bfloat16) else x
        total = graph.call_function(aten.sum.dim_IntList, (wide, [-1], True))
        squares = graph.call_function(aten.sum.dim_IntList, (graph.call_function(aten.mul.Tensor, (wide, wide)), [-1], True))
        mean_square = graph.call_function(
            aten.div.Tensor,
            (graph.call_function(aten.add.Tensor, (squares, graph.call_function(aten.mul.Tensor, (total, total)))), float(width)),
        )
        scale = graph.call_function(aten.rsqrt.default, (graph.call_function(aten.add.Tensor, (mean_square, float(eps))),))
        compressed = graph.call_function(aten.mul.Tensor, (wide, scale))
        if fold:
            out = graph.call_function(aten.to.dtype, (compressed, dtype)) if wide is not x else compressed
        else:
            last = graph.call_function(aten.neg.default, (graph.call_function(aten.mul.Tensor, (total, scale)),))
            out = graph.call_function(aten.cat.default, ([compressed, last], -1))
            if weight is not None:
                out = graph.call_function(aten.mul.Tensor, (out, weight))
            if bias is not None:
                out = graph.call_function(aten.add.Tensor, (out, bias))
            if wide is not x:
                out = graph.call_function(aten.to.dtype, (out, dtype))
    if fold:
        for lin in linears:
            _fold_expansion(program, lin, gamma, beta, width)
            _narrow_path(norm, lin.node, width)
    norm.replace_all_uses_with(out)
    graph.erase_node(norm)
    return fold


def _fold_expansion(program: Program, lin, gamma, beta, width: int) -> None:
    """W·(γ ⊙ C x̂ + β) + b = ((W diag γ) C) x̂ + (b + W β)."""
    fold_into_linear(program, lin, gamma, beta, then=lambda w: w[:, : width - 1] - w[:, width - 1 :])


def _narrow_path(norm: fx.Node, reader: fx.Node, width: int) -> None:
    """Views between the norm and a linear that reads it were written for d features."""
    stack = [norm]
    while stack:
        node = stack.pop()
        for user in list(node.users):
            if user is reader:
                continue
            if is_transparent(user):
                _narrow_shape_args(user, -1, width)
                stack.append(user)
