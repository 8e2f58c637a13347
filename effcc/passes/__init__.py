"""The pass registry: passes are chosen by name, or by (name, {options})."""

from __future__ import annotations

from ..errors import UnknownPassError
from .base import Guarantee, Pass, Site, SiteLog

REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    if cls.name in REGISTRY:
        raise ValueError(f"two passes are named {cls.name!r}")
    REGISTRY[cls.name] = cls
    return cls


def make_pass(spec) -> Pass:
    """'name' or ('name', {option: value}) or a Pass instance → a configured Pass."""
    if isinstance(spec, Pass):
        return spec
    if isinstance(spec, str):
        name, options = spec, {}
    elif isinstance(spec, (tuple, list)) and len(spec) == 2:
        name, options = spec
    else:
        name, options = None, None
    if not isinstance(name, str) or not isinstance(options, dict):
        raise UnknownPassError(f"a pass is given as 'name' or ('name', {{options}}), not {spec!r}")
    if name not in REGISTRY:
        known = ", ".join(sorted(REGISTRY))
        raise UnknownPassError(f"unknown pass {name!r}; registered passes: {known} (see `effcc passes`)")
    cls = REGISTRY[name]
    unknown = sorted(set(options) - set(cls.options()))
    if unknown:
        valid = ", ".join(cls.options()) or "none"
        raise UnknownPassError(f"pass {name!r} has no option {', '.join(map(repr, unknown))}; its options: {valid}")
    return cls(**options)


def default_passes() -> list[Pass]:
    return [cls() for cls in REGISTRY.values() if cls.default]


# Importing the pass modules registers them.
from . import fairy2i, fold_norm_affine, ln_to_crmsnorm, ln_to_rmsnorm, os_plus, quantize, real_to_complex, smoothquant, sparse_ift  # noqa: E402,F401

from . import causal_attention  # noqa: E402,F401 - registered last: defaults run in registration order

__all__ = ["Guarantee", "Pass", "REGISTRY", "Site", "SiteLog", "default_passes", "make_pass", "register_pass"]
