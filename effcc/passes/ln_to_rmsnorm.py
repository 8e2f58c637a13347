"""ln_to_rmsnorm: Pre-LN → Pre-RMSNorm (Jiang et al. 2023).

LN(x) is unchanged when a constant is added to every feature of x.  In a Pre-LN
transformer every read of the residual stream goes through a LayerNorm, so the stream can
be replaced by its mean-free part: re-centre everything that writes into it (embeddings,
attention/MLP output projections, parallel branches).  Then μ(x) = 0 on the stream and
each of its LayerNorms is exactly RMSNorm with the same γ, β and ε.

Checked per residual stream before anything is changed: every reader is a LayerNorm over
the features (or the next add), and every writer can be re-centred (analysis.mean_free).
A stream that fails keeps its LayerNorms, and the report says which node stopped it.

With `trainable=True` the original weights stay the parameters and the graph re-centres
them on the fly (W − mean_rows W).  Gradients and optimizer updates then act on exactly
the parameters of the original model, so the two stay equal across optimizer steps, for
any optimizer: this is what makes the conversion exact in training, not only at one point.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import fx

from ..analysis import describe, residual_streams
from ..analysis.graph import is_input_guard, real_users, source_of, value_of
from ..analysis.mean_free import Centre, CentreInput, NormTable, NotMeanFree, plan_mean_free
from ..analysis.residual import ResidualStream
from ..program import Program
from . import register_pass
from .base import Guarantee, Pass, SiteLog

aten = torch.ops.aten


@register_pass
@dataclass
class LayerNormToRMSNorm(Pass):
    name = "ln_to_rmsnorm"
    summary = "Pre-LN → Pre-RMSNorm: re-centre what writes into the residual stream, then its LayerNorms are RMSNorms"
    guarantee = Guarantee.EXACT
    default = True
    trainable: bool = False  # keep the original weights as parameters, re-centred in the graph

    def for_training(self) -> Pass:
        return dataclasses.replace(self, trainable=True)

    def apply(self, program: Program, log: SiteLog) -> None:
        for stream, norms, plan in convertible_streams(program, log):
            centre_writers(program, plan, trainable=self.trainable)
            for norm in norms:
                to_rms_norm(program, norm)
            inputs = [a.node.target for a in plan if isinstance(a, CentreInput)]
            centred = f"; input {', '.join(inputs)} centred in the graph" if inputs else ""
            log.change(
                stream_name(stream), f"{_count(plan)} writer tensor(s) re-centred{centred}; {len(norms)} LayerNorm(s) → RMSNorm"
            )


def convertible_streams(program: Program, log: SiteLog):
    """Yield (stream, its LayerNorms, re-centring plan) for each stream that can be made mean-free.

    Streams that cannot are logged as skipped with the reason.  Once the caller has converted
    what it was given, every LayerNorm left in the graph is logged with why it was left."""
    converted: set[fx.Node] = set()
    refused: dict[fx.Node, str] = {}
    for stream in residual_streams(program.graph):
        where = stream_name(stream)
        norms = [r for r in stream.readers if r.target is aten.layer_norm.default]
        if not norms:
            log.skip(where, "no LayerNorm reads this stream (already RMSNorm, or no norm at all): nothing to do")
            continue
        try:
            plan = plan_stream(stream)
        except NotMeanFree as why:
            refused.update({norm: f"reads {where}, which stays as it is: {why}" for norm in norms})
            log.skip(where, str(why))
            continue
        yield stream, norms, plan
        converted.update(norms)
    for node in list(program.graph.nodes):
        if node.target is aten.layer_norm.default and node not in converted:
            log.skip(describe(node), refused.get(node) or why_not_on_a_stream(node))


def stream_name(stream: ResidualStream) -> str:
    first, last = (describe(n).split(" (")[0] for n in (stream.adds[0], stream.adds[-1]))
    return f"residual stream {first} … {last} ({len(stream.adds)} adds, width {stream.hidden_size})"


def plan_stream(stream: ResidualStream) -> list:
    """Check the stream's readers and writers; return the re-centrings, or raise NotMeanFree."""
    width = stream.hidden_size
    for reader in stream.readers:
        if reader.op == "output":
            raise NotMeanFree(reader, "the stream itself is an output of the model")
        if reader.target is not aten.layer_norm.default:
            raise NotMeanFree(
                reader, f"reads the stream directly ({getattr(reader.target, '__name__', reader.op)}), not through a LayerNorm"
            )
        if list(reader.args[1]) != [width]:
            raise NotMeanFree(reader, f"normalises over {list(reader.args[1])}, not the {width} features")
    on_stream = set(stream.adds)
    allowed = set(stream.readers) | on_stream
    plan = []
    for add in stream.adds:
        for operand in add.args:
            if source_of(operand) not in on_stream:
                plan += plan_mean_free(operand, add, allowed)
    return plan


