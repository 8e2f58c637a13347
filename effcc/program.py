"""`Program`: a captured model and the one small interface passes use for its tensors.

A program is an FX GraphModule in which every parameter, buffer and constant is a
`get_attr` node whose target is a dotted name ("transformer.h.0.ln_1.weight").  Passes
never modify a tensor in place: they assign a new one under a name, which is what keeps
the caller's model and any tied tensors safe.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.utils._pytree import tree_map


def stored(gm: fx.GraphModule, name: str):
    """The value the graph module holds under `name` (a meta placeholder when the tensors are on disk)."""
    module_path, _, leaf = name.rpartition(".")
    return getattr(gm.get_submodule(module_path), leaf)


def graph_tensors(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every tensor the graph reads, by the name its get_attr nodes use (a tied tensor under each name)."""
    tensors = {}
    for node in gm.graph.find_nodes(op="get_attr"):
        value = stored(gm, node.target)
        if isinstance(value, torch.Tensor):
            tensors[node.target] = value
    return tensors


def device_mapper(device: torch.device | None, only_type: str | None = None):
    """A mapper of graph arguments: torch.device values (of type `only_type`, or all) → `device`; None: unchanged."""

    def one(x):
        if device is not None and isinstance(x, torch.device) and (only_type is None or x.type == only_type):
            return device
        return x

    return one


def place_device_args(gm: fx.GraphModule, device: torch.device, only_type: str | None = None) -> None:
    """Rewrite the devices written in the graphs of `gm` (arange(device=...), .to(device)) to `device`,
    so that a graph captured on one device (meta, or the saving machine's) runs next to its weights."""
    mapper = device_mapper(device, only_type)
    for module in gm.modules():
        if isinstance(module, fx.GraphModule):
            for node in module.graph.nodes:
                node.args, node.kwargs = fx.node.map_aggregate((node.args, node.kwargs), mapper)
            module.recompile()


@dataclass
class Program:
    gm: fx.GraphModule
    example_args: tuple
    example_kwargs: dict = field(default_factory=dict)
    dynamic_shapes: object = None  # the torch.export spec the graph was captured with
    notes: list[str] = field(default_factory=list)  # facts about the capture worth reporting
    calibration: list | None = None  # batches (tuples of inputs) for passes that need activation statistics
    store: object = None  # an offload.TensorStore when the tensors stay on disk (the graph holds meta placeholders)

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    # ---- reading -------------------------------------------------------------------
    def tensor(self, name: str) -> torch.Tensor:
        value = stored(self.gm, name)
        if self.store is not None and isinstance(value, torch.Tensor) and value.is_meta:
            return self.store.load(name, device="cpu")  # passes do their arithmetic on the host; runs use the store's device
        return value

    def tensor_of(self, node: fx.Node) -> torch.Tensor | None:
        """The tensor behind a `get_attr` node, or None for any other node."""
        if node.op != "get_attr":
            return None
        value = self.tensor(node.target)
        return value if isinstance(value, torch.Tensor) else None

    def readers(self, name: str) -> list[fx.Node]:
        """Every node that reads the tensor `name` (through any of its get_attr nodes)."""
        return [user for node in self.graph.find_nodes(op="get_attr", target=name) for user in node.users]

    # ---- writing -------------------------------------------------------------------
    def set_tensor(self, name: str, value: torch.Tensor) -> None:
        """Bind `name` to a new tensor, keeping its kind (parameter or buffer)."""
        module_path, _, leaf = name.rpartition(".")
        module = self.gm.get_submodule(module_path)
        old = getattr(module, leaf, None)
        value = value.detach()
        if self.store is not None:  # to disk now; the graph keeps only shape and dtype
            self.store.write(name, value)
            value = torch.empty_like(value, device="meta")
        if isinstance(old, nn.Parameter) or old is None:
            requires_grad = old.requires_grad if old is not None else value.is_floating_point()
            setattr(module, leaf, nn.Parameter(value, requires_grad=requires_grad and value.is_floating_point()))
        elif leaf in module._buffers:
            module._buffers[leaf] = value
        else:
            setattr(module, leaf, value)

    def new_tensor(self, like_name: str, value: torch.Tensor) -> fx.Node:
        """Register `value` next to `like_name` under a fresh name; returns a get_attr node for it.

        The node is inserted at the top of the graph; callers use it as an argument."""
        for i in itertools.count(1):
            name = f"{like_name}_effcc{i}"
            module_path, _, leaf = name.rpartition(".")
            if not hasattr(self.gm.get_submodule(module_path), leaf):
                break
        self.set_tensor(name, value)
        first = next(iter(self.graph.nodes))
        with self.graph.inserting_before(first):
            return self.graph.get_attr(name)

    def private_tensor(self, consumer: fx.Node, attr: fx.Node) -> str:
        """The name of a tensor that `consumer` alone reads in place of `attr`'s tensor.

        When the tensor has other readers (tied embeddings, a weight read twice), the
        consumer gets its own copy so that rewriting it changes nobody else.  Tensors that
        merely share storage under different names need nothing: writes assign new tensors.
        """
        if self.readers(attr.target) == [consumer]:
            return attr.target
        copy = self.new_tensor(attr.target, self.tensor(attr.target).clone())
        consumer.replace_input_with(attr, copy)
        return copy.target

    def retrace(self) -> None:
        """Capture the (rewritten) graph again, so every node's recorded shape is current.

        Passes that change widths (Pre-CRMSNorm) leave stale shapes behind; this refreshes them.
        The tensors are the same objects: nothing is copied."""
        from .capture import export

        self.recompile()
        args, kwargs = self.example_args, self.example_kwargs
        if self.store is not None:  # the graph's tensors are meta placeholders: so must the inputs be
            args, kwargs = tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, (args, kwargs))
        self.gm = export(self.gm, args, kwargs, self.dynamic_shapes).module()

    def run_float64(self):
        """The program's outputs on its example inputs, computed in float64 (weights streamed if on disk)."""
        from .offload import run_stored
        from .verify import run_float64

        if self.store is not None:
            return run_stored(self.gm, self.store, self.example_args, self.example_kwargs, float64=True)
        return run_float64(self.gm, self.example_args, self.example_kwargs)

    def recompile(self) -> None:
        # call_module nodes (export's input guards) have no users but must stay.
        self.graph.eliminate_dead_code(is_impure_node=lambda n: n.op == "call_module" or n.is_impure())
        self.graph.lint()
        self.gm.recompile()
        self.drop_unread_tensors()

    def drop_unread_tensors(self) -> None:
        """Forget stored tensors no node reads any more (a weight replaced by its quantised form)."""
        read = {node.target for node in self.graph.find_nodes(op="get_attr")}
        for name, _ in list(self.gm.named_parameters(remove_duplicate=False)) + list(
            self.gm.named_buffers(remove_duplicate=False)
        ):
            if name not in read:
                module_path, _, leaf = name.rpartition(".")
                module = self.gm.get_submodule(module_path)
                module._parameters.pop(leaf, None)
                module._buffers.pop(leaf, None)
