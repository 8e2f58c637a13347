"""Passes on a model larger than memory: its weights stream from a safetensors checkpoint.

    with effcc.offload.empty_weights():                  # parameters on the meta device: no memory
        model = LlamaForCausalLM(config)
    result = effcc.optimize_checkpoint(model, "llama-70b/", (ids,), ["smoothquant", "quantize"],
                                       out="llama-70b-w8a8/", calibration=batches, device="cuda")

What is in memory at any time is one site's tensors, never the model:
- the model is captured on the meta device (a graph with no weights);
- a pass reads a tensor through `Program.tensor`, which loads it from the checkpoint (safetensors,
  memory-mapped) and writes through `Program.set_tensor`, which spills the new value to disk at once;
- calibration and the float64 verification after each pass run the graph node by node
  (`StoreInterpreter`): a weight is loaded when the node that reads it runs and freed after it,
  so activations plus one layer's weights are alive, on `device`;
- the result is written to `out` as sharded safetensors (Hugging Face's layout and index), gathering
  one shard (`shard_bytes`, 1 GiB by default) at a time in host memory.
The store counts the bytes of loaded tensors still alive (`result.program.store.peak_bytes`, also in the
report's notes): the weights a pass, calibration or a check held at once.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_map

from .errors import EffccError
from .program import device_mapper, graph_tensors

INDEX = "model.safetensors.index.json"


@contextlib.contextmanager
def empty_weights():
    """Build models with parameters on the meta device (no memory, no initialisation) and real buffers.

    Buffers stay real because most are not in a checkpoint (rotary frequencies, causal masks)."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


# ---- where tensors live ---------------------------------------------------------------------------------
class Checkpoint:
    """A safetensors checkpoint: one file, or a folder of shards with Hugging Face's index (or without)."""

    def __init__(self, path):
        path = Path(path)
        if path.is_file():
            files = [path]
        elif (path / INDEX).exists():
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
            files = sorted({path / f for f in weight_map.values()})
        else:
            files = sorted(path.glob("*.safetensors"))
        if not files:
            raise EffccError(f"no safetensors checkpoint at {path} (expected *.safetensors files or {INDEX})")
        self.path, self._open, self.where = path, {}, {}
        for file in files:
            for key in self._handle(file).keys():  # noqa: SIM118 - a safetensors handle, not a dict
                self.where[key] = file

    def _handle(self, file: Path):
        if file not in self._open:
            self._open[file] = safe_open(str(file), framework="pt", device="cpu")
        return self._open[file]

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str) -> torch.Tensor:
        return self._handle(self.where[key]).get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        """A stored tensor's shape, read from the file's header (the data is not loaded)."""
        return tuple(self._handle(self.where[key]).get_slice(key).get_shape())


