"""Generated Triton kernels behind effcc's custom ops.  Each has a PyTorch reference in effcc.ops."""
