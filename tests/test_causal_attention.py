"""causal_attention: a causal mask tensor becomes is_causal=True, only where the mask is causal at every length checked."""

from __future__ import annotations

import pytest
import torch
from conftest import build, token_ids

import effcc

aten = torch.ops.aten


def sdpa_masks(gm) -> list:
    return [
        n.kwargs.get("attn_mask", n.args[3] if len(n.args) > 3 else None)
        for n in gm.graph.find_nodes(op="call_function", target=aten.scaled_dot_product_attention.default)
    ]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox", "opt", "qwen2", "phi"])
def test_causal_masks_become_is_causal_exactly(arch):
    model = build(arch, torch.float64)
    res = effcc.optimize(model, (token_ids(batch=2, tokens=12),), passes=["causal_attention"])
    (result,) = res.passes
    assert len(result.changed) == 2 and not result.skipped  # both layers
    assert result.comparison.max_rel <= 1e-12  # float64: the same computation
    assert sdpa_masks(res.model) == [None, None]
    assert all(
        n.kwargs.get("is_causal")
        for n in res.model.graph.find_nodes(op="call_function", target=aten.scaled_dot_product_attention.default)
    )
    longer = token_ids(batch=3, tokens=21, seed=4)  # another length: the mask was checked to be causal for it too
    torch.testing.assert_close(res.model(longer).logits, model(longer).logits, rtol=1e-12, atol=1e-12)


def mistral(window: int):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                           vocab_size=96, max_position_embeddings=64, sliding_window=window, use_cache=False)  # fmt: skip
    return MistralForCausalLM(config).eval()


@pytest.mark.parametrize(("window", "where"), [(16, "at length 17"), (8, "on the example inputs")])
def test_a_sliding_window_is_found_even_when_the_example_is_shorter(window, where):
    """A window of 16 does not show on 12 tokens: effcc also evaluates the mask just past every constant in its graph."""
    res = effcc.optimize(mistral(window), (token_ids(batch=2, tokens=12),), passes=["causal_attention"])
    (result,) = res.passes
    assert not result.changed and len(result.skipped) == 2
    assert all(f"not causal {where}" in site.detail for site in result.skipped)
    assert all(mask is not None for mask in sdpa_masks(res.model))


def test_a_padding_mask_is_left_alone():
    model = build("llama")
    ids = token_ids(batch=2, tokens=12)
    res = effcc.optimize(model, (ids,), example_kwargs={"attention_mask": torch.ones_like(ids)}, passes=["causal_attention"])
    (result,) = res.passes
    assert not result.changed and all("reads the values of input attention_mask" in s.detail for s in result.skipped)


def test_bidirectional_attention_is_left_alone():
    res = effcc.optimize(build("bert"), (token_ids(),), passes=["causal_attention"])
    assert not res.passes[0].changed and all("not causal" in s.detail for s in res.passes[0].skipped)


def test_runs_by_default_and_under_torch_compile():
    model = build("gpt2")
    ids = token_ids(batch=2, tokens=12)
    assert "causal_attention" in [p.name for p in effcc.optimize(model, (ids,)).passes]
    compiled = torch.compile(model, backend="effcc", options={"passes": ["causal_attention"]})
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
