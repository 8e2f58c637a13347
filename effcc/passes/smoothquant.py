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

import functools
from dataclasses import dataclass

import torch
from torch import fx

from ..analysis import Linear, Norm, describe, linears_reading, match_norm, real_users
from ..analysis.channel_map import attention_sites, channel_maps, linear_pairs
from ..analysis.graph import is_transparent, reads_values
from ..calibrate import activation_stats
from ..errors import EffccError
from ..ops.quantized_linear import dequantize_int4, fake_quant_w8a8, quantize_weight_int4
from ..program import Program
from . import register_pass
from .base import Guarantee, Pass, SiteLog
from .fold_norm_affine import add_to_bias


@dataclass
class Site:
    norm: Norm
    linears: list[Linear]
    compensate: list[tuple[fx.Node, fx.Node]]  # (user, value it reads) on paths that need the value × s back


SEARCH_ROWS = 2048  # calibration tokens kept per site for the error searches


@register_pass
@dataclass
class SmoothQuant(Pass):
    name = "smoothquant"
    contradicts = {  # noqa: RUF012 - a class-level table, never mutated
        "smoothquant_plus": "both migrate the same norm → linear scales, one for W8A8 and one for W4A16: choose your quantiser's"
    }
    summary = "SmoothQuant: X/s into the norm, W·diag(s) into its linears, s = max|X|^α / max|W|^(1−α) (needs calibration)"
    guarantee = Guarantee.EXACT
    alpha: float | str = 0.5  # or "auto": per site, the α in 0, 0.05, …, 1 with the least W8A8 output error
    post_ln: bool = True  # smooth norms also read by a residual add, multiplying that path back by s
    attention: bool = True  # also migrate V projection → output projection through attention
    linear_pairs: bool = True  # and linear → linear through elementwise products (gated MLP up → down)

    def apply(self, program: Program, log: SiteLog) -> None:
        if self.alpha != "auto" and not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0):
            raise EffccError(f"{self.name}: alpha must be between 0 and 1, or 'auto'; got {self.alpha!r}")
        for site, stats in calibrated_sites(
            program, log, self.name, self.post_ln, keep_rows=SEARCH_ROWS if self.alpha == "auto" else 0
        ):
            weights = [oriented_weight(program, lin) for lin in site.linears]
            columns = [w.abs().amax(dim=0) for w in weights]
            if self.alpha == "auto":
                errors = {a: self.error(stats.sample, weights, smoothing_scale(stats.absmax, columns, a)) for a in ALPHA_GRID}
                alpha = min(errors, key=errors.get)
            else:
                alpha = float(self.alpha)
            s = smoothing_scale(stats.absmax, columns, alpha)
            migrate(program, site, s)
            chosen = f"α = {alpha:.2f} (searched), " if self.alpha == "auto" else ""
            log.change(
                describe(site.norm.node),
                f"{chosen}s ∈ [{s.min():.3g}, {s.max():.3g}] migrated into {_names(site)}{_restored(site)}",
                **activation_figures(stats.absmax, stats.absmax / s),
            )
        if self.attention:
            self.smooth_attention(program, log)
        if self.linear_pairs:
            self.smooth_linear_pairs(program, log)

    def smooth_linear_pairs(self, program: Program, log: SiteLog) -> None:
        """first → (views, elementwise products) → second: first's output channel ÷ s, second's input × s."""
        pairs, refused = linear_pairs(program.graph)
        for node, why in refused:
            log.skip(describe(node), why)
        if not pairs:
            return
        keep = SEARCH_ROWS if self.alpha == "auto" else 0
        stats = activation_stats(
            program,
            [pair.second.input for pair in pairs],
            program.calibration,
            description=f"{self.name}: linear pairs",
            keep_rows=keep,
        )
        for pair in pairs:
            act, w = stats[pair.second.input], oriented_weight(program, pair.second)
            columns = [w.abs().amax(dim=0)]
            if self.alpha == "auto":
                alpha = min(ALPHA_GRID, key=lambda a: self.error(act.sample, [w], smoothing_scale(act.absmax, columns, a)))
            else:
                alpha = float(self.alpha)
            s = smoothing_scale(act.absmax, columns, alpha)
            scale_output_channels(program, pair.first, 1 / s)
            scale_input_channels(program, pair.second, s)
            chosen = f"α = {alpha:.2f} (searched), " if self.alpha == "auto" else ""
            first, second = (describe(lin.node).split(" (")[0] for lin in (pair.first, pair.second))
            log.change(
                describe(pair.second.node),
                f"{chosen}s ∈ [{s.min():.3g}, {s.max():.3g}] from {first} into {second}",
                **activation_figures(act.absmax, act.absmax / s),
            )

    def error(self, x: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor) -> float:
        """What the α search minimises: the site's output error under the quantisation that follows."""
        return w8a8_error(x, weights, s)

    def smooth_attention(self, program: Program, log: SiteLog) -> None:
        """V projection → output projection: V's channel k ÷ s_k, the output projection's matching inputs × s_k."""
        sites, refused = attention_sites(program.graph)
        for attn, why in refused:
            log.skip(describe(attn), why)
        mapped = []
        maps = channel_maps(program.gm, sites, program.example_args, program.example_kwargs, program.store) if sites else []
        for site, mapping in zip(sites, maps):
            if mapping is None:
                log.skip(describe(site.attention), "could not show which V channel reaches which input of the output projection")
            else:
                mapped.append((site, mapping))
        if not mapped:
            return
        keep = SEARCH_ROWS if self.alpha == "auto" else 0
        stats = activation_stats(
            program,
            [site.output.input for site, _ in mapped],
            program.calibration,
            description=f"{self.name}: attention",
            keep_rows=keep,
        )
        for site, mapping in mapped:
            act = stats[site.output.input]
            w_out = oriented_weight(program, site.output)
            width = oriented_weight(program, site.value).shape[0]
            scale = functools.partial(value_channel_scale, act.absmax, w_out, mapping, width)  # α → s per V channel
            if self.alpha == "auto":
                alpha = min(ALPHA_GRID, key=lambda a: self.error(act.sample, [w_out], scale(a)[mapping]))
            else:
                alpha = float(self.alpha)
            s = scale(alpha)
            scale_output_channels(program, site.value, 1 / s)
            scale_input_channels(program, site.output, s[mapping])
            shared = " (grouped-query: V channels shared by heads)" if len(mapping) > len(set(mapping.tolist())) else ""
            chosen = f"α = {alpha:.2f} (searched), " if self.alpha == "auto" else ""
            log.change(
                describe(site.attention),
                f"{chosen}s ∈ [{s.min():.3g}, {s.max():.3g}] from {describe(site.value.node).split(' (')[0]} into {describe(site.output.node).split(' (')[0]}{shared}",
                **activation_figures(act.absmax, act.absmax / s[mapping]),
            )


