"""effcc.save / effcc.load: a rewritten model as safetensors plus a plain JSON description.

A saved result is a folder:

    effcc.json          the graph, node by node (op, target, arguments), which stored tensor
                        each get_attr reads, the example inputs' structure, the dynamic sizes
                        and the report of the passes
    model.safetensors   the tensors (or shards + model.safetensors.index.json), and the example inputs

Loading never executes code from the folder: targets are looked up by name among the
registered torch operators (`aten::add.Tensor`, `effcc::w8a8_linear.default`) and a short
list of Python operators; the output structure is rebuilt from types already registered
with torch's pytree (import the library that defines a model's output class, e.g.
transformers, before loading).  Nothing is unpickled.
"""

from __future__ import annotations

import json
import keyword
import math
import operator
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import fx, nn
from torch.export import Dim
from torch.utils import _pytree as pytree

from .errors import EffccError
from .offload import Checkpoint, write_checkpoint
from .program import Program, graph_tensors, place_device_args, stored

FORMAT = "effcc-saved-model"
VERSION = 1
DESCRIPTION = "effcc.json"
TENSORS = "model.safetensors"  # or model-0000i-of-0000n.safetensors shards and their index (offloaded results)
INPUTS = "example_inputs.safetensors"

# The only Python callables a saved graph may name: what torch.export leaves between ATen ops.
PYTHON_OPERATORS = {
    f"{fn.__module__}.{fn.__name__}": fn
    for fn in (
        operator.getitem,
        operator.add,
        operator.sub,
        operator.mul,
        operator.truediv,
        operator.floordiv,
        operator.mod,
        operator.pow,
        operator.neg,
        operator.eq,
        operator.ne,
        operator.lt,
        operator.le,
        operator.gt,
        operator.ge,
        operator.and_,
        operator.or_,
        operator.not_,
        math.sqrt,
        math.ceil,
        math.floor,
        torch.sym_float,
        torch.sym_int,
        torch.sym_max,
        torch.sym_min,
        torch.sym_not,
    )
}
DIM_HINTS = {"auto": Dim.AUTO, "dynamic": Dim.DYNAMIC, "static": Dim.STATIC}


# ---- writing -----------------------------------------------------------------------------------------------
def save(result, path, *, shard_bytes: int = 2**30) -> Path:
    """Write an optimize() or optimize_checkpoint() result to the folder `path`; returns it.

    `effcc.load(path)` gives back a result whose model computes the same outputs.  The weights of
    an optimize_checkpoint result are copied from its checkpoint shard by shard, never all at once."""
    program = _program_of(result)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if program.store is not None:
        write_checkpoint(program.gm, program.store, path, shard_bytes)
        keys = {name: name for name in graph_tensors(program.gm)}
    else:
        keys = tensor_keys(graph_tensors(program.gm))
        write_tensors({key: program.tensor(name) for name, key in keys.items()}, path / TENSORS)
    write_description(result, path, keys)
    return path


def _program_of(result) -> Program:
    """The Program of a result that effcc.save can write, or an error that says what to save instead."""
    program = getattr(result, "program", None)
    if isinstance(program, Program):
        return program
    kind = type(result).__name__
    if kind == "SharedPrefixModel":
        raise EffccError(
            "effcc.save cannot write a SharedPrefixModel: it holds no weights of its own (it runs your model's). "
            "Save that model (state_dict or save_pretrained) and call effcc.shared_prefix(model) again after loading it"
        )
    raise EffccError(
        f"effcc.save writes the result of effcc.optimize or optimize_checkpoint, got a {kind}; "
        "optimize the model first, or save a module with its state_dict"
    )


def write_description(result, path: Path, keys: dict[str, str]) -> None:
    """effcc.json and the example inputs, next to weights already written under the safetensors `keys`."""
    program: Program = result.program
    inputs, input_spec = flatten_inputs(program.example_args, program.example_kwargs)
    write_tensors({str(i): t for i, t in inputs.items()}, path / INPUTS)
    description = {
        "format": FORMAT,
        "version": VERSION,
        "torch": torch.__version__,
        "graph": describe_graph(program.gm),
        "tensors": {name: describe_tensor(program.gm, name, key) for name, key in keys.items()},
        "example_inputs": input_spec,
        "dynamic_shapes": encode_dynamic_shapes(program.dynamic_shapes),
        "report": result.report.to_dict() if hasattr(result.report, "to_dict") else None,
    }
    (path / DESCRIPTION).write_text(json.dumps(description, indent=1, ensure_ascii=False))


