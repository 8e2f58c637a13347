"""Which hidden widths Sparse Wide can widen, found from the captured graph.

A *width group* is one channel dimension shared by several values: a layer's output channels,
the activations and norms it flows through, the residual adds that join it with other layers'
outputs, up to the layers that read it.  Widening the group means widening every layer that
writes it (output features), every layer that reads it (input features), and the per-channel
parameters on the way (norms, biases added by hand).  A group is widenable when it only passes
through ops that treat channels one by one; one that is reshaped into attention heads,
concatenated, read by an embedding or returned by the model is left alone, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from ..analysis.graph import describe, value_of

aten = torch.ops.aten

# Ops that treat each channel on its own, by overload packet name; in-place forms included.
_ELEMENTWISE = {
    "relu", "relu_", "gelu", "gelu_", "silu", "silu_", "sigmoid", "tanh", "hardtanh", "hardtanh_", "leaky_relu",
    "leaky_relu_", "elu", "hardswish", "hardswish_", "hardsigmoid", "mish", "softplus", "abs", "neg", "erf", "exp",
    "dropout", "clone", "contiguous", "alias", "detach", "_to_copy", "to", "type_as", "add", "add_", "sub", "mul",
    "mul_", "div", "pow", "maximum", "minimum", "where", "square", "sqrt", "rsqrt",
}  # fmt: skip
_POOLS = {"max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "max_pool2d_with_indices"}
_VIEWS = {"view", "reshape", "_unsafe_view", "flatten", "squeeze", "unsqueeze"}


@dataclass
class Layer:
    """A linear or conv2d call in the graph, tied to the module that owns its weight."""

    node: fx.Node  # the call whose output is the layer's output
    input: fx.Node
    module: str
    channel_axis: int  # of its input and output, counted from the end: -1 linear, -3 conv2d


@dataclass
class WidthGroup:
    channels: int
    writers: list[Layer] = field(default_factory=list)  # layers whose outputs are this width
    readers: list[Layer] = field(default_factory=list)  # layers whose inputs are this width
    norms: list[str] = field(default_factory=list)  # module names (BatchNorm, LayerNorm) over it
    parameters: list[tuple[str, float]] = field(default_factory=list)  # (name, fill): per-channel tensors added/multiplied
    refusal: str | None = None  # why it cannot be widened (None: it can)

    @property
    def layers(self) -> list[Layer]:
        return self.writers + self.readers


def _name(node: fx.Node) -> str:
    target = node.target
    return getattr(target, "_opname", None) or getattr(target, "__name__", str(target))


def _axis_size(node: fx.Node, axis: int) -> int | None:
    val = value_of(node)
    if val is None or val.dim() < -axis:
        return None
    return int(val.shape[axis])


def _owner(node: fx.Node | None) -> str | None:
    """The module that owns a stored tensor read by `node` (its dotted name without the leaf)."""
    return node.target.rpartition(".")[0] if isinstance(node, fx.Node) and node.op == "get_attr" else None


def find_width_group(start: Layer, layers: dict[fx.Node, Layer], readers_of: dict[fx.Node, list[Layer]]) -> WidthGroup:
    """The width group that `start`'s output channels belong to."""
    group = WidthGroup(_axis_size(start.node, start.channel_axis) or 0)
    seen: dict[fx.Node, int] = {}
    todo: list[tuple[fx.Node, int, bool]] = [(start.node, start.channel_axis, False)]  # (value, axis, explore producer?)

    def refuse(node: fx.Node, why: str) -> None:
        if group.refusal is None:
            group.refusal = f"{describe(node)}: {why}"

    def join(node: fx.Node, axis: int, producer: bool = True) -> None:
        if node in seen:
            if seen[node] != axis:
                refuse(node, "it carries these channels on two different axes")
            return
        if _axis_size(node, axis) != group.channels:
            refuse(node, f"expected {group.channels} channels on axis {axis}, found another size")
            return
        seen[node] = axis
        todo.append((node, axis, producer))

    while todo and group.refusal is None:
        value, axis, producer = todo.pop()
        if value in layers:
            group.writers.append(layers[value])
        elif producer:
            _producer_side(value, axis, join, refuse, group)
        for user in value.users:
            _user_side(value, user, axis, join, refuse, group, readers_of)
    group.writers = list({id(w): w for w in group.writers}.values())
    group.readers = list({id(r): r for r in group.readers}.values())
    return group


def _operands(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.args if isinstance(a, fx.Node)]


def _per_channel(node: fx.Node, axis: int, channels: int) -> bool:
    """Is `node` (a stored tensor) broadcast along the channels: size `channels` at `axis`, 1 elsewhere?"""
    val = value_of(node)
    return val is not None and val.dim() >= -axis and int(val.shape[axis]) == channels and val.numel() == channels