ALPHA_GRID = [round(0.05 * i, 2) for i in range(21)]


def value_channel_scale(
    act_absmax: torch.Tensor, w_out: torch.Tensor, mapping: torch.Tensor, width: int, alpha: float
) -> torch.Tensor:
    """s per V channel, from the output projection's inputs it reaches; channels that reach nothing keep 1."""

    def grouped(per_input: torch.Tensor) -> torch.Tensor:
        return torch.zeros(width, dtype=torch.float64).scatter_reduce(0, mapping, per_input, "amax", include_self=False)

    s = smoothing_scale(grouped(act_absmax), [grouped(w_out.abs().amax(dim=0))], alpha)
    used = torch.zeros(width, dtype=torch.bool).index_fill(0, mapping, True)
    return torch.where(used, s, torch.ones_like(s))


def calibrated_sites(program: Program, log: SiteLog, pass_name: str, post_ln: bool, keep_rows: int = 0):
    """(site, statistics of the norm's output) for every norm → linears site."""
    sites = smoothing_sites(program, log, post_ln)
    if not sites:
        return []
    if program.calibration is None:
        raise EffccError(
            f"{pass_name} needs calibration data: optimize(..., calibration=[(inputs,), ...]) with a few real batches"
        )
    stats = activation_stats(
        program,
        [site.norm.node for site in sites],
        program.calibration,
        description=f"{pass_name}: calibrating",
        keep_rows=keep_rows,
    )
    return [(site, stats[site.norm.node]) for site in sites]


def activation_figures(before: torch.Tensor, after: torch.Tensor) -> dict:
    """Per-channel max |x| of the smoothed linears' input, before and after the migration (for the report's plots)."""
    return {"act_absmax_before": before, "act_absmax_after": after}


def _names(site) -> str:
    return ", ".join(describe(lin.node).split(" (")[0] for lin in site.linears)


