"""Sparse-IFT (sparse iso-FLOP transformations): layers, masks, dynamic sparse training, inference."""

from .dst import SET, RigL
from .inference import BlockSparseLinear, freeze
from .layers import LayerSpec, MaskedLayer, SparseDoped, SparseFactorized, SparseParallel, masked_layers

__all__ = ["SET", "BlockSparseLinear", "LayerSpec", "MaskedLayer", "RigL", "SparseDoped", "SparseFactorized", "SparseParallel", "freeze", "masked_layers"]
