"""smoothquant: migrate activation outliers into the weights (Xiao et al. 2023).

For a norm read only by linears, per input channel j:
    s_j = max|X_j|^α / max|W_{:,j}|^(1−α)       (max over calibration tokens; over all the linears)
    γ ← γ / s,  β ← β / s  (the norm now outputs X / s)      W ← W · diag(s)  (every linear reading it)
so every linear computes exactly what it did: (X / s)(W diag s)ᵀ = X Wᵀ.  The point is what
quantisation does afterwards: X / s has flatter channels.  q/k/v (or MLP up/gate) that read
the same norm share one s.  Exact; needs calibration data.

A norm that is also read by something that cannot absorb the scale (Post-LN: the residual
add reads it too) is smoothed with an explicit `· s` on that other path, so it still sees the
original value (one elementwise multiply; `post_ln=False` skips such norms instead).
Sites this version leaves alone, with the reason: a norm without a stored γ (run it before
fold_norm_affine), a computed γ (Gemma's 1 + w), and the v-projection → output-projection and
linear → linear sites.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from ..analysis import Linear, Norm, describe, linears_reading, match_norm
from ..analysis.graph import IGNORED_READERS, is_transparent
from ..calibrate import activation_stats
from ..errors import EffccError
from ..program import Program
from . import register_pass
from .base import Guarantee, Pass, SiteLog


@dataclass
class Site:
    norm: Norm
    linears: list[Linear]
    compensate: list[tuple[fx.Node, fx.Node]]  # (user, value it reads) on paths that need the value × s back


@register_pass
@dataclass
class SmoothQuant(Pass):
    name = "smoothquant"
    summary = "SmoothQuant: X/s into the norm, W·diag(s) into its linears, s = max|X|^α / max|W|^(1−α) (needs calibration)"
    guarantee = Guarantee.EXACT
    alpha: float = 0.5
    post_ln: bool = True  # smooth norms also read by a residual add, multiplying that path back by s

    def apply(self, program: Program, log: SiteLog) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise EffccError(f"smoothquant: alpha must be between 0 and 1, got {self.alpha}")
        sites = smoothing_sites(program, log, self.post_ln)
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
            if site.compensate:
                restore_other_paths(program, site, s)
            names = ", ".join(describe(lin.node).split(" (")[0] for lin in site.linears)
            extra = f"; × s restored for {len(site.compensate)} other reader(s)" if site.compensate else ""
            log.change(describe(site.norm.node), f"s ∈ [{s.min():.3g}, {s.max():.3g}] migrated into {names}{extra}")


def smoothing_sites(program: Program, log: SiteLog, post_ln: bool = True) -> list[Site]:
    sites = []
    for node in list(program.graph.nodes):
        norm = match_norm(node)
        if norm is None:
            continue
        linears, others = linears_reading(norm.node)
        where = describe(norm.node)
        if not linears:
            continue
        compensate = _paths_to(norm.node, set(others)) if others else []
        if others and (not post_ln or compensate is None):
            why = "its output feeds the linears and" if compensate is None else "also"
            log.skip(where, f"{why} read by {describe(others[0])}, which cannot absorb 1/s (Post-LN residual read)")
        elif norm.gamma is None:
            log.skip(where, "no stored γ to divide by s (run smoothquant before fold_norm_affine)")
        elif norm.gamma.op != "get_attr" or (norm.beta is not None and norm.beta.op != "get_attr"):
            log.skip(where, "γ is computed from the weights (e.g. Gemma's 1 + w), not a stored vector: not supported yet")
        else:
            sites.append(Site(norm, linears, compensate))
    return sites


def _paths_to(node: fx.Node, others: set[fx.Node]) -> list[tuple[fx.Node, fx.Node]] | None:
    """(user, value it reads) for every edge after which only `others` read the norm's output.

    Looks through views/dropout shared by both kinds of reader; None if no such cut exists."""
    from ..analysis import real_users

    chosen = []
    for user in list(node.users):
        if user.target in IGNORED_READERS:
            continue
        if user in others:
            chosen.append((user, node))
        elif is_transparent(user):
            readers = {r for _, r in real_users(user)}
            if readers <= others:
                chosen.append((user, node))
            elif readers & others:
                deeper = _paths_to(user, others)
                if deeper is None:
                    return None
                chosen += deeper
    return chosen


def restore_other_paths(program: Program, site: Site, s: torch.Tensor) -> None:
    """Readers that are not smoothed linears get (X / s) · s = X back."""
    base = site.norm.gamma.target
    scale = program.new_tensor(f"{base}_smooth_scale", s.to(program.tensor(base).dtype))
    graph = program.graph
    restored: dict[fx.Node, fx.Node] = {}
    for user, value in site.compensate:
        if value not in restored:
            with graph.inserting_after(value):
                restored[value] = graph.call_function(torch.ops.aten.mul.Tensor, (value, scale))
            restored[value].meta = dict(value.meta)
        user.replace_input_with(value, restored[value])


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
