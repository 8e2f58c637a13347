"""Lowerings of a rewritten program: ONNX Runtime here; Triton kernels live with their ops."""
