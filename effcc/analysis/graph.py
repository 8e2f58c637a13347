"""Walking a captured graph: readers through shape-only ops, constants, human names."""

from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten

# Ops that hand each feature vector (the last dim) through unchanged, only regrouping rows
# or changing nothing at all.  Looking through them, a linear that reads `view(ln(x))` reads ln(x).
_ROW_PRESERVING = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.alias.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.detach.default,
    aten.flatten.using_ints,
    aten.unsqueeze.default,
    aten.squeeze.dim,
}
_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default}
# Readers that only check metadata; they never consume values.
# Readers of a tensor's metadata (shape, dtype), not its values: a rewrite of the values does not concern them.
IGNORED_READERS = {aten._assert_tensor_metadata.default, aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int}


def value_of(node) -> torch.Tensor | None:
    """The fake tensor torch.export recorded for `node` (shape and dtype), if any."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - unknown symbolic sizes are not provably equal
        return False


def is_transparent(node: fx.Node) -> bool:
    """Does `node` pass its first input's feature vectors through unchanged (up to a cast)?"""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.target is aten.dropout.default:
        return node.args[2] is False  # dropout in eval mode is the identity
    if node.target in _CASTS:
        out, src = value_of(node), value_of(node.args[0])
        return out is not None and src is not None and out.is_floating_point() and src.is_floating_point()
    if node.target in (aten.slice.Tensor, aten.select.int):  # picks rows, never features
        src = value_of(node.args[0])
        dim = node.args[1] if len(node.args) > 1 else 0
        return src is not None and src.dim() > 1 and dim not in (-1, src.dim() - 1)
    if node.target in _ROW_PRESERVING:
        out, src = value_of(node), value_of(node.args[0])
        return out is not None and src is not None and out.dim() > 0 and src.dim() > 0 and _same(out.shape[-1], src.shape[-1])
    return False


def is_input_guard(node: fx.Node) -> bool:
    """torch.export's check of the inputs' shapes (`_guards_fn`): it reads the inputs, not their values."""
    return node.op == "call_module" and not node.users


def reads_values(user: fx.Node) -> bool:
    """False for nodes that take a tensor only for its metadata (shape checks, sizes, export's input guard)."""
    return not ((user.op == "call_function" and user.target in IGNORED_READERS) or is_input_guard(user))


def real_users(node: fx.Node) -> list[tuple[fx.Node, fx.Node]]:
    """(via, reader) for every node that consumes `node`'s values, looking through transparent ops.

    `via` is the node the reader takes as its argument (`node` itself or a view of it)."""
    found, stack = [], [node]
    while stack:
        current = stack.pop()
        for user in current.users:
            if not reads_values(user):
                continue
            if is_transparent(user) and user.args[0] is current:
                stack.append(user)
            else:
                found.append((current, user))
    return found


def source_of(node: fx.Node) -> fx.Node:
    """Walk back through transparent ops to the node that produced the values."""
    while isinstance(node, fx.Node) and is_transparent(node):
        node = node.args[0]
    return node


def constant_value(node, read_tensor) -> torch.Tensor | None:
    """Evaluate `node` in float64 if it depends only on stored tensors (get_attr) and literals.

    `read_tensor(get_attr_node)` returns the stored tensor.  This is how γ = 1 + w (Gemma)
    or a γ cast to float32 is recognised as a constant as well as a plain parameter.  Casts
    to lower floating precision are evaluated as float64, matching how effcc verifies."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        value = read_tensor(node)
        return value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value
    if node.op != "call_function" or node.target in IGNORED_READERS:
        return None
    inputs = [n for n in node.all_input_nodes]
    if not inputs:
        return None
    values = {n: constant_value(n, read_tensor) for n in inputs}
    if any(v is None for v in values.values()):
        return None
    args = fx.node.map_aggregate(fx.node.map_arg(node.args, lambda n: values[n]), _as_float64)
    kwargs = fx.node.map_aggregate(fx.node.map_arg(node.kwargs, lambda n: values[n]), _as_float64)
    with torch.no_grad():
        out = node.target(*args, **kwargs)
    return out if isinstance(out, torch.Tensor) else None


def _as_float64(arg):
    return torch.float64 if isinstance(arg, torch.dtype) and arg.is_floating_point else arg


def describe(node: fx.Node) -> str:
    """A name a user recognises: the module the node came from, then the node itself."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, module_type = list(stack.values())[-1]
        type_name = getattr(module_type, "__name__", str(module_type).rsplit(".", 1)[-1].strip("'>"))
        if path:
            return f"{path} ({type_name}, node {node.name})"
    return f"node {node.name}"
