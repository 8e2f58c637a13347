"""Graph facts the passes share: what a node is (linear, norm), who reads it, residual streams."""

from .graph import constant_value, describe, real_users
from .patterns import Linear, Norm, linears_reading, match_linear, match_norm
from .residual import ResidualStream, residual_streams

__all__ = [
    "Linear",
    "Norm",
    "ResidualStream",
    "constant_value",
    "describe",
    "linears_reading",
    "match_linear",
    "match_norm",
    "real_users",
    "residual_streams",
]
