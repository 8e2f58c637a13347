"""effcc's custom ops (torch.library): each with a PyTorch reference, autograd where it trains,
and (in effcc.backends.triton) its kernel.  The RMSNorm ops need Triton, so they load on first use."""

from . import complex_linear, flops, quantized_linear, sparse

_RMS_NORM = {"add_rms_norm", "rms_norm", "rms_norm_reference"}


def __getattr__(name):
    if name in _RMS_NORM:
        from . import norms

        return getattr(norms, name)
    raise AttributeError(f"module 'effcc.ops' has no attribute {name!r}")


__all__ = ["add_rms_norm", "complex_linear", "flops", "quantized_linear", "rms_norm", "rms_norm_reference", "sparse"]
