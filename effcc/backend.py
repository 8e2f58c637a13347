"""The torch.compile backend: `torch.compile(model, backend="effcc", options={"passes": [...]})`.

Found through the `torch_dynamo_backends` entry point, so it works without `import effcc`.
Dynamo hands over a torch-level graph whose parameters are placeholders.  In inference
(grad disabled, or no parameter requiring grad) they are constants: they become stored
tensors of a Program captured at ATen level with torch.export, the passes rewrite it, and
Inductor compiles the result.  Like Inductor's own freezing, the weights are read once at
compile time: after changing them in place, call torch._dynamo.reset().  Anything the
passes cannot take (training graphs, graphs that do not export) is compiled by Inductor
unchanged, with one log line saying why.  Dynamo shares a graph between modules that run
the same code (two instances of a model, or the layers of one after a graph break): a call
with other weights than those built in compiles the graph again for them.

Dynamo calls the backend once per graph: a model with graph breaks gives several, and code
between them runs eagerly, without effcc's rewrites.  Each graph gets one INFO line naming
it (Dynamo's compile id, the code and modules it covers, its input shapes) and the passes
applied; each graph break one WARNING line naming its cause and place.
"""

from __future__ import annotations

import logging
import os
import re

import torch
from torch import fx, nn

from .capture import detach_from_caller, export
from .errors import EffccError, first_line
from .passes import Pass, default_passes, make_pass
from .pipeline import apply_pass
from .program import Program

# No handler of our own: warnings reach stderr through logging's last resort, and an
# application (or pytest's caplog) that configures logging sees them as usual.
log = logging.getLogger("effcc")

KNOWN_OPTIONS = {"passes", "kernels"}


def effcc_backend(gm: fx.GraphModule, example_inputs, options: dict | None = None, mode: str | None = None):
    from torch._inductor.compile_fx import compile_fx

    options = dict(options or {})
    unknown = sorted(set(options) - KNOWN_OPTIONS)
    if unknown:
        raise EffccError(f"unknown torch.compile option(s) for backend 'effcc': {', '.join(unknown)}; known: {', '.join(sorted(KNOWN_OPTIONS))}")
    passes = default_passes() if options.get("passes") is None else [make_pass(p) for p in options["passes"]]
    if reshaping := [p.name for p in passes if p.rewrites_modules]:
        raise EffccError(
            f"{', '.join(reshaping)} changes the model's layers, which a compiled graph cannot: apply it with "
            "effcc.optimize(model, example_inputs, passes=[...]), then train or torch.compile res.model"
        )
    if not passes:
        return compile_fx(gm, example_inputs)

    constants = _parameter_placeholders(gm)
    graph = _graph_label(gm, example_inputs, constants)
    _report_graph_break(gm)
    training = torch.is_grad_enabled() and any(t.requires_grad for t in constants.values())
    if training:  # weights are trained: only passes that keep them as the parameters can run
        if options.get("passes") is None:
            # Measured on an H100 (README): Pre-RMSNorm in a training step is 0.98-0.99x of Inductor on
            # the original model, causal_attention 1.12x: by default a training graph gets the passes that pay.
            passes = [p for p in passes if p.pays_in_training]
            if not passes:
                log.info("effcc: %s trains (grad enabled): no default pass pays off in training; compiled by Inductor", graph)
                return compile_fx(gm, example_inputs)
        variants = {p.name: p.for_training() for p in passes}
        dropped = [name for name, variant in variants.items() if variant is None]
        if dropped:
            log.warning(
                "effcc: %s trains its weights (grad enabled); %s rewrite weights as constants and were not applied. "
                "For inference call the model under torch.no_grad().", graph, ", ".join(dropped),
            )
        passes = [v for v in variants.values() if v is not None]
        if not passes:
            return compile_fx(gm, example_inputs)
    names = {node: _dotted_name(node) for node in constants}  # read now: Dynamo drops their sources after this call

    def compile_for(examples, weights):
        return _compile_with_passes(gm, examples, weights, names, passes, training=training, kernels=options.get("kernels", True), graph=graph)

    try:
        first = compile_for(example_inputs, constants)
    except _Unsupported as why:
        log.warning("effcc: %s: %s; compiled by Inductor without effcc passes", graph, why)
        return compile_fx(gm, example_inputs)
    return _once_per_weight_set(gm, example_inputs, constants, first, compile_for, graph)


