"""fairy2i: widely-linear layers → {±1, ±i} codes with scales, in 1-3 residual stages (lossy).

Runs on the layers `real_to_complex` made.  Each complex weight of A and of B is sent to the
nearest of {+1, −1, +i, −i} by phase and scaled (one (s_re, s_im) pair per tensor as in the
paper, or per row with `per_row=True`); each further stage quantises what the previous ones
left.  The report gives each layer's relative weight error (Frobenius, on the real weight) after
every stage.  effcc.ops.complex_linear holds the stored layout and the reference math.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..analysis import describe
from ..errors import UnknownPassError
from ..ops import complex_linear as cl
from ..program import Program
from ..progress import each
from . import register_pass
from .base import Guarantee, Pass, SiteLog


@register_pass
@dataclass
class Fairy2i(Pass):
    name = "fairy2i"
    summary = "widely-linear layers → {±1, ±i} codes × scales, `stages` residual stages (≈ one bit per real weight each)"
    guarantee = Guarantee.LOSSY
    stages: int = 2
    per_row: bool = False  # one scale pair per row instead of per tensor
    bound: float | None = None  # fail above this relative output error (float64); None: report only

    def __post_init__(self):
        if self.stages not in (1, 2, 3):
            raise UnknownPassError(f"pass 'fairy2i' takes stages=1, 2 or 3, not {self.stages!r}")

    def rtol(self, dtype: torch.dtype) -> float:
        return self.bound if self.bound is not None else float("inf")

    def apply(self, program: Program, log: SiteLog) -> None:
        layers = list(program.graph.find_nodes(op="call_function", target=torch.ops.effcc.widely_linear.default))
        if not layers:
            log.skip("graph", "no widely-linear layer to quantise: run real_to_complex first")
        for node in each(layers, f"{self.name}: layers"):
            x, *parts, bias = node.args
            a_re, a_im, b_re, b_im = (program.tensor(p.target).double() for p in parts)
            where = describe(node)
            if a_re.shape[1] % 4:
                log.skip(
                    where, f"{a_re.shape[1]} complex inputs: the codes are packed four per byte, so this needs a multiple of 4"
                )
                continue
            a, b = torch.complex(a_re, a_im), torch.complex(b_re, b_im)
            codes_a, scales_a, approx_a = cl.quantize_fairy2i(a, self.stages, self.per_row)
            codes_b, scales_b, approx_b = cl.quantize_fairy2i(b, self.stages, self.per_row)
            real = cl.from_widely_linear(a, b)
            errors = [((cl.from_widely_linear(qa, qb) - real).norm() / real.norm()).item() for qa, qb in zip(approx_a, approx_b)]
            codes = cl.pack_codes(torch.stack((codes_a, codes_b), dim=1))
            scales = torch.stack((scales_a, scales_b), dim=1)
            base = re.sub(r"_a_re(_effcc\d+)?$", "", parts[0].target)  # the original weight's name
            stored = [program.new_tensor(f"{base}_fairy2i_codes", codes), program.new_tensor(f"{base}_fairy2i_scales", scales)]
            with program.graph.inserting_before(node):
                call = program.graph.call_function(torch.ops.effcc.fairy2i_linear.default, (x, *stored, bias))
            call.meta = dict(node.meta)
            node.replace_all_uses_with(call)
            program.graph.erase_node(node)
            log.change(where, "weight error by stage: " + ", ".join(f"{e:.3f}" for e in errors), weight_error_by_stage=errors)
