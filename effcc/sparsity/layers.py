"""Sparse-IFT's layers: masked linears and convs, and the three families that replace one layer.

Every sparse layer is a `MaskedLayer`: a `weight` parameter, a bool `mask` buffer of the same
shape (saved in state_dict, so it survives save/load) and the `block` its mask is constant over.
It computes with the masked weight through effcc::sparse_linear / effcc::sparse_conv2d
(effcc/ops/sparse.py: dense gradients for RigL, active-FLOP counting).

    SparseParallel     k sparse copies of the layer, summed
    SparseFactorized   sparse U (in → r) then sparse V (r → out); for a conv, U has the kernel, V is 1×1
    SparseDoped        a sparse copy of the layer plus a dense low-rank U·V
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from ..ops import sparse as ops


@dataclass(frozen=True)
class LayerSpec:
    """What a linear or conv2d layer is, independent of the class it came from."""

    kind: str  # "linear" | "conv2d"
    in_features: int
    out_features: int
    bias: bool
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    @property
    def taps(self) -> int:
        """Weights per (output, input) pair: kh·kw for a conv, 1 for a linear."""
        return self.kernel_size[0] * self.kernel_size[1]

    @property
    def weights(self) -> int:
        return self.out_features * self.in_features * self.taps

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """[out, in] for a linear (nn.Linear's layout), [out, in, kh, kw] for a conv."""
        base = (self.out_features, self.in_features)
        return (*base, *self.kernel_size) if self.kind == "conv2d" else base

    def resized(self, in_features: int | None = None, out_features: int | None = None, *, bias: bool | None = None) -> LayerSpec:
        return replace(
            self,
            in_features=self.in_features if in_features is None else in_features,
            out_features=self.out_features if out_features is None else out_features,
            bias=self.bias if bias is None else bias,
        )

    def pointwise(self) -> LayerSpec:
        """The 1×1 (or linear) layer that follows a factor with this layer's kernel."""
        return replace(self, kernel_size=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1))


def spec_of(module: nn.Module) -> LayerSpec | None:
    """The LayerSpec of nn.Linear, nn.Conv2d (groups 1, zero padding given as numbers) or HF's Conv1D; None otherwise."""
    if isinstance(module, nn.Linear):
        return LayerSpec("linear", module.in_features, module.out_features, module.bias is not None)
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            return None
        return LayerSpec(
            "conv2d", module.in_channels, module.out_channels, module.bias is not None,
            tuple(module.kernel_size), tuple(module.stride), tuple(module.padding), tuple(module.dilation),
        )  # fmt: skip
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        in_features, out_features = module.weight.shape  # transformers' Conv1D: y = x W + b, W [in, out]
        return LayerSpec("linear", in_features, out_features, module.bias is not None)
    return None


def why_not_a_layer(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"grouped convolution (groups={module.groups}) is not supported"
        return f"padding {module.padding!r} with mode {module.padding_mode!r}: only zero padding given as numbers is supported"
    return f"{type(module).__name__} is not a linear or conv2d layer"


class MaskedLayer(nn.Module):
    """A linear or conv2d whose weight is multiplied by a bool mask constant over `block`s."""

    weight: nn.Parameter
    mask: Tensor

    def __init__(self, spec: LayerSpec, block: tuple[int, int], device=None, dtype=None):
        super().__init__()
        self.spec = spec
        self.block = tuple(block)
        shape = spec.weight_shape
        self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(spec.out_features, device=device, dtype=dtype)) if spec.bias else None
        self.register_buffer("mask", torch.ones(shape, dtype=torch.bool, device=device))
        reset_like_torch(self.weight, self.bias)

    @property
    def density(self) -> float:
        return float(self.mask.count_nonzero()) / self.mask.numel()

    def forward(self, x: Tensor) -> Tensor:
        s = self.spec
        if s.kind == "linear":
            return ops.sparse_linear(x, self.weight, self.mask, self.bias)
        return ops.sparse_conv2d(x, self.weight, self.mask, self.bias, list(s.stride), list(s.padding), list(s.dilation), 1)

    def extra_repr(self) -> str:
        s = self.spec
        kernel = f", kernel={s.kernel_size}, stride={s.stride}" if s.kind == "conv2d" else ""
        return f"{s.kind} {s.in_features}→{s.out_features}{kernel}, density={self.density:.3f}, block={self.block}"


def reset_like_torch(weight: Tensor, bias: Tensor | None) -> None:
    """nn.Linear / nn.Conv2d's own initialisation (Kaiming-uniform, a=√5), for any shape."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in = weight[0].numel()
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(bias, -bound, bound)


def dense_layer(spec: LayerSpec, device=None, dtype=None) -> nn.Module:
    """A fresh nn.Linear or nn.Conv2d for `spec` (a dense layer whose width Sparse Wide changed)."""
    if spec.kind == "linear":
        return nn.Linear(spec.in_features, spec.out_features, bias=spec.bias, device=device, dtype=dtype)
    return nn.Conv2d(
        spec.in_features, spec.out_features, spec.kernel_size, spec.stride, spec.padding, spec.dilation,
        bias=spec.bias, device=device, dtype=dtype,
    )  # fmt: skip


class SparseParallel(nn.Module):
    """Σ_i branch_i(x): k sparse copies of one layer (the first holds the bias)."""

    def __init__(self, branches: list[MaskedLayer]):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: Tensor) -> Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out


class SparseFactorized(nn.Module):
    """v(u(x)): a sparse factor with the layer's kernel into r features, then a sparse pointwise one."""

    def __init__(self, u: MaskedLayer, v: MaskedLayer):
        super().__init__()
        self.u, self.v = u, v

    def forward(self, x: Tensor) -> Tensor:
        return self.v(self.u(x))


class SparseDoped(nn.Module):
    """sparse(x) + v(u(x)): the sparse layer plus a dense rank-r path."""

    def __init__(self, sparse: MaskedLayer, u: nn.Module, v: nn.Module):
        super().__init__()
        self.sparse, self.u, self.v = sparse, u, v

    def forward(self, x: Tensor) -> Tensor:
        return self.sparse(x) + self.v(self.u(x))


def masked_layers(model: nn.Module) -> list[tuple[str, MaskedLayer]]:
    """Every MaskedLayer in `model`, with its qualified name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MaskedLayer)]
