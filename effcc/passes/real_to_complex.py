"""real_to_complex: linears → widely-linear complex layers y = A z + B z̄ (exact; Fairy2i's first step).

Features j and j + n are paired into one complex feature (effcc.ops.complex_linear explains the
pairing and the identity).  Which linears: by default those inside numbered blocks (a weight
name with a `.<index>.` part: `h.3.mlp.c_fc`, `layers.0.self_attn.q_proj`), not embeddings or the
LM head; `include` / `exclude` are regular expressions on the weight's name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..analysis import describe, match_linear
from ..ops import complex_linear as cl
from ..program import Program
from . import register_pass
from .base import Guarantee, Pass, SiteLog

IN_A_BLOCK = r"\.\d+\."


def selected(name: str, include: str | None, exclude: str | None) -> bool:
    return re.search(include or IN_A_BLOCK, name) is not None and not (exclude and re.search(exclude, name))


@register_pass
@dataclass
class RealToComplex(Pass):
    name = "real_to_complex"
    summary = "linears in blocks → widely-linear complex form y = A z + B z̄ (features j and j + n paired)"
    guarantee = Guarantee.EXACT
    include: str | None = None  # regex on the weight name; default: inside numbered blocks
    exclude: str | None = None

    def apply(self, program: Program, log: SiteLog) -> None:
        for node in list(program.graph.nodes):
            lin = match_linear(node)
            if lin is None or not selected(lin.weight.target, self.include, self.exclude):
                continue
            where = describe(node)
            w = lin.oriented(program.tensor(lin.weight.target))
            if w.shape[0] % 2 or w.shape[1] % 2:
                log.skip(where, f"weight is {w.shape[0]}×{w.shape[1]}: an odd size cannot be paired into complex features")
                continue
            others = [r for r in program.readers(lin.weight.target) if r is not lin.weight_reader]
            if others:
                log.skip(where, f"its weight is also read by {describe(others[0])}: rewriting one reader would untie them")
                continue
            a, b = cl.to_widely_linear(w)
            parts = {"a_re": a.real, "a_im": a.imag, "b_re": b.real, "b_im": b.imag}
            nodes = [program.new_tensor(f"{lin.weight.target}_{key}", value.to(w.dtype)) for key, value in parts.items()]
            with program.graph.inserting_before(node):
                call = program.graph.call_function(torch.ops.effcc.widely_linear.default, (lin.input, *nodes, lin.bias))
            call.meta = dict(node.meta)
            node.replace_all_uses_with(call)
            program.graph.erase_node(node)
            log.change(where, f"{w.shape[0]}×{w.shape[1]} → A, B complex {w.shape[0] // 2}×{w.shape[1] // 2}")
