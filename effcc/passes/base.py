"""The pass contract: match → check preconditions → rewrite, with a declared guarantee.

A pass is a dataclass whose fields are its options.  `apply` records every site it
changed and every site it left alone, with the reason in words a user understands;
the pipeline then verifies the whole model against the original in float64.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..program import Program


class Guarantee(str, enum.Enum):
    EXACT = "exact"  # the same function, up to floating-point rounding
    ISO_FLOP = "iso_flop"  # the same FLOPs, a different function
    LOSSY = "lossy"  # an approximation whose error is measured and bounded

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Site:
    where: str  # the layer or node, as `analysis.describe` names it
    detail: str  # what was done there, or why nothing was
    # Numbers behind the detail, for the report's plots (name → float, int, str or list of floats);
    # plain values so a report saves as JSON.  Not part of a site's identity.
    figures: dict = field(default_factory=dict, compare=False)


def plain_figure(value):
    """A figure as JSON takes it: a tensor becomes a float or a list of floats."""
    if isinstance(value, torch.Tensor):
        return value.detach().double().cpu().tolist()
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    if isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"a site figure is a number, a string or a list of numbers, not {type(value).__name__}")


@dataclass
class SiteLog:
    changed: list[Site] = field(default_factory=list)
    skipped: list[Site] = field(default_factory=list)

    def change(self, where: str, detail: str, **figures) -> None:
        self.changed.append(Site(where, detail, {name: plain_figure(v) for name, v in figures.items()}))

    def skip(self, where: str, reason: str) -> None:
        self.skipped.append(Site(where, reason))


# Relative error (max|Δ| / max|ref|, float64 evaluation) an exact rewrite may show, by the
# dtype its rewritten tensors are stored in: only the re-rounding of those tensors remains.
EXACT_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@dataclass
class Pass:
    name: ClassVar[str]
    summary: ClassVar[str]  # one line, shown by `effcc passes`
    guarantee: ClassVar[Guarantee]
    default: ClassVar[bool] = False  # run by torch.compile(backend="effcc") / optimize() with no passes named
    rewrites_tensors: ClassVar[bool] = True  # needs parameter values as constants (inference only under torch.compile)
    rewrites_modules: ClassVar[bool] = False  # changes the nn.Module itself (transform), before capture
    pays_in_training: ClassVar[bool] = False  # run by default on training graphs under torch.compile (measured faster)
    contradicts: ClassVar[dict[str, str]] = {}  # other pass name → why the two cannot be in one pipeline

    def transform(self, model, args: tuple, kwargs: dict, log: SiteLog):
        """For passes that rewrite modules: a new model (the given one untouched)."""
        raise NotImplementedError

    def apply(self, program: Program, log: SiteLog) -> None:
        raise NotImplementedError

    def rtol(self, dtype: torch.dtype) -> float:
        """The largest float64 relative error the pipeline accepts from this pass."""
        return EXACT_RTOL.get(dtype, 1e-4)

    def for_training(self) -> Pass | None:
        """The form of this pass for a model whose weights are being trained, or None if it has none.

        A pass that bakes new weight values cannot apply while an optimizer updates the old ones."""
        return None if self.rewrites_tensors else self

    @classmethod
    def options(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]
