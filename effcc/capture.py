"""Model + example inputs → `Program` (ATen training IR via torch.export, strict=False).

At this level `aten.linear`, `aten.addmm`, `aten.layer_norm`, `aten.scaled_dot_product_attention`
and `aten.embedding` are still whole ops, which is what passes match on.
"""

from __future__ import annotations

import contextlib
import inspect
import logging

import torch
from torch import nn
from torch.export import Dim
from torch.utils._pytree import tree_map

from .errors import CaptureError, first_line
from .program import Program


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put every submodule in eval mode for the capture, then restore each one's own flag."""
    flags = {module: module.training for module in model.modules()}
    for module in flags:  # not model.eval(): exported graph modules refuse it
        module.training = False
    try:
        yield
    finally:
        for module, training in flags.items():
            module.training = training


def automatic_dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict):
    """Let torch.export decide, dim by dim, which sizes may vary (Dim.AUTO), on every dim of token ids,
    masks and features, and on the batch dim alone of images and feature maps (floating tensors of
    four or more dims not named as masks): a symbolic height and width made Swin's window
    partitioning take a minute to export (0.3 s with static ones), and deployments fix their
    resolution."""

    def spec(value, name: str):
        if isinstance(value, torch.Tensor):
            image_like = value.is_floating_point() and value.dim() >= 4 and "mask" not in name.lower()
            return {axis: Dim.AUTO for axis in range(1 if image_like else value.dim())}
        if isinstance(value, (list, tuple)):
            return type(value)(spec(v, name) for v in value)
        if isinstance(value, dict):
            return {k: spec(v, f"{name}.{k}") for k, v in value.items()}
        return None

    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    return {name: spec(value, name) for name, value in bound.arguments.items()}


def detach_from_caller(gm: torch.fx.GraphModule) -> None:
    """Give the graph its own copies of every tensor, so no rewrite can reach the caller's model.

    Tensors that shared storage (tied embeddings) still share it after the copy, and tied
    parameters stay one Parameter object, so an optimizer updates them once, as before."""
    copies: dict[tuple, torch.Tensor] = {}

    def own(t: torch.Tensor) -> torch.Tensor:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype, type(t))
        if key not in copies:
            clone = t.detach().clone()
            copies[key] = nn.Parameter(clone, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else clone
        return copies[key]

    for module in gm.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = own(p)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = own(b)
        for name, value in list(vars(module).items()):  # lifted constants are plain attributes
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                setattr(module, name, own(value))


def export(module: nn.Module, args: tuple, kwargs: dict | None = None, dynamic_shapes=None):
    """torch.export (non-strict) in eval mode and outside any Dynamo tracing context.

    Inside effcc's torch.compile backend, an export must not add its symbols and guards to
    the shape environment of the Dynamo frame being compiled."""
    with eval_mode(module), torch._guards.tracing(None), _quiet_size_one_specialisation():
        return torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)


