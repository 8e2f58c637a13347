"""Recognising linears and norms in ATen training IR, whatever form the model wrote them in."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from .graph import real_users, source_of, value_of

aten = torch.ops.aten


@dataclass
class Linear:
    """y = x·Wᵀ + b over the last dim of `input`, with W a stored tensor.

    `weight` is the get_attr node of W.  `transposed` is True when W is stored as
    [in, out] (GPT-2's Conv1D, which export records as `aten.addmm(b, x, W)`).
    `weight_reader` is the node that reads `weight` (the linear, or a `t` in between)."""

    node: fx.Node
    input: fx.Node
    weight: fx.Node
    weight_reader: fx.Node
    bias: fx.Node | None
    transposed: bool

    def oriented(self, stored: torch.Tensor) -> torch.Tensor:
        """The stored weight as [out, in], whichever way round it is kept."""
        return stored.t() if self.transposed else stored


def _stored(node) -> tuple[fx.Node, fx.Node, bool] | None:
    """(get_attr, its reader, transposed?) when `node` is a stored 2-D tensor or its transpose."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        return node, None, False
    if node.op == "call_function" and _swaps_two_dims(node):
        inner = node.args[0]
        val = value_of(inner)
        if isinstance(inner, fx.Node) and inner.op == "get_attr" and val is not None and val.dim() == 2:
            return inner, node, True
    return None


def _swaps_two_dims(node: fx.Node) -> bool:
    """Whether `node` transposes a 2-D tensor: W.t(), W.T (`numpy_T`, as Falcon's linears write it),
    W.transpose(0, 1), W.permute(1, 0); not a transpose or permute that keeps the order."""
    if node.target in (aten.t.default, aten.numpy_T.default):
        return True
    if node.target is aten.transpose.int:
        return len(node.args) == 3 and node.args[1] % 2 != node.args[2] % 2
    if node.target is aten.permute.default:
        return [d % 2 for d in node.args[1]] == [1, 0]
    return False


def match_linear(node: fx.Node) -> Linear | None:
    if node.op != "call_function":
        return None
    if node.target is aten.linear.default:
        stored = _stored(node.args[1])
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if stored is None or (bias is not None and bias.op != "get_attr"):
            return None
        weight, reader, flipped = stored
        return Linear(node, node.args[0], weight, reader or node, bias, transposed=flipped)
    if node.target in (aten.addmm.default, aten.mm.default, aten.matmul.default):
        has_bias = node.target is aten.addmm.default
        if has_bias and (node.kwargs or node.args[0].op != "get_attr"):
            return None  # addmm with alpha/beta, or a computed bias
        x, w = node.args[1:3] if has_bias else node.args[:2]
        stored = _stored(w)
        if stored is None or value_of(stored[0]) is None or value_of(stored[0]).dim() != 2:
            return None
        weight, reader, flipped = stored
        return Linear(node, x, weight, reader or node, node.args[0] if has_bias else None, transposed=not flipped)
    return None


@dataclass
class Norm:
    """A LayerNorm or RMSNorm over the last dim, possibly written out op by op.

    `gamma`/`beta` are the nodes giving the affine scale/shift (None when absent);
    `gamma` may be an expression of stored tensors (Gemma's 1 + w).  For a hand-written
    RMSNorm, `node` is the `mul` that applies γ and `normalized` the value before it."""

    node: fx.Node
    kind: str  # "layer_norm" | "rms_norm"
    input: fx.Node
    gamma: fx.Node | None
    beta: fx.Node | None
    eps: float | None
    normalized: fx.Node | None = None  # hand-written RMSNorm only

    @property
    def written_out(self) -> bool:
        return self.normalized is not None


def match_norm(node: fx.Node) -> Norm | None:
    if node.op != "call_function":
        return None
    if node.target is aten.layer_norm.default:
        x, shape, w, b, eps = (list(node.args) + [None, None, 1e-5])[:5]
        if len(shape) != 1:
            return None
        return Norm(node, "layer_norm", x, w, b, eps)
    if node.target is aten.rms_norm.default:
        x, shape, w, eps = (list(node.args) + [None, None])[:4]
        if len(shape) != 1:
            return None
        return Norm(node, "rms_norm", x, w, None, eps)
    if node.target is aten.mul.Tensor:
        return _match_written_out_rms_norm(node)
    return None


def _match_written_out_rms_norm(node: fx.Node) -> Norm | None:
    """γ * (x · rsqrt(mean(x², -1, keepdim) + ε)), with optional casts, as in LLaMA/T5/Gemma."""
    for gamma, normed in (node.args, node.args[::-1]):
        if not (isinstance(gamma, fx.Node) and isinstance(normed, fx.Node)):
            continue
        g = value_of(gamma)
        if g is None or g.dim() != 1 or not _only_stored_inputs(gamma):
            continue
        found = _rms_normalized(source_of(normed))
        if found is not None:
            x, eps = found
            return Norm(node, "rms_norm", x, gamma, None, eps, normalized=normed)
    return None


def _only_stored_inputs(node: fx.Node) -> bool:
    if node.op == "get_attr":
        return True
    return node.op == "call_function" and bool(node.all_input_nodes) and all(
        _only_stored_inputs(n) for n in node.all_input_nodes
    )


def _rms_normalized(node: fx.Node):
    """(x, ε) if `node` is x · rsqrt(mean(x²) + ε) or x / sqrt(mean(x²) + ε)."""
    if node.op != "call_function" or node.target not in (aten.mul.Tensor, aten.div.Tensor):
        return None
    for x, inv in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
        if node.target is aten.div.Tensor and x is not node.args[0]:
            break
        if not isinstance(inv, fx.Node) or inv.op != "call_function":
            continue
        want = aten.rsqrt.default if node.target is aten.mul.Tensor else aten.sqrt.default
        if inv.target is not want:
            continue
        shifted = inv.args[0]
        if not (isinstance(shifted, fx.Node) and shifted.target is aten.add.Tensor):
            continue
        mean, eps = shifted.args
        if not isinstance(eps, (int, float)):
            mean, eps = eps, mean
        if not (isinstance(mean, fx.Node) and mean.target is aten.mean.dim and isinstance(eps, (int, float))):
            continue
        dims, keepdim = mean.args[1], (mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False))
        if list(dims) not in ([-1], [value_of(x).dim() - 1 if value_of(x) is not None else -1]) or not keepdim:
            continue
        square = mean.args[0]
        if _is_square_of(square, x):
            return x, float(eps)
    return None


def _is_square_of(node, x) -> bool:
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    if node.target is aten.pow.Tensor_Scalar:
        return node.args[0] is x and node.args[1] == 2
    if node.target is aten.mul.Tensor:
        return node.args[0] is x and node.args[1] is x
    return node.target is aten.square.default and node.args[0] is x


def linears_reading(node: fx.Node) -> tuple[list[Linear], list[fx.Node]]:
    """The linears that take `node`'s output as their input, and every other reader of it."""
    linears, others = [], []
    for _, reader in real_users(node):
        lin = match_linear(reader)
        if lin is not None and source_of(lin.input) is node:
            linears.append(lin)
        else:
            others.append(reader)
    return linears, others
