"""os_plus: Outlier Suppression+ (Wei et al. 2023): channel-wise shift, then scale.

Per input channel j of a norm → linears site:
    z_j = (max X_j + min X_j) / 2                     (centres each channel's range: asymmetry removed)
    s_j = max(1, max|X_j − z_j| / t)                   (only channels above the threshold t shrink)
    β ← (β − z) / s, γ ← γ / s;   W ← W·diag(s), b ← b + W z  (original W)
Exact before quantisation.  t is searched per site: the candidate (quantiles of the channels'
shifted ranges) whose W8A8 output error on sampled calibration tokens is least.  A norm
without β cannot take the shift: there OS+ scales only, and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..analysis import describe
from ..program import Program
from . import register_pass
from .base import Guarantee, Pass, SiteLog
from .smoothquant import (
    SEARCH_ROWS,
    _names,
    _restored,
    activation_figures,
    calibrated_sites,
    migrate,
    oriented_weight,
    w8a8_error,
)

QUANTILES = torch.linspace(0.0, 1.0, 21, dtype=torch.float64)


@register_pass
@dataclass
class OutlierSuppressionPlus(Pass):
    name = "os_plus"
    summary = "Outlier Suppression+: shift each channel to centre its range, scale outliers with a searched threshold (needs calibration)"
    guarantee = Guarantee.EXACT
    post_ln: bool = True  # as in smoothquant: restore the value for readers that cannot absorb the migration

    def apply(self, program: Program, log: SiteLog) -> None:
        for site, stats in calibrated_sites(program, log, self.name, self.post_ln, keep_rows=SEARCH_ROWS):
            shift = site.norm.beta is not None
            z = (stats.max + stats.min) / 2 if shift else None
            spread = (stats.max - stats.min) / 2 if shift else stats.absmax
            weights = [oriented_weight(program, lin) for lin in site.linears]
            candidates = torch.quantile(spread, QUANTILES).clamp(min=1e-8)
            best = min(candidates.tolist(), key=lambda t: w8a8_error(stats.sample, weights, (spread / t).clamp(min=1.0), z))
            s = (spread / best).clamp(min=1.0)
            migrate(program, site, s, z)
            how = "shift and scale" if shift else "scale only (the norm has no β to take the shift)"
            # spread is max |X − z| per channel (max |X| without the shift): the linears now read (X − z) / s
            log.change(
                describe(site.norm.node),
                f"{how}: t = {best:.3g}, {int((s > 1).sum())} channel(s) scaled, into {_names(site)}{_restored(site)}",
                **activation_figures(stats.absmax, spread / s),
            )