@contextlib.contextmanager
def _quiet_size_one_specialisation():
    """Dim.AUTO on a size-1 dim (one image channel, batch 1) makes export warn that it is static,
    which is what effcc wants; the warning would only be noise in a user's log."""
    logger = logging.getLogger("torch._export.non_strict_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def capture(model: nn.Module, args: tuple, kwargs: dict | None = None, *, dynamic: bool = True, detach: bool = True) -> Program:
    """Capture `model(*args, **kwargs)` as a Program, in eval mode, with copies of its tensors.

    With `dynamic=True` sizes that the model does not specialise on (batch, sequence length)
    stay symbolic, so the result runs on other shapes too; if that capture fails the
    shapes of the example inputs are used and the program says so in its notes.
    detach=False: the program reads the model's own tensors (for a model effcc built itself).
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(args, tuple):
        raise CaptureError(
            f"example_inputs must be a tuple of the model's positional arguments, got {type(args).__name__}; "
            "for one input write (x,)"
        )
    # A view (ids[:2]) would be captured with guards on its base tensor's size, which no other input meets.
    args, kwargs = tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) and t._base is not None else t, (args, dict(kwargs or {})))
    notes = []
    if any(m.training for m in model.modules()):
        notes.append("the model was in train mode: it was captured in eval mode (dropout off), its own mode is unchanged")
    try:
        spec = automatic_dynamic_shapes(model, args, kwargs) if dynamic else None
    except TypeError as error:
        raise CaptureError(
            f"{type(model).__name__}.forward{inspect.signature(model.forward)} does not take these example inputs: {error}"
        ) from None
    try:
        ep = export(model, args, kwargs, spec)
    except Exception as dynamic_failure:  # noqa: BLE001 - retried with static shapes below
        if spec is None:
            raise _capture_error(model, dynamic_failure) from dynamic_failure
        try:
            ep = export(model, args, kwargs, None)
        except Exception as static_failure:  # noqa: BLE001
            raise _capture_error(model, static_failure) from static_failure
        spec = None
        notes.append(
            "captured with the example inputs' exact shapes (dynamic capture failed: "
            f"{first_line(dynamic_failure)}); other shapes need a new optimize()"
        )
    gm = ep.module()
    if detach:
        detach_from_caller(gm)
    out_of_place_arithmetic(gm)
    return Program(gm, args, kwargs, spec, notes)


def out_of_place_arithmetic(gm: torch.fx.GraphModule) -> int:
    """In-place arithmetic on a value the graph computed itself (Falcon's `mlp_output += attention_output`)
    as its out-of-place op, the later readers of the value reading the result: what passes match on
    (a residual stream is a chain of `add`).  Only where nothing else can see the write: the value
    is a fresh tensor (no view of another) and has no views of its own; an input, a weight or a
    view is left as it is.  Returns how many were rewritten."""
    rewritten = 0
    for node in list(gm.graph.nodes):
        functional = _out_of_place_form(node)
        written = node.args[0] if functional is not None else None
        if written is None or not _fresh(written) or any(_aliases(user) for user in written.users if user is not node):
            continue
        if not _same_dtype(node.args):  # `a += b` keeps a's dtype where `a + b` would promote
            continue
        with gm.graph.inserting_before(node):
            replacement = gm.graph.call_function(functional, node.args, node.kwargs)
        replacement.meta = dict(node.meta)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        for reader in [user for user in written.users if user is not node and order[user] > order[node]]:
            reader.replace_input_with(written, replacement)  # it read the value after the write
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
        rewritten += 1
    if rewritten:
        gm.graph.lint()
        gm.recompile()
    return rewritten


def _out_of_place_form(node: torch.fx.Node):
    """aten.add.Tensor for aten.add_.Tensor (and so on): an op that writes its first argument only."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    schema = node.target._schema
    namespace, _, name = schema.name.partition("::")
    writes = [arg.alias_info is not None and arg.alias_info.is_write for arg in schema.arguments]
    if namespace != "aten" or not name.endswith("_") or writes[:1] != [True] or any(writes[1:]):
        return None
    packet = getattr(torch.ops.aten, name[:-1], None)
    return getattr(packet, node.target._overloadname, None) if packet is not None else None


def _same_dtype(args) -> bool:
    """Whether every tensor among `args` (fx nodes with traced values) has the first one's dtype."""
    dtypes = {arg.meta["val"].dtype for arg in args if isinstance(arg, torch.fx.Node) and isinstance(arg.meta.get("val"), torch.Tensor)}
    return len(dtypes) == 1


def _fresh(node) -> bool:
    """A tensor an op made anew: neither an input, a weight nor a view of another tensor."""
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and not _aliases(node)


def _aliases(node: torch.fx.Node) -> bool:
    """Whether `node` may return a view of (or write into) one of its inputs."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return node.op != "output"  # an unknown callable might keep a view; the graph's output only reads
    schema = node.target._schema
    return schema.is_mutable or any(ret.alias_info is not None for ret in schema.returns)


def _capture_error(model: nn.Module, error: Exception) -> CaptureError:
    if "data-dependent" in str(error) or "DataDependent" in type(error).__name__:
        hint = (
            "forward() branches on a tensor's value, which one graph cannot hold: write the branch with torch.cond, "
            "or use torch.compile(model, backend='effcc'), which rewrites the graphs on either side of the branch."
        )
    else:
        hint = (
            "Check that the example inputs are what forward() takes (a tuple of positional arguments), "
            "and for Hugging Face models build them with use_cache=False."
        )
    return CaptureError(f"could not capture {type(model).__name__} with torch.export: {type(error).__name__}: {first_line(error)}. {hint}")