def tensor_keys(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Graph name → safetensors key: a tensor read under several names (tied weights) is stored once."""
    first_name: dict[int, str] = {}
    return {name: first_name.setdefault(id(t), name) for name, t in tensors.items()}


def describe_tensor(gm: fx.GraphModule, name: str, key: str) -> dict:
    module_path, _, leaf = name.rpartition(".")
    owner, value = gm.get_submodule(module_path), stored(gm, name)
    kind = "parameter" if leaf in owner._parameters else "buffer" if leaf in owner._buffers else "constant"
    return {"key": key, "kind": kind, "requires_grad": bool(value.requires_grad)}


def write_tensors(values: dict[str, torch.Tensor], file: Path) -> None:
    """One safetensors file; tensors that share memory (views of one another) are stored as copies."""
    seen, plain = set(), {}
    for key, value in values.items():
        value = value.detach().to("cpu").contiguous()
        if value.is_complex():
            raise EffccError(f"tensor {key} is complex ({value.dtype}); effcc.save stores real tensors only")
        storage = value.untyped_storage().data_ptr()
        plain[key] = value.clone() if storage in seen else value
        seen.add(storage)
    save_file(plain, str(file), metadata={"format": FORMAT})


def flatten_inputs(args: tuple, kwargs: dict) -> tuple[dict[int, torch.Tensor], dict]:
    """(tensors by leaf index, a JSON description: pytree spec and the leaves that are not tensors)."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    tensors = {i: leaf for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)}
    others = {}
    for i, leaf in enumerate(leaves):
        if i not in tensors:
            others[str(i)] = encode_value(leaf, f"example input {i}")
    return tensors, {"spec": pytree.treespec_dumps(spec), "values": others, "count": len(leaves)}


def describe_graph(gm: fx.GraphModule) -> dict:
    """The nodes of `gm` (and of the subgraphs its higher-order ops call), in JSON-friendly form."""
    nodes = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and not node.users and node.target == "_guards_fn":
            continue  # torch.export's input checks: the loaded program is re-exported, which makes new ones
        where = f"node {node.name!r} ({node.format_node()})"
        entry = {"name": node.name, "op": node.op}
        if node.op == "call_function":
            entry["target"] = target_name(node.target, where)
        elif node.op == "get_attr":
            value = stored(gm, node.target)
            if isinstance(value, fx.GraphModule):
                entry["subgraph"] = describe_graph(value)
            elif not isinstance(value, torch.Tensor):
                raise EffccError(f"{where} reads a {type(value).__name__}, which effcc.save cannot store")
            entry["target"] = node.target
        elif node.op in ("placeholder", "output"):
            entry["target"] = node.target
        else:
            raise EffccError(f"{where}: effcc.save stores graphs of operators; {node.op} {node.target!r} is not one")
        entry["args"] = encode_value(node.args, where)
        entry["kwargs"] = {k: encode_value(v, where) for k, v in node.kwargs.items()}
        nodes.append(entry)
    codegen = gm.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    pytree_info = None
    if info is not None:
        pytree_info = {
            "orig_args": list(info.orig_args),
            "in_spec": pytree.treespec_dumps(info.in_spec) if info.in_spec is not None else None,
            "out_spec": pytree.treespec_dumps(info.out_spec) if info.out_spec is not None else None,
        }
    return {"nodes": nodes, "pytree": pytree_info}


def target_name(target, where: str) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"{target._schema.name}.{target._overloadname}"
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"higher_order::{target.__name__}"
    name = f"{getattr(target, '__module__', '')}.{getattr(target, '__name__', '')}"
    if PYTHON_OPERATORS.get(name) is not target:
        raise EffccError(f"{where} calls {target!r}, which is not a torch operator effcc.save can name")
    return name


def encode_value(value, where: str):
    """A node argument as JSON: nodes by name, torch enums by name, tuples and floats tagged."""
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, tuple):
        return {"tuple": [encode_value(v, where) for v in value]}
    if isinstance(value, list):
        return [encode_value(v, where) for v in value]
    if isinstance(value, dict):
        return {"dict": [[encode_value(k, where), encode_value(v, where)] for k, v in value.items()]}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    if isinstance(value, slice):
        return {"slice": [encode_value(v, where) for v in (value.start, value.stop, value.step)]}
    if value is Ellipsis:
        return {"ellipsis": True}
    raise EffccError(f"{where} has an argument of type {type(value).__name__} ({value!r}), which effcc.save cannot store")


def encode_dynamic_shapes(spec):
    if spec is None or isinstance(spec, (int, str)):
        return spec
    if isinstance(spec, dict):
        return {"dict": [[k, encode_dynamic_shapes(v)] for k, v in spec.items()]}
    if isinstance(spec, (list, tuple)):
        return {type(spec).__name__: [encode_dynamic_shapes(v) for v in spec]}
    for name, hint in DIM_HINTS.items():
        if spec == hint:
            return {"dim": name}
    raise EffccError(f"dynamic shape {spec!r} cannot be saved (effcc.save knows Dim.AUTO, Dim.DYNAMIC, Dim.STATIC)")


