"""fold_norm_affine: move a norm's γ, β into the linears that read it.

For a norm n(x) = γ ⊙ x̂ + β whose output is read only by linears y = W n(x) + b:
    W n(x) + b = (W·diag(γ)) x̂ + (b + W β)
so each reader gets W ← W·diag(γ), b ← b + W·β and the norm loses its affine.  Exact.
Precondition, checked per norm: every reader is a linear taking the norm's output (through
views, dropout in eval, casts) as its input.  A norm that also feeds a residual add (Post-LN),
an activation or anything else is left as it is, and the report names that reader.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from ..analysis import Linear, Norm, constant_value, describe, linears_reading, match_norm
from ..analysis.graph import value_of
from ..program import Program
from . import register_pass
from .base import Guarantee, Pass, SiteLog

aten = torch.ops.aten


@register_pass
@dataclass
class FoldNormAffine(Pass):
    name = "fold_norm_affine"
    summary = "fold LayerNorm/RMSNorm γ, β into the linears that alone read the norm (W·diag(γ), b + W·β)"
    guarantee = Guarantee.EXACT
    default = True

    def apply(self, program: Program, log: SiteLog) -> None:
        for node in list(program.graph.nodes):
            norm = match_norm(node)
            if norm is None or (norm.gamma is None and norm.beta is None):
                continue
            linears, others = linears_reading(norm.node)
            if not linears and not others:
                continue
            where = describe(norm.node)
            gamma, beta = (_constant(program, n) for n in (norm.gamma, norm.beta))
            problem = _why_not_foldable(norm, gamma, beta, others)
            if problem:
                log.skip(where, problem)
                continue
            untied = [fold_into_linear(program, lin, gamma, beta) for lin in linears]
            remove_affine(program, norm)
            names = ", ".join(describe(lin.node) + (" (its shared weight was copied first)" if u else "") for lin, u in zip(linears, untied))
            log.change(where, f"{'γ and β' if beta is not None else 'γ'} folded into {names}")


def _constant(program: Program, node) -> torch.Tensor | None:
    value = constant_value(node, program.tensor_of)
    return None if value is None else value.detach().double()


def _why_not_foldable(norm: Norm, gamma, beta, others: list[fx.Node]) -> str | None:
    if others:
        reader = others[0]
        return f"its output is also read by {describe(reader)} ({_op_name(reader)}), which cannot absorb γ/β"
    if norm.gamma is not None and gamma is None:
        return "γ is computed at run time, not a stored tensor"
    if norm.beta is not None and beta is None:
        return "β is computed at run time, not a stored tensor"
    width = value_of(norm.node).shape[-1]
    for value in (gamma, beta):
        if value is not None and tuple(value.shape) != (width,):
            return f"γ/β has shape {tuple(value.shape)}, not ({width},): it is not per feature"
    return None


def _op_name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target)) if node.op == "call_function" else node.op


def fold_into_linear(program: Program, lin: Linear, gamma, beta, then=None) -> bool:
    """W ← W·diag(γ), b ← b + W·β for one linear, in float64.  Returns True if W had to be untied.

    `then` maps the folded [out, in] weight further (Pre-CRMSNorm folds its expansion so)."""
    weight_name = program.private_tensor(lin.weight_reader, lin.weight)
    weight = program.tensor(weight_name)
    w = lin.oriented(weight.double())  # [out, in]
    shift = w @ beta if beta is not None else None
    if gamma is not None:
        w = w * gamma
    if then is not None:
        w = then(w)
    program.set_tensor(weight_name, lin.oriented(w).to(weight.dtype).contiguous())  # back to the stored layout
    if shift is not None:
        add_to_bias(program, lin, shift, weight.dtype)
    return weight_name != lin.weight.target


def add_to_bias(program: Program, lin: Linear, shift: torch.Tensor, dtype: torch.dtype) -> None:
    """b ← b + shift for one linear, adding a bias where it has none."""
    if lin.bias is not None:
        name = program.private_tensor(lin.node, lin.bias)
        old = program.tensor(name)
        program.set_tensor(name, (old.double() + shift).to(old.dtype))
        return
    owner, _, _ = lin.weight.target.rpartition(".")
    bias = program.new_tensor(f"{owner}.bias" if owner else f"{lin.weight.target}_bias", shift.to(dtype))
    if lin.node.target is aten.linear.default:
        lin.node.args = (lin.node.args[0], lin.node.args[1], bias)
        return
    with program.graph.inserting_after(lin.node):  # mm / matmul: add the bias after
        biased = program.graph.call_function(aten.add.Tensor, (lin.node, bias))
    biased.meta = dict(lin.node.meta)
    lin.node.replace_all_uses_with(biased, delete_user_cb=lambda user: user is not biased)


def remove_affine(program: Program, norm: Norm) -> None:
    node = norm.node
    if norm.written_out:  # γ * x̂  →  x̂ (cast to the product's dtype if γ promoted it)
        replacement = norm.normalized
        out, normed = value_of(node), value_of(replacement)
        if out is not None and normed is not None and out.dtype != normed.dtype:
            with program.graph.inserting_after(replacement):
                replacement = program.graph.call_function(aten.to.dtype, (replacement, out.dtype))
            replacement.meta = dict(node.meta)
        node.replace_all_uses_with(replacement)
        program.graph.erase_node(node)
    elif norm.kind == "layer_norm":
        args = list(node.args) + [None] * (4 - len(node.args))
        args[2] = args[3] = None
        node.args = tuple(args)
    else:  # aten.rms_norm
        args = list(node.args)
        args[2] = None
        node.args = tuple(args)