def _compile_with_passes(
    gm: fx.GraphModule, example_inputs, weights: dict[fx.Node, torch.Tensor], names: dict[fx.Node, str], passes: list[Pass], *,
    training: bool, kernels: bool, graph: str,
):
    """The graph with `weights` built in, rewritten by the passes and compiled by Inductor: a callable on Dynamo's inputs."""
    from torch._inductor.compile_fx import compile_fx

    program, user_inputs = program_from_dynamo_graph(gm, example_inputs, weights, keep_parameters=training, names=names)
    summary = apply_passes(program, passes)
    if kernels and any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs):
        from .backends.triton.lowering import lower_quantized_linears, lower_rms_norms

        summary += f"; {lower_rms_norms(program.gm)} norm(s) on effcc Triton kernels"
        w8a8 = lower_quantized_linears(program.gm)
        if w8a8:
            summary += f"; {w8a8} W8A8 linear(s) on effcc's int8 GEMM"
    log.info("effcc: %s: applied %s", graph, summary)
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    compiled = compile_fx(inductor_ready(program.gm), [_traced(placeholders[i], example_inputs[i]) for i in user_inputs])

    def run(*args):
        return compiled(*[args[i] for i in user_inputs])

    return run


def _once_per_weight_set(gm: fx.GraphModule, example_inputs, weights: dict[fx.Node, torch.Tensor], first, compile_for, graph: str):
    """The compiled graph for each set of weights Dynamo calls it with.

    Dynamo shares a graph between modules that run the same code: another instance of the
    model, or every layer when a graph break makes a layer's forward a frame of its own.  Its
    guards do not look at which weights come in, and effcc builds them into the compiled graph,
    so a call with other weights compiles the graph again for those (once per set)."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    positions = [placeholders.index(node) for node in weights]
    # A later compile needs the inputs' traced (fake) values, not the first call's tensors: do not hold those.
    examples = [_traced(node, value) for node, value in zip(placeholders, example_inputs, strict=True)]
    # Each entry keeps its weights alive, so that their ids are not reused by other tensors.
    compiled = {tuple(id(w) for w in weights.values()): (list(weights.values()), first)}

    def run(*args):
        key = tuple(id(args[i]) for i in positions)
        if key not in compiled:
            log.info("effcc: %s is called with other weights (another layer or model running the same code): compiling it for them", graph)
            other = {node: args[i] for node, i in zip(weights, positions, strict=True)}
            compiled[key] = (list(other.values()), compile_for(examples, other))
        return compiled[key][1](*args)

    return run


class _Unsupported(Exception):
    pass


def _parameter_placeholders(gm: fx.GraphModule) -> dict[fx.Node, torch.Tensor]:
    """Placeholders that Dynamo bound to the model's parameters and buffers, with their real values."""
    found = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        arg = node.meta.get("grapharg")
        source = getattr(getattr(arg, "source", None), "name", "")
        source = source() if callable(source) else source
        example = getattr(arg, "example", None)
        if isinstance(example, torch.Tensor) and ("._parameters[" in source or "._buffers[" in source or isinstance(example, nn.Parameter)):
            found[node] = example
    return found


def _dotted_name(node: fx.Node) -> str:
    """L['self']._modules['h']._modules['0']._parameters['weight'] → h.0.weight, the model's own name."""
    source = node.meta["grapharg"].source.name
    source = source() if callable(source) else source
    return _path_in_model(source) or node.name


def _path_in_model(source: str) -> str:
    """A Dynamo source (L['self']._modules['h']._modules['0'], L['args'][0].h[0], or through a module's
    __dict__ as Swin's blocks are read) as the model's dotted name, h.0."""
    inside = re.sub(r"^L\['self'\]|^L\['args'\]\[0\]", "", source)  # the model itself: as a method's self, or as the first argument
    parts = re.findall(r"\['([^']+)'\]|\[(\d+)\]|\.(\w+)", inside)
    words = ["".join(part) for part in parts]  # one of the three groups matched
    return ".".join(re.sub(r"\W", "_", word) for word in words if word not in ("_modules", "_parameters", "_buffers", "__dict__"))


def _graph_label(gm: fx.GraphModule, example_inputs, constants: dict[fx.Node, torch.Tensor]) -> str:
    """Which of Dynamo's graphs this is, in a user's terms: `graph 1/0 (forward resumed at
    modeling_gpt2.py:683; 2 ops in lm_head; input 2×8×32)`.  Parts this torch does not
    expose are left out."""
    described = []
    code = _traced_code() if _compile_id(gm) is not None else None
    if code is not None:
        resumed = re.fullmatch(r"torch_dynamo_resume_in_(\w+)_at_(\d+)", code.co_name)
        file = os.path.basename(code.co_filename)
        described.append(f"{resumed[1]} resumed at {file}:{resumed[2]}" if resumed else f"{code.co_name} at {file}:{code.co_firstlineno}")
    modules = _module_span(gm)
    described.append(f"{_op_count(gm)} ops" + (f" in {modules}" if modules else ""))
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    # Sizes as Dynamo traced them: s0, s1 for the dimensions it made dynamic
    shapes = [
        "×".join(str(size) for size in _traced(node, value).shape) or "scalar"
        for node, value in zip(placeholders, example_inputs, strict=False)
        if node not in constants and isinstance(value, torch.Tensor)
    ]
    if shapes:
        described.append(f"input{'s' if len(shapes) > 1 else ''} {', '.join(shapes[:3])}{', …' if len(shapes) > 3 else ''}")
    return f"{_graph_name(gm)} ({'; '.join(described)})"