# ---- reading -----------------------------------------------------------------------------------------------
def load(path, device="cpu"):
    """A result saved by `effcc.save`: an OptimizeResult whose model computes what the saved one did.

    Tensors are loaded onto `device`.  The graph is captured again from the saved structure, so its
    node shapes and input checks are current and it can be exported (ONNX) or rewritten further."""
    from .api import OptimizeResult
    from .report import Report

    path = Path(path)
    description = read_description(path)
    checkpoint = Checkpoint(path / TENSORS if (path / TENSORS).exists() else path)
    device = torch.device(device)
    root, by_key = nn.Module(), {}
    for name, entry in description["tensors"].items():
        if entry["key"] not in by_key:  # tied names share one tensor again
            by_key[entry["key"]] = _as_kind(checkpoint.get(entry["key"]).to(device), entry)
        attach_tensor(root, name, by_key[entry["key"]], entry["kind"])
    gm = build_graph_module(root, description["graph"], f"{path / DESCRIPTION}")
    place_device_args(gm, device)  # arange(device=...) and the like follow the weights (optimize_checkpoint traces on meta)
    args, kwargs = load_inputs(Checkpoint(path / INPUTS), description["example_inputs"], device)
    program = Program(gm, args, kwargs, decode_dynamic_shapes(description["dynamic_shapes"]))
    program.retrace()
    report = Report.from_dict(description["report"]) if description.get("report") else Report("saved model", None)
    report.notes.append(f"loaded from {path}")
    return OptimizeResult(program.gm, report, program)


def read_description(path: Path) -> dict:
    file = path / DESCRIPTION
    if not file.exists():
        raise EffccError(f"{path} is not a model saved by effcc.save: it has no {DESCRIPTION}")
    try:
        description = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise EffccError(f"{file} is not valid JSON: {error}") from None
    if description.get("format") != FORMAT:
        raise EffccError(f"{file} is not an effcc saved model (format {description.get('format')!r})")
    if description.get("version", 0) > VERSION:
        raise EffccError(f"{file} was written by a newer effcc (format version {description['version']}); upgrade effcc")
    return description


def _as_kind(value: torch.Tensor, entry: dict) -> torch.Tensor:
    if entry["kind"] == "parameter":
        return nn.Parameter(value, requires_grad=entry["requires_grad"] and value.is_floating_point())
    return value


def attach_tensor(root: nn.Module, name: str, value: torch.Tensor, kind: str) -> None:
    """Put `value` at the dotted `name` under `root`, as the parameter, buffer or constant (`kind`) it was."""
    module, leaf = _owner(root, name)
    if kind == "parameter":
        module.register_parameter(leaf, value)
    elif kind == "buffer":
        module.register_buffer(leaf, value)
    else:
        setattr(module, leaf, value)


def build_graph_module(root: nn.Module, description: dict, source: str) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for entry in description["nodes"]:
        where = f"{source}: node {entry.get('name')!r}"
        op, target = entry["op"], entry.get("target")
        # Names become Python identifiers in the code fx generates: only plain names are accepted.
        python_name(entry["name"], where)
        if op == "call_function":
            target = resolve_target(target, where)
        elif op == "get_attr":
            if "subgraph" in entry:
                owner, leaf = _owner(root, python_name(target, where, dotted=True))
                owner.add_module(leaf, build_graph_module(nn.Module(), entry["subgraph"], source))
            elif not _holds_tensor(root, python_name(target, where, dotted=True)):
                raise EffccError(f"{where}: reads {target!r}, which is not one of the saved tensors")
        elif op in ("placeholder", "output"):
            python_name(target, where)
        else:
            raise EffccError(f"{where}: a saved graph holds placeholder, get_attr, call_function and output nodes, not {op!r}")
        args = decode_value(entry["args"], env, where)
        kwargs = {python_name(k, where): decode_value(v, env, where) for k, v in entry["kwargs"].items()}
        env[entry["name"]] = graph.create_node(op, target, args, kwargs, name=entry["name"])
    info = description.get("pytree")
    if info is not None:
        graph._codegen = fx.graph._PyTreeCodeGen(
            fx.graph._PyTreeInfo(
                [python_name(a, source) for a in info["orig_args"]],
                _treespec(info["in_spec"], source) if info["in_spec"] else None,
                _treespec(info["out_spec"], source) if info["out_spec"] else None,
            )
        )
    return fx.GraphModule(root, graph)


