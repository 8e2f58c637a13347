"""The four Sparse-IFT families: what replaces one dense layer, and the widths that keep its FLOPs.

With sparsity s, k = 1 / (1 − s) and a layer of `in` inputs, `out` outputs and `taps` = kh·kw:
    parallel     round(k) sparse copies of the layer, summed
    factorized   sparse U: in → r (the layer's kernel), sparse V: r → out (1×1),
                 r = in·out·taps / ((1 − s)(in·taps + out))
    doped        a sparse copy of the layer + dense U: in → r, V: r → out,  r = s·in·out·taps / (in·taps + out)
    wide         the layer with its hidden widths multiplied (effcc.sparsity.widen finds them); the
                 factor is solved for the whole model so the total FLOPs stay the dense model's
Widths are whole numbers (multiples of the mask block); the exact number of kept weights is
then chosen for the FLOP budget (effcc.sparsity.masks), so the sparsity you get is s up to rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from .layers import LayerSpec, MaskedLayer, SparseDoped, SparseFactorized, SparseParallel, dense_layer

FAMILIES = ("wide", "parallel", "factorized", "doped")


@dataclass(frozen=True)
class Piece:
    """One weight of a replacement structure."""

    role: str  # "branch 0", "u", "v", "sparse", "layer"
    spec: LayerSpec
    sparse: bool


def round_width(width: float, multiple: int) -> int:
    return max(multiple, multiple * round(width / multiple))


def pieces(family: str, spec: LayerSpec, sparsity: float, multiple: int = 1) -> list[Piece]:
    """The weights that replace a layer `spec` in `family` ("wide" is planned model-wide, not here)."""
    density = 1 - sparsity
    n_in, n_out, taps = spec.in_features, spec.out_features, spec.taps
    if family == "parallel":
        k = max(1, round(1 / density))
        return [Piece(f"branch {i}", spec.resized(bias=spec.bias and i == 0), True) for i in range(k)]
    if family == "factorized":
        r = round_width(n_in * n_out * taps / (density * (n_in * taps + n_out)), multiple)
        return [Piece("u", spec.resized(out_features=r, bias=False), True), Piece("v", spec.pointwise().resized(in_features=r), True)]
    if family == "doped":
        r = round(sparsity * n_in * n_out * taps / (n_in * taps + n_out))
        low_rank = [Piece("u", spec.resized(out_features=r, bias=False), False),
                    Piece("v", spec.pointwise().resized(in_features=r, bias=False), False)] if r > 0 else []  # fmt: skip
        return [Piece("sparse", spec, True), *low_rank]
    raise ValueError(f"family {family!r} is not one of {FAMILIES}")


def build(family: str, built: list[nn.Module]) -> nn.Module:
    """Assemble the modules made for `pieces(family, ...)`, in the same order."""
    if family == "parallel":
        return SparseParallel(built)
    if family == "factorized":
        return SparseFactorized(*built)
    if family == "doped":
        return SparseDoped(*built) if len(built) == 3 else built[0]
    return built[0]  # wide: the layer itself


def make(piece: Piece, block: tuple[int, int], device, dtype) -> nn.Module:
    if piece.sparse:
        return MaskedLayer(piece.spec, block, device=device, dtype=dtype)
    return dense_layer(piece.spec, device=device, dtype=dtype)


def solve_width_factor(terms: list[tuple[float, int, float]], target: float) -> float:
    """ω ≥ 1 with Σ flops · ω^exponent · density = target, for terms (flops, exponent, density).

    Each layer of Sparse Wide has 0, 1 or 2 widened sides (exponent); sparse layers count at the
    requested density, the dense first/last layers at 1.  The sum grows with ω: bisection."""

    def spent(omega: float) -> float:
        return sum(f * omega**e * d for f, e, d in terms)

    if spent(1.0) >= target:
        return 1.0
    low, high = 1.0, 2.0
    while spent(high) < target:
        high *= 2
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if spent(mid) < target else (low, mid)
    return low if math.isfinite(low) else 1.0