def _count(plan) -> int:
    return len({(a.reader, a.attr) if isinstance(a, Centre) else a.norm for a in plan if isinstance(a, (Centre, NormTable))})


def centre_writers(program: Program, plan: list, *, trainable: bool, write=None) -> None:
    """Re-centre every writer tensor in `plan` once (`write` does it; default: by `trainable`)."""
    write = write or (centre_in_graph if trainable else centre_stored_tensor)
    done = set()
    for action in plan:
        if isinstance(action, CentreInput) and action not in done:
            done.add(action)
            centre_input(program, action)
        if not isinstance(action, (Centre, NormTable)):
            continue
        if isinstance(action, NormTable):
            table = normalise_embedding_table(program, action, trainable)
            action = Centre(action.embedding, table, 1)
        key = (action.reader, action.attr)
        if key in done:
            continue
        done.add(key)
        write(program, action)


def centre_stored_tensor(program: Program, action: Centre) -> None:
    name = program.private_tensor(action.reader, action.attr)
    tensor = program.tensor(name)
    wide = tensor.double()
    program.set_tensor(name, (wide - wide.mean(action.axis, keepdim=True)).to(tensor.dtype))


def centre_in_graph(program: Program, action: Centre) -> None:
    """reader(W) → reader(W − mean(W, axis)): the stored W stays the trained parameter."""
    graph = program.graph
    with graph.inserting_before(action.reader):
        mean = graph.call_function(aten.mean.dim, (action.attr, [action.axis], True))
        centred = graph.call_function(aten.sub.Tensor, (action.attr, mean))
    centred.meta = dict(action.attr.meta)
    action.reader.replace_input_with(action.attr, centred)


def centre_input(program: Program, action: CentreInput) -> None:
    """Every reader of the input x reads x − mean(x) instead (x starts the stream; its readers are on it)."""
    graph, x = program.graph, action.node
    readers = [user for user in x.users if not is_input_guard(user)]
    with graph.inserting_after(list(graph.find_nodes(op="placeholder"))[-1]):  # the inputs stay first
        mean = graph.call_function(aten.mean.dim, (x, [action.axis], True))
    with graph.inserting_after(mean):
        centred = graph.call_function(aten.sub.Tensor, (x, mean))
    mean.meta, centred.meta = {}, dict(x.meta)
    for reader in readers:
        reader.replace_input_with(x, centred)


def normalise_embedding_table(program: Program, action: NormTable, trainable: bool) -> fx.Node:
    """Move a LayerNorm that reads only an embedding onto the table itself; returns the new table node."""
    norm, embedding = action.norm, action.embedding
    table_attr = embedding.args[0]
    _, shape, weight, bias, eps = (list(norm.args) + [None, None, 1e-5])[:5]
    graph = program.graph
    if trainable:
        with graph.inserting_before(embedding):
            table = graph.call_function(aten.layer_norm.default, (table_attr, shape, weight, bias, eps))
        table.meta = dict(table_attr.meta)
    else:
        stored = program.tensor(table_attr.target)
        gamma, beta = (program.tensor(n.target).double() if n is not None else None for n in (weight, bias))
        normed = torch.nn.functional.layer_norm(stored.double(), list(shape), gamma, beta, eps)
        table = program.new_tensor(table_attr.target, normed.to(stored.dtype))
        table.meta = dict(table_attr.meta)
    embedding.replace_input_with(table_attr, table)
    norm.replace_all_uses_with(norm.args[0])  # its input now holds normalised rows already
    graph.erase_node(norm)
    return table


def to_rms_norm(program: Program, norm: fx.Node) -> None:
    """layer_norm(x, [d], γ, β, ε) on a mean-free x  →  rms_norm(x, [d], γ, ε) + β."""
    x, shape, weight, bias, eps = (list(norm.args) + [None, None, 1e-5])[:5]
    graph = program.graph
    with graph.inserting_before(norm):
        out = graph.call_function(aten.rms_norm.default, (x, shape, weight, eps))
        out.meta = dict(norm.meta)
        if bias is not None:
            out = graph.call_function(aten.add.Tensor, (out, bias))
            out.meta = dict(norm.meta)
    norm.replace_all_uses_with(out)
    graph.erase_node(norm)


def why_not_on_a_stream(norm: fx.Node) -> str:
    adds = [r for _, r in real_users(norm) if r.target is aten.add.Tensor]
    if adds:
        return f"Post-LN: its output is added into the residual stream ({describe(adds[0])}), so the stream is not mean-free"
    source = source_of(norm.args[0])
    if source.target is aten.add.Tensor:
        return f"Post-LN: it normalises the residual sum ({describe(source)}) instead of reading a stream that only norms read"
    val = value_of(norm)
    return f"it does not read a residual stream (a chain of adds) of width {val.shape[-1] if val is not None else '?'}"