def python_name(name, where: str, *, dotted: bool = False) -> str:
    if dotted:  # a module path: "model.layers.0.weight" (fx reads the numbered parts with getattr)
        plain = isinstance(name, str) and all(re.fullmatch(r"\w+", part, re.ASCII) for part in name.split("."))
    else:
        plain = isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name)
    if not plain:
        raise EffccError(f"{where}: {name!r} is not a plain Python name")
    return name


def resolve_target(name, where: str):
    """An operator by its saved name: only registered torch ops and the listed Python operators."""
    if name in PYTHON_OPERATORS:
        return PYTHON_OPERATORS[name]
    if not isinstance(name, str) or "::" not in name:
        raise EffccError(f"{where}: unknown operator {name!r}")
    namespace, _, rest = name.partition("::")
    if namespace == "higher_order":
        op = getattr(torch.ops.higher_order, rest, None) if rest.isidentifier() else None
        if isinstance(op, torch._ops.HigherOrderOperator):
            return op
        raise EffccError(f"{where}: unknown higher-order operator {name!r}")
    op_name, _, overload = rest.rpartition(".")
    if not all(part.isidentifier() for part in (namespace, op_name, overload)):
        raise EffccError(f"{where}: {name!r} is not an operator name")
    if namespace == "effcc":
        from . import ops  # noqa: F401 - registers effcc's operators
    try:
        op = getattr(getattr(getattr(torch.ops, namespace), op_name), overload)
    except (AttributeError, RuntimeError):
        raise EffccError(
            f"{where}: operator {name!r} is not registered in this torch {torch.__version__}; "
            "was the model saved with a library that defines it (import it first)?"
        ) from None
    if not isinstance(op, torch._ops.OpOverload):
        raise EffccError(f"{where}: {name!r} is not an operator")
    return op


def decode_value(value, env: dict[str, fx.Node], where: str):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [decode_value(v, env, where) for v in value]
    if not isinstance(value, dict) or len(value) != 1:
        raise EffccError(f"{where}: cannot read argument {value!r}")
    ((tag, content),) = value.items()
    if tag == "node":
        if content not in env:
            raise EffccError(f"{where}: refers to node {content!r} before it is defined")
        return env[content]
    if tag == "tuple":
        return tuple(decode_value(v, env, where) for v in content)
    if tag == "dict":
        return {decode_value(k, env, where): decode_value(v, env, where) for k, v in content}
    if tag == "float" and content in ("inf", "-inf", "nan"):
        return float(content)
    if tag in ("dtype", "layout", "memory_format"):
        result = getattr(torch, content, None) if isinstance(content, str) else None
        expected = {"dtype": torch.dtype, "layout": torch.layout, "memory_format": torch.memory_format}[tag]
        if isinstance(result, expected):
            return result
    if tag == "device":
        return torch.device(content)
    if tag == "slice":
        return slice(*(decode_value(v, env, where) for v in content))
    if tag == "ellipsis":
        return Ellipsis
    raise EffccError(f"{where}: cannot read argument {value!r}")


def load_inputs(checkpoint: Checkpoint, description: dict, device: torch.device) -> tuple[tuple, dict]:
    spec = _treespec(description["spec"], "the example inputs")
    leaves = []
    for i in range(description["count"]):
        if str(i) in description["values"]:
            leaves.append(decode_value(description["values"][str(i)], {}, "the example inputs"))
        else:
            leaves.append(checkpoint.get(str(i)).to(device))
    args, kwargs = pytree.tree_unflatten(leaves, spec)
    return tuple(args), dict(kwargs)


def decode_dynamic_shapes(value):
    if value is None or isinstance(value, (int, str)):
        return value
    ((tag, content),) = value.items()
    if tag == "dim":
        return DIM_HINTS[content]
    if tag == "dict":
        return {k: decode_dynamic_shapes(v) for k, v in content}
    items = [decode_dynamic_shapes(v) for v in content]
    return tuple(items) if tag == "tuple" else items


def _treespec(text: str, where: str):
    try:
        return pytree.treespec_loads(text)
    except (KeyError, NotImplementedError, ValueError, TypeError) as error:
        raise EffccError(
            f"{where}: the saved structure uses a type this session has not registered with torch's pytree ({error}); "
            "import the library that defines it (e.g. `import transformers`) before effcc.load"
        ) from None


def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(the module under `root` that holds the dotted `name`, made empty where missing; the name's last part)."""
    *path, leaf = name.split(".")
    for part in path:
        if not hasattr(root, part):
            root.add_module(part, nn.Module())
        root = getattr(root, part)
    return root, leaf


def _holds_tensor(root: nn.Module, name: str) -> bool:
    try:
        return isinstance(stored(root, name), torch.Tensor)
    except AttributeError:
        return False


__all__ = ["load", "save"]
