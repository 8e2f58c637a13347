"""Graph facts shared by passes: residual streams, their producers and readers, norm readers."""

import torch
from conftest import build, token_ids

from effcc.analysis import describe, linears_reading, match_norm, residual_streams
from effcc.capture import capture

aten = torch.ops.aten


def _program(arch):
    return capture(build(arch), (token_ids(),))


def test_gpt2_has_one_stream_read_by_its_layer_norms():
    (stream,) = residual_streams(_program("gpt2").graph)
    layers = 2
    assert len(stream.adds) == 1 + 2 * layers  # token+position embeddings, then attn and mlp per block
    assert stream.hidden_size == 32
    assert [r.target for r in stream.readers] == [aten.layer_norm.default] * (2 * layers + 1)
    kinds = sorted(str(p.target) for p in stream.producers)
    assert kinds.count("aten.embedding.default") == 2  # wte, wpe
    assert kinds.count("aten.addmm.default") == 2 * layers  # attn c_proj and mlp c_proj (Conv1D)


def test_parallel_residual_is_one_stream_with_summed_branches():
    (stream,) = residual_streams(_program("gpt_neox").graph)
    # x + attn(ln1 x) + mlp(ln2 x): the branch sum is a producer, not part of the stream.
    norms = [r for r in stream.readers if r.target is aten.layer_norm.default]
    assert len(norms) == 2 * 2 + 1
    assert any(p.target is aten.add.Tensor for p in stream.producers)


def test_post_ln_bert_stream_is_read_by_residual_adds_not_only_norms():
    streams = residual_streams(_program("bert").graph)
    # Post-LN: each add is normalised before the next block, so there is no long chain of adds.
    assert all(len(s.adds) < 3 for s in streams)


def test_linears_reading_each_norm():
    program = _program("llama")
    readers = {}
    for node in program.graph.nodes:
        norm = match_norm(node)
        if norm is not None:
            linears, others = linears_reading(norm.node)
            readers[describe(node).split(" ")[0]] = (sorted(describe(l.node).split(" ")[0].rsplit(".", 1)[-1] for l in linears), others)
    assert readers["model.layers.0.input_layernorm"] == (["k_proj", "q_proj", "v_proj"], [])
    assert readers["model.layers.0.post_attention_layernorm"] == (["gate_proj", "up_proj"], [])
    assert readers["model.norm"] == (["lm_head"], [])


def test_describe_names_the_module():
    program = _program("gpt2")
    ln = next(n for n in program.graph.nodes if n.target is aten.layer_norm.default)
    assert describe(ln).startswith("transformer.h.0.ln_1 (LayerNorm")
