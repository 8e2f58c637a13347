"""Mean-free proofs: how to make a value have zero mean over its feature axis.

A value is made mean-free by re-centring the stored tensors that produce it: a linear's
weight rows (W ← W − 1·mean_rows(W)) and bias, an embedding table's rows, a convolution's
output channels, a parameter added directly (ViT's position embeddings); a model input it
starts from (a graph that begins mid-model, after a graph break) is centred in the graph.  Ops in between
must keep "mean-free" true: views, transposes that carry the feature axis, concatenation
along another axis, sums of mean-free values, scaling by a constant.  `plan_mean_free`
walks back from a value and returns the re-centrings to do, or raises NotMeanFree with
the node that prevents it, before anything is changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from .graph import describe, is_transparent, reads_values, value_of
from .patterns import match_linear

aten = torch.ops.aten


@dataclass(frozen=True)
class Centre:
    """Subtract from the tensor of `attr` (as `reader` reads it) its mean along `axis`."""

    reader: fx.Node
    attr: fx.Node
    axis: int


@dataclass(frozen=True)
class NormTable:
    """norm(embedding(W, ids)) = embedding(norm(W), ids): a LayerNorm on an embedding (BLOOM)."""

    norm: fx.Node
    embedding: fx.Node


@dataclass(frozen=True)
class CentreInput:
    """`node` (a model input the stream starts at) − its mean along `axis`, computed in the graph for every reader."""

    node: fx.Node
    axis: int


@dataclass(frozen=True)
class Through:
    """`node` carries the mean-free value, its feature axis at `axis` (negative): a node whose
    shape arguments change if the features are compressed (Pre-CRMSNorm)."""

    node: fx.Node
    axis: int


class NotMeanFree(Exception):
    def __init__(self, node: fx.Node, reason: str):
        super().__init__(f"{describe(node)}: {reason}")
        self.node, self.reason = node, reason


def _op(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target)) if node.op == "call_function" else node.op


def _ndim(node) -> int:
    val = value_of(node)
    if val is None:
        raise NotMeanFree(node, "its shape is unknown")
    return val.dim()


def plan_mean_free(value: fx.Node, reader: fx.Node, allowed_readers: set[fx.Node], dim: int = -1) -> list:
    """The actions that make `value` (read by `reader`) mean-free along `dim` (negative)."""
    plan: list = []
    _plan(value, dim, reader, allowed_readers, plan)
    return plan


def _plan(node, dim: int, reader: fx.Node, allowed: set[fx.Node], plan: list) -> None:
    if not isinstance(node, fx.Node):
        if node == 0:
            return
        raise NotMeanFree(reader, f"a constant {node!r} is added to every feature")
    if node.op == "get_attr":
        tensor_dim = _ndim(node)
        if -dim > tensor_dim:
            raise NotMeanFree(node, "it broadcasts along the feature axis")
        plan.append(Centre(reader, node, tensor_dim + dim))
        return
    others = [u for u in node.users if u is not reader and u not in allowed and reads_values(u)]
    if others:
        raise NotMeanFree(
            node, f"its output is also read by {describe(others[0])} ({_op(others[0])}), which would see the change"
        )
    if node.op == "placeholder":  # no weight writes it: centre it in the graph (one mean and one subtraction)
        plan.append(CentreInput(node, dim))
        return
    if node.op != "call_function":
        raise NotMeanFree(node, f"{node.op} writes into the stream")
    target, args = node.target, node.args
    plan.append(Through(node, dim))

    if is_transparent(node):
        return _plan(args[0], dim, node, allowed, plan)
    lin = match_linear(node)
    if lin is not None:
        if dim != -1:
            raise NotMeanFree(node, "a linear's output is read along another axis than its features")
        plan.append(Centre(lin.weight_reader, lin.weight, 1 if lin.transposed else 0))
        if lin.bias is not None:
            plan.append(Centre(lin.node, lin.bias, 0))
        return
    if target is aten.embedding.default and isinstance(args[0], fx.Node) and args[0].op == "get_attr" and dim == -1:
        plan.append(Centre(node, args[0], 1))
        return
    if (
        target in (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)
        and isinstance(args[1], fx.Node)
        and args[1].op == "get_attr"
    ):
        if _ndim(node) + dim != 1:
            raise NotMeanFree(node, "a convolution's output is read along another axis than its channels")
        plan.append(Centre(node, args[1], 0))
        if len(args) > 2 and isinstance(args[2], fx.Node):
            plan.append(Centre(node, args[2], 0))
        return
    if target is aten.layer_norm.default and _reads_embedding_table(node):
        plan.append(NormTable(node, _source(args[0])))
        return
    if target in (aten.add.Tensor, aten.sub.Tensor) and not node.kwargs:
        for operand in args[:2]:  # broadcasting aligns trailing axes: a negative axis means the same one
            if isinstance(operand, fx.Node) and not _spans_features(operand, dim):
                raise NotMeanFree(node, f"{describe(operand)} adds the same value to every feature")
            _plan(operand, dim, node, allowed, plan)
        return
    if target is aten.mul.Tensor:
        spanning = [a for a in args if isinstance(a, fx.Node) and _spans_features(a, dim)]
        if len(spanning) == 1:  # x · c with c constant along the features keeps the mean at zero
            return _plan(spanning[0], dim, node, allowed, plan)
    if target is aten.cat.default:
        axis = args[1] if len(args) > 1 else 0
        out_ndim = _ndim(node)
        if axis % out_ndim != dim % out_ndim:
            for part in args[0]:
                _plan(part, dim, node, allowed, plan)
            return
    if target is aten.expand.default:
        return _plan(args[0], dim, node, allowed, plan)
    if target is aten.transpose.int or target is aten.permute.default:
        out_ndim = _ndim(node)
        out_axis = dim % out_ndim
        if target is aten.transpose.int:
            a, b = (x % out_ndim for x in args[1:3])
            in_axis = b if out_axis == a else a if out_axis == b else out_axis
        else:
            in_axis = list(args[1])[out_axis] % out_ndim
        return _plan(args[0], in_axis - out_ndim, node, allowed, plan)
    if target is aten.flatten.using_ints:
        in_ndim, out_ndim = _ndim(args[0]), _ndim(node)
        start, end = args[1] % in_ndim, (args[2] if len(args) > 2 else -1) % in_ndim
        out_axis = dim % out_ndim
        if out_axis < start:
            return _plan(args[0], out_axis - in_ndim, node, allowed, plan)
        if out_axis > start:
            return _plan(args[0], out_axis + (end - start) - in_ndim, node, allowed, plan)
    raise NotMeanFree(node, f"{_op(node)} writes into the stream and effcc cannot make its output mean-free")


def _source(node):
    while isinstance(node, fx.Node) and is_transparent(node):
        node = node.args[0]
    return node


def _reads_embedding_table(norm: fx.Node) -> bool:
    source = _source(norm.args[0])
    return (
        isinstance(source, fx.Node)
        and source.target is aten.embedding.default
        and source.args[0].op == "get_attr"
        and len(source.users) == 1
        and all(isinstance(a, fx.Node) and a.op == "get_attr" or a is None for a in norm.args[2:4])
    )


def _spans_features(operand: fx.Node, dim: int) -> bool:
    val = value_of(operand)
    return val is not None and val.dim() >= -dim and val.shape[dim] != 1
