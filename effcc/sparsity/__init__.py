"""Sparse-IFT (sparse iso-FLOP transformations): layers, masks, dynamic sparse training, inference."""

from .dst import SET, RigL
from .layers import LayerSpec, MaskedLayer, SparseDoped, SparseFactorized, SparseParallel, masked_layers

__all__ = ["SET", "LayerSpec", "MaskedLayer", "RigL", "SparseDoped", "SparseFactorized", "SparseParallel", "masked_layers"]
