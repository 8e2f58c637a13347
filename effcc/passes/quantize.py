"""quantize_w8a8 and quantize_w4a16: lossy passes that replace linears by quantised ones.

The stored tensors follow effcc.ops.quantized_linear (the layout the kernels consume); the
ops' reference math runs them here (simulated quantisation).  The error against the original
is measured in float64 and reported; `bound` (relative, max|Δ|/max|ref|) makes it a failure
above that.  Linears that write a model output (the LM head, a classifier) stay in full
precision unless `include_output_layers=True`, as in SmoothQuant and most deployments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..analysis import Linear, describe, match_linear, real_users
from ..ops import quantized_linear as q
from ..program import Program
from ..progress import each
from . import register_pass
from .base import Guarantee, Pass, SiteLog


def quantizable_linears(program: Program, log: SiteLog, include_output_layers: bool) -> list[Linear]:
    found = []
    for node in list(program.graph.nodes):
        lin = match_linear(node)
        if lin is None:
            continue
        if not include_output_layers and any(reader.op == "output" for _, reader in real_users(node)):
            log.skip(describe(node), "writes a model output (LM head / classifier): kept in full precision")
            continue
        found.append(lin)
    return found


def _replace(program: Program, lin: Linear, op, stored: dict, extra: tuple = ()) -> None:
    """lin.node → op(x, *stored tensors, *extra, bias) with the same output."""
    base = lin.weight.target
    nodes = [program.new_tensor(f"{base}_{key}", value) for key, value in stored.items()]
    graph = program.graph
    with graph.inserting_before(lin.node):
        call = graph.call_function(op, (lin.input, *nodes, *extra, lin.bias))
    call.meta = dict(lin.node.meta)
    lin.node.replace_all_uses_with(call)
    graph.erase_node(lin.node)


@dataclass
class _Quantize(Pass):
    guarantee = Guarantee.LOSSY
    contradicts = {  # noqa: RUF012 - a class-level table, never mutated
        "real_to_complex": "real_to_complex turns the same linears into complex layers, which these quantisers do not take",
        "fairy2i": "fairy2i quantises the same layers to {±1, ±i} codes",
    }
    bound: float | None = None  # fail above this relative error (float64 evaluation); None: report only
    include_output_layers: bool = False

    def rtol(self, dtype: torch.dtype) -> float:
        return self.bound if self.bound is not None else float("inf")


@register_pass
@dataclass
class QuantizeW8A8(_Quantize):
    name = "quantize_w8a8"
    contradicts = {**_Quantize.contradicts, "quantize_w4a16": "a linear is stored in one weight format, int8 or int4"}  # noqa: RUF012
    summary = "int8 weights (per output channel) × int8 activations (per token, dynamic), int32 accumulation"

    def apply(self, program: Program, log: SiteLog) -> None:
        for lin in each(quantizable_linears(program, log, self.include_output_layers), f"{self.name}: linears"):
            w = lin.oriented(program.tensor(lin.weight.target))  # [out, in]
            qweight, scale = q.quantize_weight_int8(w)
            error = ((qweight.double() * scale.double()[:, None] - w.double()).abs().max() / w.double().abs().max()).item()
            _replace(program, lin, torch.ops.effcc.w8a8_linear.default, {"int8": qweight, "scale": scale})
            log.change(describe(lin.node), f"W8A8, weight max rel error {error:.1e}", weight_rel_error=error)


@register_pass
@dataclass
class QuantizeW4A16(_Quantize):
    name = "quantize_w4a16"
    summary = "4-bit weights in groups along the input (scale and zero point per group), activations unquantised"
    group_size: int = 128

    def apply(self, program: Program, log: SiteLog) -> None:
        for lin in each(quantizable_linears(program, log, self.include_output_layers), f"{self.name}: linears"):
            w = lin.oriented(program.tensor(lin.weight.target))  # [out, in]
            if w.shape[1] % self.group_size or self.group_size % 2:
                log.skip(describe(lin.node), f"{w.shape[1]} input features are not a multiple of group_size={self.group_size}")
                continue
            packed, scales, zeros = q.quantize_weight_int4(w, self.group_size)
            error = (
                (q.dequantize_int4(packed, scales, zeros, self.group_size) - w.double()).abs().max() / w.double().abs().max()
            ).item()
            _replace(
                program,
                lin,
                torch.ops.effcc.w4a16_linear.default,
                {"int4": packed, "scales": scales, "zeros": zeros},
                (self.group_size,),
            )
            log.change(
                describe(lin.node),
                f"W4A16 (groups of {self.group_size}), weight max rel error {error:.1e}",
                weight_rel_error=error,
            )
