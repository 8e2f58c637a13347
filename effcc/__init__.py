"""effcc: equivalence-preserving graph rewrites for PyTorch models.

    res = effcc.optimize(model, (ids,), passes=["fold_norm_affine"])
    print(res.report); effcc.export_onnx(res, "model.onnx"); effcc.save(res, "model-dir")
    torch.compile(model, backend="effcc")
"""

from . import distributed, offload, qat, sparsity
from .api import OptimizeResult, check_onnx, export_onnx, optimize, verify
from .errors import CaptureError, EffccError, UnknownPassError, VerificationError
from .offload import optimize_checkpoint
from .passes import REGISTRY, Guarantee, Pass, register_pass
from .prefix_grouping import SharedPrefixError, SharedPrefixModel, shared_prefix
from .saving import load, save

__version__ = "0.1.0"


def list_passes() -> dict[str, str]:
    """Registered passes: name → one-line summary."""
    return {name: cls.summary for name, cls in REGISTRY.items()}


__all__ = [
    "CaptureError",
    "EffccError",
    "Guarantee",
    "OptimizeResult",
    "Pass",
    "SharedPrefixError",
    "SharedPrefixModel",
    "UnknownPassError",
    "VerificationError",
    "check_onnx",
    "distributed",
    "export_onnx",
    "list_passes",
    "load",
    "offload",
    "optimize",
    "optimize_checkpoint",
    "qat",
    "register_pass",
    "save",
    "shared_prefix",
    "sparsity",
    "verify",
]