def _join_operands(node: fx.Node, skip: fx.Node, axis: int, join, refuse, group: WidthGroup) -> None:
    """`node` combines its operands channel by channel: those but `skip` join the group, or are per-channel constants."""
    for other in _operands(node):
        if other is skip:
            continue
        size = _axis_size(other, axis)
        if other.op == "get_attr":
            if _per_channel(other, axis, group.channels):
                fill = 1.0 if _name(node).startswith(("mul", "div")) else 0.0
                group.parameters.append((other.target, fill))
            elif size not in (None, 1):
                refuse(node, f"reads the stored tensor {other.target} of another shape")
        elif size == group.channels:
            join(other, axis)
        elif size not in (None, 1):
            refuse(node, "combines these channels with a tensor of another width")


def _producer_side(value: fx.Node, axis: int, join, refuse, group: WidthGroup) -> None:
    name = _name(value)
    if value.op == "placeholder":
        return refuse(value, "the width is that of a model input")
    if value.op == "get_attr":
        return refuse(value, "the width is that of a stored tensor")
    if name in _ELEMENTWISE or name in _POOLS or name in _VIEWS:
        source = value.args[0]
        if isinstance(source, fx.Node):
            source_axis = _view_axis(value, source, axis) if name in _VIEWS else axis
            if source_axis is None:
                return refuse(value, "a reshape moves these channels")
            join(source, source_axis)
        if name in _ELEMENTWISE:
            _join_operands(value, source, axis, join, refuse, group)
        return None
    if name in ("batch_norm", "layer_norm", "native_layer_norm"):
        return _norm(value, axis, join, refuse, group)
    return refuse(value, f"{name} is not a per-channel op")


def _user_side(value, user, axis, join, refuse, group, readers_of) -> None:
    name = _name(user)
    for reader in readers_of.get(user, []):
        if reader.input is value:
            if reader.channel_axis != axis:
                return refuse(user, "reads these channels on another axis")
            group.readers.append(reader)
            return None
    if user.op == "output":
        return refuse(value, "the width is part of the model's output")
    if user.op != "call_function":
        return refuse(user, "not a call")
    if name == "_assert_tensor_metadata":
        return None
    if name in _ELEMENTWISE:
        _join_operands(user, value, axis, join, refuse, group)
        return join(user, axis, producer=False)
    if name in _POOLS:
        return join(user, axis, producer=False)
    if name in _VIEWS or name == "mean":
        new_axis = _view_axis(user, value, axis, forward=True)
        if new_axis is None:
            return refuse(user, f"{name} moves these channels")
        return join(user, new_axis, producer=False)
    if name in ("batch_norm", "layer_norm", "native_layer_norm") and user.args[0] is value:
        return _norm(user, axis, join, refuse, group)
    return refuse(user, f"{name} is not a per-channel op")


def _norm(node: fx.Node, axis: int, join, refuse, group: WidthGroup) -> None:
    name = _name(node)
    if name == "batch_norm" and axis != -value_of(node).dim() + 1:
        return refuse(node, "a batch norm over another axis")
    if name != "batch_norm" and (axis != -1 or len(node.args[1]) != 1):
        return refuse(node, "a layer norm over more than these channels")
    stored = node.args[1] if name == "batch_norm" else (node.args[2] if len(node.args) > 2 else None)
    owner = _owner(stored) or (_owner(node.args[3]) if name == "batch_norm" else None)
    if owner is None:
        return refuse(node, "a norm without stored parameters cannot be traced to its module")
    group.norms.append(owner)
    join(node.args[0], axis)
    return join(node, axis, producer=False)


def _view_axis(out: fx.Node, src: fx.Node, axis: int, forward: bool = False) -> int | None:
    """Where the channels at `axis` of one side of a view/flatten/mean land on the other side, if they stay whole.

    Allowed: the channel dim is last on both sides (rows regrouped: GPT-2's Conv1D), or a
    [N, C, 1, 1] → [N, C] flatten/mean (a CNN's head)."""
    a, b = (src, out) if forward else (out, src)  # a: where `axis` is known
    va, vb = value_of(a), value_of(b)
    if va is None or vb is None:
        return None
    channels = int(va.shape[axis])
    if axis == -1 and int(vb.shape[-1]) == channels:
        return -1
    # NCHW ↔ NC: the channel is dim 1 of both, and nothing else of size > 1 shares it.
    four, two = (va, vb) if va.dim() == 4 else (vb, va)
    same_channels = four.dim() == 4 and two.dim() == 2 and int(four.shape[1]) == int(two.shape[1]) == channels
    if same_channels and (_name(out) == "mean" or int(four.shape[2]) * int(four.shape[3]) == 1):
        return -1 if vb is two else -3
    return None