def _graph_name(gm: fx.GraphModule) -> str:
    """`graph 1/0`: Dynamo's compile id (frame/compile of that frame), as TORCH_LOGS prints it."""
    compile_id = _compile_id(gm)
    return "graph" if compile_id is None else f"graph {compile_id}"


def _compile_id(gm: fx.GraphModule):
    """Dynamo's id of this compile, frame/attempt (`1/0`), or None outside Dynamo."""
    compile_id = gm.meta.get("dynamo_compile_id")
    if compile_id is None:
        try:
            compile_id = torch._guards.CompileContext.current_compile_id()
        except AttributeError:  # an internal API, missing in this torch: a label without the id is fine
            return None
    return compile_id


def _traced_code():
    """The code object Dynamo is tracing (a model's forward, or a resume function after a graph break)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        return InstructionTranslator.current_tx().f_code
    except (ImportError, AttributeError):  # an internal API, moved in this torch: a label without the code is fine
        return None


_OPS = ("call_function", "call_method", "call_module")


def _op_count(gm: fx.GraphModule) -> int:
    return sum(node.op in _OPS for node in gm.graph.nodes)


def _module_span(gm: fx.GraphModule) -> str:
    """The modules of the graph's first and last op (`transformer.wte … lm_head`), from Dynamo's nn_module_stack."""
    paths = [
        _path_in_model(str(list(stack.values())[-1][0]))  # innermost module: (its source, its class)
        for node in gm.graph.nodes
        if node.op in _OPS and (stack := node.meta.get("nn_module_stack"))
    ]
    paths = [path for path in paths if path]
    if not paths:
        return ""
    return paths[0] if paths[0] == paths[-1] else f"{paths[0]} … {paths[-1]}"


def _report_graph_break(gm: fx.GraphModule) -> None:
    """One line for a graph that Dynamo ended at a graph break: the break's cause and place.

    A warning the first time; a recompile (new input shapes) meets the same break again and
    repeats it at INFO."""
    reason = getattr(gm, "compile_subgraph_reason", None)
    if not getattr(reason, "graph_break", False):
        return
    log.log(
        logging.INFO if _warned_before(reason) else logging.WARNING,
        "effcc: graph break%s: %s. %s ends there; code up to the next graph runs eagerly, without effcc's rewrites. "
        "To list every break: torch._dynamo.explain(model)(*inputs), or TORCH_LOGS=graph_breaks",
        _break_place(reason), _break_cause(reason), _graph_name(gm),
    )


def _break_place(reason) -> str:
    """` at file.py:12 in forward (`code`)`: the innermost frame, the statement Dynamo could not trace (in the model or a hook)."""
    stack = getattr(reason, "user_stack", None)
    if not stack:
        return ""
    frame = stack[-1]
    code = (frame.line or "").strip()
    code = f" (`{code[:77] + '...' if len(code) > 80 else code}`)" if code else ""
    return f" at {os.path.basename(frame.filename)}:{frame.lineno} in {frame.name}{code}"


def _break_cause(reason) -> str:
    """Dynamo's reason in one line: its first, the kind of break (explanation and hints follow in TORCH_LOGS)."""
    first = first_line(str(getattr(reason, "reason", "")), limit=10_000) or "cause not given"
    if first.startswith("generic_jump"):  # Dynamo's name for a Python branch on a tensor's value
        return f"data-dependent branching, a Python branch on a tensor's value ({first})"
    return first


# The breaks effcc warned about, each with the reason Dynamo recorded: torch._dynamo.reset()
# clears Dynamo's record, and a break met again after that is news again.
_warned: dict[tuple[str, str], object] = {}


def _warned_before(reason) -> bool:
    try:
        from torch._dynamo.output_graph import graph_break_reasons
    except ImportError:  # an internal list, gone from this torch: warn once per process
        graph_break_reasons = None
    key = (_break_place(reason), _break_cause(reason))
    earlier = _warned.get(key)
    if earlier is not None and (graph_break_reasons is None or any(r is earlier for r in graph_break_reasons)):
        return True
    _warned[key] = reason
    return False