def _restored(site) -> str:
    return f"; the value restored for {len(site.compensate)} other reader(s)" if site.compensate else ""


def oriented_weight(program: Program, lin: Linear) -> torch.Tensor:
    """W as [out, in] in float64, whatever way it is stored."""
    return lin.oriented(program.tensor(lin.weight.target).double())


def w8a8_error(x: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor, z: torch.Tensor | None = None) -> float:
    """Squared error of the site's linears under W8A8 after migrating (s, z), on sampled activations x."""
    shifted = x - z if z is not None else x
    total = 0.0
    for w in weights:
        xq, wq = fake_quant_w8a8(shifted / s, w * s)
        approx = xq @ wq.t() + (w @ z if z is not None else 0)
        total += (approx - x @ w.t()).pow(2).sum().item()
    return total


def w4a16_error(x: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor, group_size: int) -> float:
    """Squared error of the site's linears under 4-bit group-wise weights after smoothing by s."""
    total = 0.0
    for w in weights:
        smoothed = w * s
        group = group_size if smoothed.shape[1] % group_size == 0 else smoothed.shape[1]
        wq = dequantize_int4(*quantize_weight_int4(smoothed, group), group)
        total += ((x / s) @ wq.t() - x @ w.t()).pow(2).sum().item()
    return total


@register_pass
@dataclass
class SmoothQuantPlus(SmoothQuant):
    """SmoothQuant+ (Pan et al. 2023): smoothing chosen for 4-bit group-wise weight-only quantisation.

    The same exact migration as smoothquant; α is searched per site for the least output error
    with W4A16 weights (groups of `group_size`, as quantize_w4a16 will use), activations unquantised."""

    name = "smoothquant_plus"
    summary = "SmoothQuant+: smoothing with α searched for 4-bit group-wise weights (W4A16); exact, needs calibration"
    alpha: float | str = "auto"
    group_size: int = 128

    def error(self, x, weights, s):
        return w4a16_error(x, weights, s, self.group_size)


def migrate(program: Program, site, s: torch.Tensor, z: torch.Tensor | None = None) -> None:
    """The norm outputs (X − z) / s; each linear gets W·diag(s) and b + W z; other readers get X back."""
    if z is not None:
        for lin in site.linears:
            add_to_bias(program, lin, oriented_weight(program, lin) @ z, program.tensor(lin.weight.target).dtype)
        _shift_norm(program, site.norm, z)
    scale_norm(program, site.norm, 1 / s)
    for lin in site.linears:
        scale_input_channels(program, lin, s)
    if site.compensate:
        restore_other_paths(program, site, s, z)


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
    chosen = []
    for user in list(node.users):
        if not reads_values(user):
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


def restore_other_paths(program: Program, site: Site, s: torch.Tensor, z: torch.Tensor | None = None) -> None:
    """Readers that are not smoothed linears get ((X − z) / s) · s + z = X back."""
    base = site.norm.gamma.target
    dtype = program.tensor(base).dtype
    scale = program.new_tensor(f"{base}_smooth_scale", s.to(dtype))
    shift = program.new_tensor(f"{base}_smooth_shift", z.to(dtype)) if z is not None else None
    graph = program.graph
    restored: dict[fx.Node, fx.Node] = {}
    for user, value in site.compensate:
        if value not in restored:
            with graph.inserting_after(value):
                back = graph.call_function(torch.ops.aten.mul.Tensor, (value, scale))
            if shift is not None:
                with graph.inserting_after(back):
                    back = graph.call_function(torch.ops.aten.add.Tensor, (back, shift))
            back.meta = dict(value.meta)
            restored[value] = back
        user.replace_input_with(value, restored[value])


def _shift_norm(program: Program, norm: Norm, z: torch.Tensor) -> None:
    name = program.private_tensor(norm.node, norm.beta)
    beta = program.tensor(name)
    program.set_tensor(name, (beta.double() - z).to(beta.dtype))


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


def scale_output_channels(program: Program, lin: Linear, factor: torch.Tensor) -> None:
    _scale_stored(program, lin.weight_reader, lin.weight, factor, 1 if lin.transposed else 0)
    if lin.bias is not None:
        _scale_stored(program, lin.node, lin.bias, factor, 0)


def scale_input_channels(program: Program, lin: Linear, factor: torch.Tensor) -> None:
    _scale_stored(program, lin.weight_reader, lin.weight, factor, 0 if lin.transposed else 1)
