"""Sparse-IFT (sparse iso-FLOP transformations): layers, masks, dynamic sparse training, inference."""

from .layers import LayerSpec, MaskedLayer, SparseDoped, SparseFactorized, SparseParallel, masked_layers

__all__ = ["LayerSpec", "MaskedLayer", "SparseDoped", "SparseFactorized", "SparseParallel", "masked_layers"]