def program_from_dynamo_graph(
    gm: fx.GraphModule, example_inputs, constants: dict[fx.Node, torch.Tensor], *, keep_parameters: bool = False,
    names: dict[fx.Node, str] | None = None,
):
    """Turn parameter placeholders into stored tensors and capture the graph at ATen level.

    With keep_parameters the program reads the model's own Parameter objects (training:
    gradients must reach them); otherwise it gets copies it may rewrite.  `names` are the
    weights' dotted names, for a graph Dynamo has finished with (it then drops the sources
    they are read from).

    Sizes Dynamo passes as inputs (dynamic shapes) are recomputed from the tensor they
    measure, so the program takes tensors only.  Returns the Program and the positions
    of the inputs it still takes."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    tensors = [i for i, node in enumerate(placeholders) if node not in constants and isinstance(example_inputs[i], torch.Tensor)]
    # What the new module holds: the graph's own attributes (subgraphs of higher-order ops),
    # then every weight under the model's dotted name.
    attrs = {n.target: _fetch(gm, n.target) for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    graph = fx.Graph()
    env = {}
    for i, node in enumerate(placeholders):  # tensor inputs first, in order
        if i in tensors:
            env[node] = graph.node_copy(node, lambda n: env[n])
    for node in gm.graph.nodes:
        if node in env:
            continue
        if node in constants:
            name = _unique(attrs, names[node] if names else _dotted_name(node))
            attrs[name] = constants[node] if keep_parameters else constants[node].detach()
            env[node] = graph.get_attr(name)
        elif node.op == "placeholder":
            env[node] = _size_of_an_input(graph, example_inputs[placeholders.index(node)], [(env[placeholders[i]], _traced(placeholders[i], example_inputs[i])) for i in tensors])
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    holder = fx.GraphModule(attrs, graph)  # builds the submodule tree the dotted names need
    args = tuple(_real_like(example_inputs[i]) for i in tensors)
    dynamic = tuple(_dynamic_dims(_traced(placeholders[i], example_inputs[i])) for i in tensors)
    try:
        ep = export(holder, args, dynamic_shapes=dynamic if any(dynamic) else None)
    except Exception as error:  # noqa: BLE001
        raise _Unsupported(f"graph could not be captured at ATen level ({type(error).__name__}: {first_line(error, 200)})") from error
    program_gm = ep.module()
    if not keep_parameters:
        detach_from_caller(program_gm)
    return Program(program_gm, args, {}, dynamic if any(dynamic) else None), tensors


def _traced(node: fx.Node, example):
    """The fake value Dynamo traced a placeholder with (symbolic sizes where it made them dynamic)."""
    value = node.meta.get("example_value")
    return value if isinstance(value, torch.Tensor) else example


def _size_of_an_input(graph: fx.Graph, size, inputs) -> fx.Node:
    """A node computing the symbolic `size` from the tensor input that has it as a dimension."""
    if isinstance(size, torch.SymInt):
        for node, fake in inputs:
            for dim, s in enumerate(fake.shape):
                if isinstance(s, torch.SymInt) and s.node.expr == size.node.expr:
                    return graph.call_function(torch.ops.aten.sym_size.int, (node, dim))
    raise _Unsupported(f"graph takes an input ({size!r}) that is not a tensor nor the size of one")


def _fetch(module: nn.Module, target: str):
    for part in target.split("."):
        module = getattr(module, part)
    return module


def _unique(taken: dict, name: str) -> str:
    candidate, i = name, 1
    while candidate in taken or any(key.startswith(candidate + ".") or candidate.startswith(key + ".") for key in taken):
        candidate, i = f"{name}_{i}", i + 1
    return candidate


def _real_like(fake):
    """A real tensor of the fake input's size (hints for symbolic sizes), for tracing only."""
    shape = [int(s.node.hint) if isinstance(s, torch.SymInt) else int(s) for s in fake.shape]
    if fake.is_floating_point():
        return torch.randn(shape, dtype=fake.dtype, device=fake.device)
    return torch.zeros(shape, dtype=fake.dtype, device=fake.device)


def _dynamic_dims(fake):
    dims = {i: torch.export.Dim.DYNAMIC for i, s in enumerate(fake.shape) if isinstance(s, torch.SymInt)}
    return dims or None


def apply_passes(program: Program, passes: list[Pass]) -> str:
    parts = []
    for p in passes:
        sites = apply_pass(program, p)
        parts.append(f"{p.name}: {len(sites.changed)} changed, {len(sites.skipped)} skipped")
        for site in sites.skipped:
            log.info("effcc: %s skipped %s: %s", p.name, site.where, site.detail)
    return "; ".join(parts)


def inductor_ready(gm: fx.GraphModule) -> fx.GraphModule:
    """Flat inputs and a flat tuple of outputs, without export's input guards (Dynamo guards instead)."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and not node.users:
            gm.graph.erase_node(node)
    gm.graph._codegen = fx.graph.CodeGen()
    # A plain GraphModule: the exported one carries state Inductor's cache cannot pickle.
    return fx.GraphModule(gm, gm.graph)