@dataclass
class TensorStore:
    """Every tensor of a program that is not in memory: written ones (spilled), resident buffers, the checkpoint."""

    checkpoint: Checkpoint
    spill: Path
    device: torch.device
    resident: dict[str, torch.Tensor] = field(default_factory=dict)  # small real tensors (buffers)
    aliases: dict[str, list[str]] = field(default_factory=dict)  # tied names → the other names of that tensor
    written: dict[str, Path] = field(default_factory=dict)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)  # what the model declares (a checkpoint may differ)
    live_bytes: int = 0
    peak_bytes: int = 0
    loads: int = 0

    def load(self, name: str, dtype: torch.dtype | None = None, *, device=None, counted: bool = True) -> torch.Tensor:
        """`name`'s current value on the store's device (or `device`), as `dtype`; counted while it is alive."""
        if name in self.written:
            with safe_open(str(self.written[name]), framework="pt", device="cpu") as f:
                value = f.get_tensor(name)
        elif name in self.resident:
            value = self.resident[name]
        else:
            value = self.checkpoint.get(self._checkpoint_key(name))
        if dtype is None or not value.is_floating_point():
            dtype = self.dtypes.get(name, value.dtype)
        value = value.to(device or self.device, dtype)
        if counted:
            self._count(value)
        return value

    def _checkpoint_key(self, name: str) -> str:
        for key in (name, *self.aliases.get(name, ())):
            if key in self.checkpoint:
                return key
        raise EffccError(
            f"{name} is not in the checkpoint {self.checkpoint.path} (nor under a tied name); "
            "was the checkpoint saved from this model's class and config?"
        )

    def _count(self, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        self.live_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self.loads += 1
        weakref.finalize(value, self._release, size)

    def _release(self, size: int) -> None:
        self.live_bytes -= size

    def write(self, name: str, value: torch.Tensor) -> None:
        """Spill a new value of `name` to disk now (the graph keeps a meta placeholder)."""
        self.spill.mkdir(parents=True, exist_ok=True)
        path = self.spill / f"{len(self.written)}-{name}.safetensors"
        save_file({name: value.detach().to("cpu").contiguous()}, str(path))
        old = self.written.get(name)
        self.written[name], self.dtypes[name] = path, value.dtype
        if old is not None:
            old.unlink(missing_ok=True)

    def check(self, names: dict[str, torch.Tensor]) -> None:
        """Every tensor the graph reads is in the checkpoint (or resident) with the shape the model expects."""
        for name, placeholder in names.items():
            self.dtypes[name] = placeholder.dtype  # loaded as the model's dtype, as from_pretrained(torch_dtype=...) does
            if name in self.resident:
                continue
            key = self._checkpoint_key(name)
            shape = self.checkpoint.shape(key)
            if shape != tuple(placeholder.shape):
                raise EffccError(f"{key} has shape {shape} in the checkpoint but {tuple(placeholder.shape)} in the model")


# ---- running a graph whose tensors are in a store ---------------------------------------------------------
class _Stored:
    """What a get_attr of a stored tensor yields: a name, loaded only when a node reads it."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


class StoreInterpreter(fx.Interpreter):
    """An FX interpreter that, given a store, loads each weight for the node that reads it and drops it after.

    float64=True runs the graph in float64 (weights, inputs and every dtype written in the graph),
    as effcc's verification does.  The graph was captured on the meta device: device arguments
    in it (arange(device=meta)) are read as the store's device."""

    def __init__(self, gm: fx.GraphModule, store: TensorStore | None, *, float64: bool = False):
        super().__init__(gm)
        self.store, self.float64 = store, float64
        self._subgraphs: dict[str, fx.GraphModule] = {}

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        if self.store is not None and isinstance(value, torch.Tensor) and value.is_meta:
            return _Stored(target)
        if self.store is not None and isinstance(value, fx.GraphModule):  # the body of a higher-order op
            if target not in self._subgraphs:
                body = copy.deepcopy(value)
                for node in body.graph.nodes:
                    node.args, node.kwargs = self._materialise((node.args, node.kwargs))
                body.recompile()
                self._subgraphs[target] = body
            return self._subgraphs[target]
        return value

    def _materialise(self, value):
        """Stored tensors loaded; meta devices → the store's; dtypes → float64 when running in float64."""
        from .verify import _promote_dtype

        if self.store is None and not self.float64:
            return value  # a plain run (calibration of a model in memory): nothing to map on the hot path
        to_store_device = device_mapper(self.store.device if self.store is not None else None, only_type="meta")

        def one(x):
            if isinstance(x, _Stored):
                return self.store.load(x.name, torch.float64 if self.float64 else None)
            x = to_store_device(x)
            return _promote_dtype(x) if self.float64 else x

        return fx.node.map_aggregate(value, one)

    def call_function(self, target, args, kwargs):
        return super().call_function(target, *self._materialise((args, kwargs)))

    def call_method(self, target, args, kwargs):
        return super().call_method(target, *self._materialise((args, kwargs)))

    def call_module(self, target, args, kwargs):
        return super().call_module(target, *self._materialise((args, kwargs)))


def run_stored(gm: fx.GraphModule, store: TensorStore, args: tuple, kwargs: dict | None = None, *, float64: bool = False):
    """The graph's flat outputs on `args`, streaming its weights from `store`."""
    from .verify import default_dtype, to_float64

    inputs = (args, kwargs or {})
    inputs = tree_map(
        lambda t: t.to(store.device) if isinstance(t, torch.Tensor) else t, to_float64(inputs) if float64 else inputs
    )
    flat, _ = tree_flatten(inputs)
    with torch.no_grad(), default_dtype(torch.float64) if float64 else contextlib.nullcontext():
        return StoreInterpreter(gm, store, float64=float64).run(*flat)


# ---- the front door ---------------------------------------------------------------------------------------
def meta_shell(model: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, list[str]]]:
    """(a copy of `model` with every tensor on meta, its real buffers by name, tied names).

    The caller's model is not changed; a real parameter is refused (this path is for weights on disk)."""
    real = [name for name, p in model.named_parameters() if p.device.type != "meta"]
    if real:
        raise EffccError(
            f"optimize_checkpoint: {real[0]} (and {len(real) - 1} more) hold real values; build the model inside "
            "effcc.offload.empty_weights() (or on the meta device) so that its weights come from the checkpoint"
        )
    resident = {name: b for name, b in model.named_buffers(remove_duplicate=False) if b.device.type != "meta"}
    by_identity: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_identity.setdefault(id(p), []).append(name)
    aliases = {
        name: [other for other in names if other != name] for names in by_identity.values() if len(names) > 1 for name in names
    }
    shell = copy.deepcopy(model).to("meta")
    return shell, {name: b.detach().clone() for name, b in resident.items()}, aliases


