"""smoothquant: migrate activation outliers into the weights (Xiao et al. 2023).

For a norm read only by linears, per input channel j:
    s_j = max|X_j|^α / max|W_{:,j}|^(1−α)       (max over calibration tokens; over all the linears)
    γ ← γ / s,  β ← β / s  (the norm now outputs X / s)      W ← W · diag(s)  (every linear reading it)
so every linear computes exactly what it did: (X / s)(W diag s)ᵀ = X Wᵀ.  The point is what
quantisation does afterwards: X / s has flatter channels.  q/k/v (or MLP up/gate) that read
the same norm share one s.  Exact; needs calibration data.

Sites this version leaves alone, with the reason: a norm also read by anything but linears
(a Post-LN residual add), a norm without a stored γ (run it before fold_norm_affine), a
computed γ (Gemma's 1 + w), and the v-projection → output-projection and linear → linear sites.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from ..analysis import Linear, Norm, describe, linears_reading, match_norm
from ..calibrate import activation_stats
from ..errors import EffccError
from ..program import Program
from . import register_pass
from .base import Guarantee, Pass, SiteLog


@dataclass
class Site:
    norm: Norm
    linears: list[Linear]


@register_pass
@dataclass
class SmoothQuant(Pass):
    name = "smoothquant"
    summary = "SmoothQuant: X/s into the norm, W·diag(s) into its linears, s = max|X|^α / max|W|^(1−α) (needs calibration)"
    guarantee = Guarantee.EXACT
    alpha: float = 0.5

    def apply(self, program: Program, log: SiteLog) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise EffccError(f"smoothquant: alpha must be between 0 and 1, got {self.alpha}")
        sites = smoothing_sites(program, log)
        if not sites:
            return
        if program.calibration is None:
            raise EffccError("smoothquant needs calibration data: optimize(..., calibration=[(inputs,), ...]) with a few real batches")
        stats = activation_stats(program, [site.norm.node for site in sites], program.calibration, description="smoothquant: calibrating")
        for site in sites:
            s = smoothing_scale(stats[site.norm.node].absmax, [weight_columns(program, lin) for lin in site.linears], self.alpha)
            scale_norm(program, site.norm, 1 / s)
            for lin in site.linears:
                scale_input_channels(program, lin, s)
            names = ", ".join(describe(lin.node).split(" (")[0] for lin in site.linears)
            log.change(describe(site.norm.node), f"s ∈ [{s.min():.3g}, {s.max():.3g}] migrated into {names}")


def smoothing_sites(program: Program, log: SiteLog) -> list[Site]:
    sites = []
    for node in list(program.graph.nodes):
        norm = match_norm(node)
        if norm is None:
            continue
        linears, others = linears_reading(norm.node)
        where = describe(norm.node)
        if not linears:
            continue
        if others:
            log.skip(where, f"also read by {describe(others[0])}, which cannot absorb 1/s (a residual read: Post-LN?)")
        elif norm.gamma is None:
            log.skip(where, "no stored γ to divide by s (run smoothquant before fold_norm_affine)")
        elif norm.gamma.op != "get_attr" or (norm.beta is not None and norm.beta.op != "get_attr"):
            log.skip(where, "γ is computed from the weights (e.g. Gemma's 1 + w), not a stored vector: not supported yet")
        else:
            sites.append(Site(norm, linears))
    return sites


def weight_columns(program: Program, lin: Linear) -> torch.Tensor:
    """max |W_{:,j}| per input channel j, in float64."""
    w = program.tensor(lin.weight.target).double()
    return (w.t() if lin.transposed else w).abs().amax(dim=0)


def smoothing_scale(act_absmax: torch.Tensor, weight_absmax: list[torch.Tensor], alpha: float) -> torch.Tensor:
    w = torch.stack(weight_absmax).amax(dim=0)
    s = act_absmax.pow(alpha) / w.pow(1 - alpha)
    usable = torch.isfinite(s) & (s > 0) & (act_absmax > 0) & (w > 0)  # a dead channel keeps s = 1
    return torch.where(usable, s, torch.ones_like(s)).clamp(min=1e-5)


def _scale_stored(program: Program, consumer: fx.Node, attr: fx.Node, factor: torch.Tensor, axis: int) -> None:
    name = program.private_tensor(consumer, attr)
    t = program.tensor(name)
    shape = [1] * t.dim()
    shape[axis] = -1
    program.set_tensor(name, (t.double() * factor.view(shape)).to(t.dtype))


def scale_norm(program: Program, norm: Norm, factor: torch.Tensor) -> None:
    for attr in (norm.gamma, norm.beta):
        if attr is not None:  # both are read by the norm node itself (checked in smoothing_sites)
            _scale_stored(program, norm.node, attr, factor, 0)


def scale_input_channels(program: Program, lin: Linear, factor: torch.Tensor) -> None:
    _scale_stored(program, lin.weight_reader, lin.weight, factor, 0 if lin.transposed else 1)
