"""effcc's custom ops (torch.library): each with a PyTorch reference, a Triton kernel, autograd."""

from .rms_norm import add_rms_norm, rms_norm, rms_norm_reference

__all__ = ["add_rms_norm", "rms_norm", "rms_norm_reference"]