def write_checkpoint(gm: fx.GraphModule, store: TensorStore, out: Path, shard_bytes: int) -> None:
    """The program's tensors, as they are now, into `out`: shards of at most `shard_bytes` and an index.

    One shard at a time is gathered in host memory (safetensors writes a file whole)."""
    out.mkdir(parents=True, exist_ok=True)
    names_by_shard: list[list[str]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush():
        if shard:
            save_file(shard, str(out / f"part-{len(names_by_shard) + 1:05d}.safetensors"))
            names_by_shard.append(list(shard))
            shard.clear()

    for name in graph_tensors(gm):
        value = store.load(name, device="cpu", counted=False).contiguous()  # host memory: at most one shard
        nbytes = value.numel() * value.element_size()
        if shard and size + nbytes > shard_bytes:
            flush()
            size = 0
        shard[name] = value
        size, total = size + nbytes, total + nbytes
    flush()
    weight_map = {}
    for i, names in enumerate(names_by_shard, start=1):
        final = out / f"model-{i:05d}-of-{len(names_by_shard):05d}.safetensors"
        (out / f"part-{i:05d}.safetensors").rename(final)
        weight_map.update(dict.fromkeys(names, final.name))
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def optimize_checkpoint(
    model: nn.Module,
    checkpoint,
    example_inputs: tuple,
    passes,
    *,
    out,
    example_kwargs: dict | None = None,
    calibration=None,
    device="cpu",
    verify: bool = True,
    dynamic: bool = True,
    shard_bytes: int = 2**30,
):
    """effcc.optimize for a model whose weights are on disk: tensors are streamed, never all loaded.

    model: built inside `empty_weights()` (parameters on meta); checkpoint: its safetensors file or
    folder; out: a folder for the rewritten weights (safetensors shards + index).  Passes, calibration
    and verification are as in `effcc.optimize`; calibration batches and the float64 checks run on
    `device`, one weight at a time.  Returns an OptimizeResult whose `model` is the rewritten graph with
    its tensors on meta; `effcc.load(out, device)` gives it its weights from `out` when they fit."""
    from .api import OptimizeResult
    from .capture import capture
    from .passes import make_pass
    from .pipeline import run_passes, split_module_passes
    from .saving import write_description

    chosen = [make_pass(p) for p in passes]
    module_passes, graph_passes = split_module_passes(chosen)
    if module_passes:
        raise EffccError(
            f"{module_passes[0].name} rewrites modules and trains them: it needs the model in memory, use effcc.optimize"
        )
    out, device = Path(out), torch.device(device)
    shell, resident, aliases = meta_shell(model)
    on_meta = tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, (example_inputs, example_kwargs or {}))
    program = capture(shell, on_meta[0], on_meta[1], dynamic=dynamic, detach=False)
    program.example_args, program.example_kwargs = example_inputs, dict(example_kwargs or {})
    program.store = TensorStore(Checkpoint(checkpoint), out / ".effcc-spill", device, resident, aliases)
    program.store.check(graph_tensors(program.gm))
    program.calibration = [b if isinstance(b, tuple) else (b,) for b in calibration] if calibration is not None else None
    try:
        report = run_passes(shell, program, graph_passes, verify=verify)
        write_checkpoint(program.gm, program.store, out, shard_bytes)
    finally:
        shutil.rmtree(out / ".effcc-spill", ignore_errors=True)
    store = program.store
    report.model = type(model).__name__
    report.notes.append(
        f"weights streamed from {checkpoint} on {device}: at most {store.peak_bytes / 2**20:.1f} MiB of them loaded at once "
        f"({store.loads} loads); the rewritten weights are in {out}"
    )
    # From now on every tensor comes from `out` (the counts of the run are kept).
    store.checkpoint, store.written, store.resident, store.dtypes = Checkpoint(out), {}, {}, {}
    result = OptimizeResult(program.gm, report, program)
    write_description(result, out, {name: name for name in graph_tensors(program.gm)})  # effcc.load(out) reads it
    return result


__all__ = ["Checkpoint", "StoreInterpreter", "TensorStore", "empty_weights", "optimize_checkpoint"]
