"""The torch.compile backend: `torch.compile(model, backend="effcc", options={"passes": [...]})`.

Found through the `torch_dynamo_backends` entry point, so it works without `import effcc`.
Dynamo hands over a torch-level graph whose parameters are placeholders.  In inference
(grad disabled, or no parameter requiring grad) they are constants: they become stored
tensors of a Program captured at ATen level with torch.export, the passes rewrite it, and
Inductor compiles the result.  Like Inductor's own freezing, the weights are read once at
compile time: after changing them in place, call torch._dynamo.reset().  Anything the
passes cannot take (training graphs, graphs that do not export) is compiled by Inductor
unchanged, with one log line saying why.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import fx, nn

from .capture import detach_from_caller, export
from .errors import EffccError
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
    training = torch.is_grad_enabled() and any(t.requires_grad for t in constants.values())
    if training:  # weights are trained: only passes that keep them as the parameters can run
        if options.get("passes") is None:
            # Measured on an H100 (README): Pre-RMSNorm in a training step is 0.98-0.99x of Inductor on
            # the original model, causal_attention 1.12x: by default a training graph gets the passes that pay.
            passes = [p for p in passes if p.pays_in_training]
            if not passes:
                log.info("effcc: training graph (grad enabled): no default pass pays off in training; compiled by Inductor")
                return compile_fx(gm, example_inputs)
        variants = {p.name: p.for_training() for p in passes}
        dropped = [name for name, variant in variants.items() if variant is None]
        if dropped:
            log.warning(
                "effcc: this graph trains its weights (grad enabled); %s rewrite weights as constants and were not applied. "
                "For inference call the model under torch.no_grad().", ", ".join(dropped),
            )
        passes = [v for v in variants.values() if v is not None]
        if not passes:
            return compile_fx(gm, example_inputs)
    try:
        program, user_inputs = program_from_dynamo_graph(gm, example_inputs, constants, keep_parameters=training)
    except _Unsupported as why:
        log.warning("effcc: %s; compiled by Inductor without effcc passes", why)
        return compile_fx(gm, example_inputs)
    summary = apply_passes(program, passes)
    if options.get("kernels", True) and any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs):
        from .backends.triton.lowering import lower_quantized_linears, lower_rms_norms

        summary += f"; {lower_rms_norms(program.gm)} norm(s) on effcc Triton kernels"
        w8a8 = lower_quantized_linears(program.gm)
        if w8a8:
            summary += f"; {w8a8} W8A8 linear(s) on effcc's int8 GEMM"
    log.info("effcc: applied %s", summary)
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    compiled = compile_fx(inductor_ready(program.gm), [_traced(placeholders[i], example_inputs[i]) for i in user_inputs])

    def run(*args):
        return compiled(*[args[i] for i in user_inputs])

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
    parts = re.findall(r"\['([^']+)'\]|\.(\w+)", source.split("L['self']", 1)[-1])
    words = [re.sub(r"\W", "_", a or b) for a, b in parts if (a or b) not in ("_modules", "_parameters", "_buffers")]
    return ".".join(words) or node.name


def program_from_dynamo_graph(gm: fx.GraphModule, example_inputs, constants: dict[fx.Node, torch.Tensor], *, keep_parameters: bool = False):
    """Turn parameter placeholders into stored tensors and capture the graph at ATen level.

    With keep_parameters the program reads the model's own Parameter objects (training:
    gradients must reach them); otherwise it gets copies it may rewrite.

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
            name = _unique(attrs, _dotted_name(node))
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
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise _Unsupported(f"graph could not be captured at ATen level ({type(error).__name__}: {first[:200]})") from error
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
