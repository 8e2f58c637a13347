"""Residual streams: the chains of adds that carry a transformer's hidden state.

The stream is found from the graph alone: adds whose operands and result have the same
shape, linked when one add's result (through views, dropout, casts) is an operand of the
next.  In each connected group the longest chain is the stream; everything else that
feeds one of its adds is a producer (a branch output, an embedding, or a sum of branch
outputs as in GPT-NeoX's parallel blocks); everything else that reads it is a reader.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch
from torch import fx

from .graph import _same, real_users, source_of, value_of

aten = torch.ops.aten


@dataclass
class ResidualStream:
    adds: list[fx.Node]  # in order, first to last
    producers: list[fx.Node]  # where the values added into the stream come from
    readers: list[fx.Node]  # nodes that read a value of the stream (not counting the next add)

    @property
    def hidden_size(self) -> int:
        return value_of(self.adds[0]).shape[-1]

    def __str__(self) -> str:
        return f"stream of {len(self.adds)} adds, {len(self.producers)} producers, {len(self.readers)} readers"


def _is_residual_add(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target is not aten.add.Tensor or len(node.args) != 2:
        return False
    out = value_of(node)
    operands = [value_of(a) for a in node.args]
    if out is None or out.dim() < 2 or not out.is_floating_point() or any(v is None for v in operands):
        return False
    # Operands may broadcast over leading dims (a position embedding added to every batch row),
    # but each carries whole feature vectors of the stream's width.
    return all(0 < v.dim() <= out.dim() and _same(v.shape[-1], out.shape[-1]) for v in operands)


def residual_streams(graph: fx.Graph) -> list[ResidualStream]:
    adds = [n for n in graph.nodes if _is_residual_add(n)]
    links = nx.DiGraph()
    links.add_nodes_from(adds)
    candidates = set(adds)
    for add in adds:
        for _, reader in real_users(add):
            if reader in candidates:
                links.add_edge(add, reader)
    streams = []
    order = {n: i for i, n in enumerate(graph.nodes)}
    for group in nx.weakly_connected_components(links):
        if len(group) < 2:
            continue
        chain = nx.dag_longest_path(links.subgraph(group))
        # A leading add read only by the next one is a sum of branches (GPT-NeoX's
        # attn + mlp), not the stream: the stream is what the blocks' norms read.
        while len(chain) > 1 and [r for _, r in real_users(chain[0])] == [chain[1]]:
            chain.pop(0)
        on_chain = set(chain)
        producers, readers = [], []
        for i, add in enumerate(chain):
            for operand in add.args:
                origin = source_of(operand)
                if origin not in on_chain:
                    producers.append(origin)
            nxt = chain[i + 1] if i + 1 < len(chain) else None
            readers.extend(reader for _, reader in real_users(add) if reader is not nxt)
        # When the stream starts from a value that is not an add (a lone embedding), the
        # first block reads that value directly: its readers are the stream's readers too.
        for operand in chain[0].args:
            first_readers = [r for _, r in real_users(source_of(operand))]
            if len(first_readers) > 1:
                readers.extend(r for r in first_readers if r is not chain[0])
        streams.append(ResidualStream(chain, producers, sorted(set(readers), key=order.get)))
    return sorted(streams, key=lambda s: order[s.adds[0]])
