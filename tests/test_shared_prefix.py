"""effcc.shared_prefix: grouped runs equal the ungrouped batch, in logits and in every gradient.

Reference: the caller's model on each full sequence cat(prefix, suffix_g) (positions
0…P+S−1, nothing shared), loss on suffix tokens only, as in GRPO.  float64 runs the op's
PyTorch reference; float32 runs the Triton kernel (its interpreter on the CPU).
"""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, build
from torch import nn
from torch.nn import functional as F

import effcc
from effcc.passes.shared_prefix import SharedPrefixError

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}  # relative: max|Δ| / max|reference|
ARCHITECTURES = ["gpt2", "llama", "qwen2", "gpt_neox"]


def ragged_group(prefix_len=7, lengths=(5, 3, 1, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(2, VOCAB, (prefix_len,), generator=g)
    suffix = torch.randint(2, VOCAB, (len(lengths), max(lengths)), generator=g)
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    return prefix, suffix, mask


def ungrouped_logprobs(model, prefix, suffix, mask):
    """log p of every real suffix token, one full sequence at a time (the thing being replaced)."""
    rows = []
    for row, valid in zip(suffix, mask):
        sequence = torch.cat([prefix, row[valid]])
        logits = model(sequence[None]).logits[0] if hasattr(model, "config") else model(sequence[None])[0]
        predicting = logits[prefix.numel() - 1 : -1]
        logprob = torch.log_softmax(predicting.float() if predicting.dtype != torch.float64 else predicting, -1)
        full = logprob.new_zeros(suffix.shape[1])
        full[: int(valid.sum())] = logprob.gather(-1, row[valid][:, None]).squeeze(-1)
        rows.append(full)
    return torch.stack(rows)


def ungrouped_logits(model, prefix, suffix, mask):
    out = []
    for row, valid in zip(suffix, mask):
        logits = model(torch.cat([prefix, row[valid]])[None]).logits[0, prefix.numel():]
        padded = logits.new_zeros(suffix.shape[1], logits.shape[-1])
        padded[: logits.shape[0]] = logits
        out.append(padded)
    return torch.stack(out)


def relative_error(a, b):
    return float((a - b).abs().max().detach() / b.abs().max().detach())


def grads_of(model, loss):
    model.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def weights(mask, seed=3):
    """Per-token loss weights (GRPO's advantages), zero at padding."""
    return torch.randn(mask.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * mask


def _rms_norm(self, hidden):
    return self.weight * (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def _gemma_rms_norm(self, hidden):
    return hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)


NORMS_THAT_ROUND_TO_FLOAT32 = {  # module: class → the same formula in the input's dtype
    "transformers.models.llama.modeling_llama": ("LlamaRMSNorm", _rms_norm),
    "transformers.models.qwen2.modeling_qwen2": ("Qwen2RMSNorm", _rms_norm),
    "transformers.models.qwen3.modeling_qwen3": ("Qwen3RMSNorm", _rms_norm),
    "transformers.models.gemma.modeling_gemma": ("GemmaRMSNorm", _gemma_rms_norm),
}


def rms_norm_in_float64(monkeypatch):
    """Hugging Face's LLaMA-family norms round to float32 even in a float64 model, so their float64
    gradients (summed over the group in one order, per sequence in the other) differ at 1e-7 from
    that rounding alone.  To test the rewrite at float64 precision, the norms compute the same
    formula in the model's dtype."""
    import importlib

    for module, (name, forward) in NORMS_THAT_ROUND_TO_FLOAT32.items():
        monkeypatch.setattr(getattr(importlib.import_module(module), name), "forward", forward)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_logits_and_gradients_equal_the_ungrouped_batch(arch, dtype, monkeypatch):
    if dtype == torch.float64:
        rms_norm_in_float64(monkeypatch)
    model = build(arch, dtype)
    grouped = effcc.shared_prefix(model)
    prefix, suffix, mask = ragged_group()
    tol = TOLERANCE[dtype]

    logits = grouped(prefix, suffix, mask)
    reference = ungrouped_logits(model, prefix, suffix, mask)
    assert logits.shape == (4, 5, VOCAB)
    assert relative_error(logits * mask[..., None], reference) <= tol
    assert bool((logits[~mask] == 0).all())

    w = weights(mask)
    grouped_grads = grads_of(model, (grouped.token_logprobs(prefix, suffix, mask).double() * w).sum())
    reference_grads = grads_of(model, (ungrouped_logprobs(model, prefix, suffix, mask).double() * w).sum())
    assert grouped_grads.keys() == reference_grads.keys() and len(reference_grads) == len(list(model.parameters()))
    for name, reference_grad in reference_grads.items():
        assert relative_error(grouped_grads[name], reference_grad) <= tol, name


def _more_architectures():
    """One-layer configs of decoders that differ in what the graph rewrite must get right: q/k norms
    (Qwen3), a scaled embedding (Gemma), partial rotary and parallel attention + MLP (Phi), interleaved
    rotary (GPT-J), multi-query parallel blocks (Falcon), learned positions read from a mask's cumsum
    (OPT).  (Cohere works too, but rounds its rotary embedding through float32: no float64 reference.)"""
    import transformers as hf

    llama_like = dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0, use_cache=False)
    return {
        "qwen3": lambda: hf.Qwen3ForCausalLM(hf.Qwen3Config(**llama_like, head_dim=8)),
        "gemma": lambda: hf.GemmaForCausalLM(hf.GemmaConfig(**llama_like, head_dim=8)),
        "phi": lambda: hf.PhiForCausalLM(hf.PhiConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                                      vocab_size=VOCAB, use_cache=False)),
        "gptj": lambda: hf.GPTJForCausalLM(hf.GPTJConfig(n_layer=1, n_embd=32, n_head=4, rotary_dim=4, vocab_size=VOCAB, n_positions=64,
                                                         bos_token_id=0, eos_token_id=0, use_cache=False)),
        "falcon": lambda: hf.FalconForCausalLM(hf.FalconConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB,
                                                               new_decoder_architecture=False, multi_query=True, use_cache=False)),
        "opt": lambda: hf.OPTForCausalLM(hf.OPTConfig(num_hidden_layers=1, hidden_size=32, ffn_dim=64, num_attention_heads=4, vocab_size=VOCAB,
                                                      max_position_embeddings=64, word_embed_proj_dim=32, bos_token_id=0, eos_token_id=0,
                                                      pad_token_id=1, use_cache=False)),
    }


@pytest.mark.parametrize("arch", ["qwen3", "gemma", "phi", "gptj", "falcon", "opt"])
def test_more_architectures_through_the_graph(arch, monkeypatch):
    """No per-model code: each works from its captured graph; float64, norms in float64 (see rms_norm_in_float64)."""
    rms_norm_in_float64(monkeypatch)
    torch.manual_seed(0)
    model = _more_architectures()[arch]().double().eval()
    if not getattr(model, "_supports_sdpa", True):  # GPT-J in transformers 5.17 (not 5.25): attention by hand, refused with the reason
        with pytest.raises(SharedPrefixError, match="no scaled_dot_product_attention"):
            effcc.shared_prefix(model)
        return
    grouped = effcc.shared_prefix(model)
    prefix, suffix, mask = ragged_group()
    tol = TOLERANCE[torch.float64]
    assert relative_error(grouped(prefix, suffix, mask) * mask[..., None], ungrouped_logits(model, prefix, suffix, mask)) <= tol
    w = weights(mask)
    grouped_grads = grads_of(model, (grouped.token_logprobs(prefix, suffix, mask) * w).sum())
    reference_grads = grads_of(model, (ungrouped_logprobs(model, prefix, suffix, mask) * w).sum())
    assert grouped_grads.keys() == reference_grads.keys() and len(reference_grads) == len(list(model.parameters()))
    # A key bias has an exactly-zero gradient (a shift shared by all of a row's scores leaves the softmax
    # alone): both sides are then rounding noise, so each error is taken against at least 1e-6 of the
    # model's largest gradient.
    floor = 1e-6 * max(float(g.abs().max()) for g in reference_grads.values())
    for name, reference_grad in reference_grads.items():
        error = float((grouped_grads[name] - reference_grad).abs().max()) / max(float(reference_grad.abs().max()), floor)
        assert error <= tol, name


def test_several_groups_with_different_prefix_lengths(monkeypatch):
    rms_norm_in_float64(monkeypatch)
    model = build("llama", torch.float64)
    grouped = effcc.shared_prefix(model)
    groups = [ragged_group(7, (5, 3), seed=1), ragged_group(3, (2, 6, 6), seed=2), ragged_group(1, (4,), seed=3)]
    prefixes, suffixes, masks = zip(*groups)
    results = grouped(list(prefixes), list(suffixes), list(masks))
    logprobs = grouped.token_logprobs(list(prefixes), list(suffixes), list(masks))
    for (prefix, suffix, mask), logits, lp in zip(groups, results, logprobs):
        assert relative_error(logits * mask[..., None], ungrouped_logits(model, prefix, suffix, mask)) <= 1e-10
        assert relative_error(lp, ungrouped_logprobs(model, prefix, suffix, mask)) <= 1e-10


def test_a_batch_packed_once_serves_every_call(monkeypatch):
    """grouped.pack(...) then forward(batch) / token_logprobs(batch): the same results as from the ids."""
    rms_norm_in_float64(monkeypatch)
    model = build("llama", torch.float64)
    grouped = effcc.shared_prefix(model)
    groups = [ragged_group(7, (5, 3), seed=1), ragged_group(3, (2, 6, 6), seed=2)]
    prefixes, suffixes, masks = (list(x) for x in zip(*groups))
    batch = grouped.pack(prefixes, suffixes, masks)
    for got, want in zip(grouped.token_logprobs(batch), grouped.token_logprobs(prefixes, suffixes, masks)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for (prefix, suffix, mask), logits in zip(groups, grouped(batch)):
        assert relative_error(logits * mask[..., None], ungrouped_logits(model, prefix, suffix, mask)) <= 1e-10
    prefix, suffix, mask = groups[0]
    single = grouped.pack(prefix, suffix, mask)
    assert relative_error(grouped.token_logprobs(single), ungrouped_logprobs(model, prefix, suffix, mask)) <= 1e-10
    with pytest.raises(ValueError, match="packed batch, give nothing else"):
        grouped.token_logprobs(single, suffix)


def test_weights_are_shared_and_the_callers_model_is_unchanged():
    model = build("gpt2", torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grouped = effcc.shared_prefix(model)
    named = dict(model.named_parameters(remove_duplicate=False))
    grouped_parameters = list(grouped.named_parameters())
    assert {id(p) for _, p in grouped_parameters} == {id(p) for p in model.parameters()}
    for name, p in grouped_parameters:
        assert p is named[name.removeprefix("graph_module.")]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # an optimizer on the caller's model trains the grouped model too
    prefix, suffix, mask = ragged_group()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    first = grouped.token_logprobs(prefix, suffix, mask)
    (-first.sum()).backward()
    optimizer.step()
    second = grouped.token_logprobs(prefix, suffix, mask)
    assert second.sum() > first.sum()
    assert relative_error(second, ungrouped_logprobs(model, prefix, suffix, mask)) <= 1e-10


def test_eager_attention_models_are_captured_with_sdpa_and_left_as_they_were():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=VOCAB, use_cache=False, attn_implementation="eager")
    model = LlamaForCausalLM(config).double().eval()
    grouped = effcc.shared_prefix(model)
    assert model.config._attn_implementation == "eager"
    prefix, suffix, mask = ragged_group()
    # HF's eager attention takes its softmax in float32 even in a float64 model; SDPA does not
    assert relative_error(grouped(prefix, suffix, mask) * mask[..., None], ungrouped_logits(model, prefix, suffix, mask)) <= 1e-6


# ---- a plain decoder: no Hugging Face, positions made inside with arange -----------------------
class TinyDecoder(nn.Module):
    def __init__(self, vocab=VOCAB, d=32, heads=4, layers=2, context=64, attention_dropout=0.0):
        super().__init__()
        self.heads, self.attention_dropout = heads, attention_dropout
        self.tokens, self.positions = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm1": nn.LayerNorm(d), "qkv": nn.Linear(d, 3 * d), "out": nn.Linear(d, d), "norm2": nn.LayerNorm(d),
                           "mlp": nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))})
            for _ in range(layers)
        )
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        b, t = idx.shape
        x = self.tokens(idx) + self.positions(torch.arange(t, device=idx.device))
        for block in self.blocks:
            q, k, v = block["qkv"](block["norm1"](x)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.attention_dropout)
            x = x + block["out"](attended.transpose(1, 2).reshape(b, t, -1))
            x = x + block["mlp"](block["norm2"](x))
        return self.head(self.norm(x))


def test_plain_decoder_with_positions_from_arange():
    torch.manual_seed(0)
    model = TinyDecoder().double().eval()
    grouped = effcc.shared_prefix(model)
    prefix, suffix, mask = ragged_group()
    reference = torch.stack([
        F.pad(model(torch.cat([prefix, row[valid]])[None])[0, prefix.numel():], (0, 0, 0, int((~valid).sum())))
        for row, valid in zip(suffix, mask)
    ])
    assert relative_error(grouped(prefix, suffix, mask) * mask[..., None], reference) <= 1e-10
    assert any("arange" in note for note in grouped.notes)


# ---- refusals: each names the attention and the reason -----------------------------------------
def test_bidirectional_attention_is_refused():
    with pytest.raises(SharedPrefixError, match="bidirectional|not the causal mask|token values"):
        grouped = effcc.shared_prefix(build("bert", torch.float64))
        grouped(*ragged_group()[:2])


def test_attention_written_out_by_hand_is_refused():
    # BLOOM adds its ALiBi bias with baddbmm and a softmax, and transformers has no SDPA form of it
    model = build("bloom", torch.float64)
    with pytest.raises(SharedPrefixError, match="BloomForCausalLM has no scaled_dot_product_attention form"):
        effcc.shared_prefix(model)
    assert model.config._attn_implementation == "eager"  # left as it was

    class HandWrittenDecoder(nn.Module):  # not a Hugging Face model: found out from the captured graph
        def __init__(self):
            super().__init__()
            self.embed, self.qkv, self.head = nn.Embedding(VOCAB, 16), nn.Linear(16, 48), nn.Linear(16, VOCAB)

        def forward(self, input_ids):
            q, k, v = self.qkv(self.embed(input_ids)).chunk(3, dim=-1)
            n = input_ids.shape[1]
            scores = (q @ k.transpose(1, 2)).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            return self.head(scores.softmax(-1) @ v)

    with pytest.raises(SharedPrefixError, match="no scaled_dot_product_attention in the captured graph.*written out by hand"):
        effcc.shared_prefix(HandWrittenDecoder().eval())


def test_a_model_without_an_sdpa_form_is_refused_with_the_reason():
    from transformers import Gemma2Config, Gemma2ForCausalLM  # soft-capped attention scores: eager attention only

    model = Gemma2ForCausalLM(Gemma2Config(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                                           head_dim=8, vocab_size=VOCAB, use_cache=False)).eval()
    before = model.config._attn_implementation
    with pytest.raises(SharedPrefixError, match="Gemma2ForCausalLM has no scaled_dot_product_attention form"):
        effcc.shared_prefix(model)
    assert model.config._attn_implementation == before  # left as it was


def test_an_attention_bias_is_refused():
    class BiasedDecoder(TinyDecoder):
        def forward(self, idx):  # a learned-free additive bias of distance, like ALiBi, given to SDPA
            b, t = idx.shape
            x = self.tokens(idx) + self.positions(torch.arange(t, device=idx.device))
            distance = torch.arange(t)[None, :] - torch.arange(t)[:, None]
            bias = torch.where(distance <= 0, 0.1 * distance.to(x.dtype), float("-inf"))
            q, k, v = self.blocks[0]["qkv"](x).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            return self.head(self.blocks[0]["out"](F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(b, t, -1)))

    torch.manual_seed(0)
    grouped = effcc.shared_prefix(BiasedDecoder().double().eval())
    with pytest.raises(SharedPrefixError, match="not the causal mask"):
        grouped(*ragged_group())


def test_a_sliding_window_shorter_than_the_sequence_is_refused_when_it_matters():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                                             vocab_size=VOCAB, sliding_window=6, use_cache=False)).double().eval()
    grouped = effcc.shared_prefix(model)
    short = ragged_group(prefix_len=3, lengths=(2, 3))  # longest sequence 6: inside the window, exact
    assert relative_error(grouped(*short) * short[2][..., None], ungrouped_logits(model, *short)) <= 1e-10
    with pytest.raises(SharedPrefixError, match="not the causal mask"):
        grouped(*ragged_group())  # longest sequence 12: the window cuts the prefix


def test_attention_dropout_is_refused():
    with pytest.raises(SharedPrefixError, match="dropout"):
        effcc.shared_prefix(TinyDecoder(attention_dropout=0.1))


def test_bad_inputs_get_clear_errors():
    grouped = effcc.shared_prefix(build("gpt2", torch.float64))
    prefix, suffix, mask = ragged_group()
    with pytest.raises(ValueError, match="right-padded"):
        grouped(prefix, suffix, mask.flip(1))
    with pytest.raises(ValueError, match="prefix_ids must be a non-empty 1-D"):
        grouped(prefix[None], suffix, mask)
    with pytest.raises(ValueError, match="suffix_mask must be a bool tensor"):
        grouped(prefix, suffix, mask[:, :2])


def test_compiled_grouped_model_runs_new_group_shapes_without_recompiling():
    model = build("llama", torch.float32)
    grouped = effcc.shared_prefix(model).compile()
    for seed, (prefix_len, lengths) in enumerate([(7, (5, 3, 1, 4)), (9, (2, 6))]):
        prefix, suffix, mask = ragged_group(prefix_len, lengths, seed)
        logprobs = grouped.token_logprobs(prefix, suffix, mask)
        assert relative_error(logprobs, ungrouped_logprobs(model, prefix, suffix, mask)) <= 1e-5
        logprobs.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


class CountingBackend:
    """A torch.compile backend that runs the graphs as traced and counts them."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        self.graphs += 1
        as_traced = lambda graph, _: make_boxed_func(graph)  # noqa: E731
        return aot_autograd(fw_compiler=as_traced, bw_compiler=as_traced)(gm, example_inputs)


def test_compiling_by_block_compiles_one_layer_for_all_alike():
    """Four alike layers: one compiled block graph serves them all (plus the parts before and after); same
    log-probs and gradients as the grouped model run eagerly."""
    model = build("llama", torch.float32, layers=4)
    eager = effcc.shared_prefix(model)
    backend = CountingBackend()
    compiled = effcc.shared_prefix(model).compile(backend=backend)
    prefix, suffix, mask = ragged_group()
    want = eager.token_logprobs(prefix, suffix, mask)
    want_grads = grads_of(model, (want * weights(mask).float()).sum())
    got = compiled.token_logprobs(prefix, suffix, mask)
    got_grads = grads_of(model, (got * weights(mask).float()).sum())
    assert backend.graphs == 3, f"{backend.graphs} graphs compiled: expected before + one block + after"
    assert relative_error(got, want) <= 1e-6
    assert got_grads.keys() == want_grads.keys() and len(got_grads) == len(list(model.parameters()))
    for name, grad in want_grads.items():
        assert relative_error(got_grads[name], grad) <= 1e-5, name


def test_compiling_runs_of_layers_shares_one_code_for_alike_runs():
    """Four alike layers in runs of two: one compiled code serves both runs (their tensors renamed by
    place in the run), same log-probs and gradients as eager; a run count that leaves a shorter last
    run gives it its own code."""
    from effcc.blocks import share_block_code, split_into_blocks
    from effcc.prefix_grouping import pack

    model = build("llama", torch.float32, layers=4)
    eager = effcc.shared_prefix(model)
    prefix, suffix, mask = ragged_group()
    want = eager.token_logprobs(prefix, suffix, mask)
    want_grads = grads_of(model, (want * weights(mask).float()).sum())
    backend = CountingBackend()
    compiled = effcc.shared_prefix(model).compile(backend=backend, blocks_per_part=2)
    got = compiled.token_logprobs(prefix, suffix, mask)
    got_grads = grads_of(model, (got * weights(mask).float()).sum())
    assert backend.graphs == 3, f"{backend.graphs} graphs compiled: expected before + one run of two layers + after"
    assert compiled._run.effcc_parts == [["model.layers.0", "model.layers.1"], ["model.layers.2", "model.layers.3"]]
    assert relative_error(got, want) <= 1e-6
    for name, grad in want_grads.items():
        assert relative_error(got_grads[name], grad) <= 1e-5, name

    split = split_into_blocks(effcc.shared_prefix(model).graph_module, blocks_per_part=3)
    assert split.effcc_parts == [["model.layers.0", "model.layers.1", "model.layers.2"], ["model.layers.3"]]
    assert share_block_code(split) == []  # a run of three and a run of one: nothing alike
    assert {"block0_mlp_up_proj_weight", "block2_mlp_up_proj_weight"} <= {n for n, _ in split.submod_1.named_parameters()}
    with torch.no_grad():
        packed = pack([(prefix, suffix, mask.sum(1).tolist())])
        inputs = (packed.input_ids, packed.position_ids, *packed.layout.op_inputs(), packed.suffix_rows)
        torch.testing.assert_close(split(*inputs), eager.graph_module(*inputs), rtol=0, atol=0)


def test_blocks_that_differ_keep_their_own_code():
    """Layers 0 and 2 alike, layer 1 with another activation: only 0 and 2 share."""
    from effcc.blocks import share_block_code, split_into_blocks

    class Block(nn.Module):
        def __init__(self, act):
            super().__init__()
            self.up, self.down, self.act = nn.Linear(8, 16), nn.Linear(16, 8), act

        def forward(self, x):
            return x + self.down(self.act(self.up(x)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block(nn.GELU()), Block(nn.ReLU()), Block(nn.GELU())])

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    net, x = Net().eval(), torch.randn(3, 8)
    split = split_into_blocks(effcc.optimize(net, (x,), passes=[]).model)
    assert share_block_code(split) == [["submod_1", "submod_3"]]
    assert type(split.submod_1) is type(split.submod_3) is not type(split.submod_2)
    with torch.no_grad():
        torch.testing.assert_close(split(x), net(x), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_model_on_the_gpu_in_bf16():
    model = build("llama", torch.bfloat16).cuda()
    grouped = effcc.shared_prefix(model)
    prefix, suffix, mask = (t.cuda() for t in ragged_group(40, (16, 9, 1, 24)))
    logprobs = grouped.token_logprobs(prefix, suffix, mask)
    assert relative_error(logprobs, ungrouped_logprobs(model, prefix, suffix, mask)) <= 3e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Inductor launching the Triton kernels itself)")
def test_compiled_grouped_model_on_the_gpu_matches_eager_and_new_shapes_reuse_the_code():
    """Under torch.compile the prefix attention is a triton_op that Inductor inlines: same log-probs and
    gradients as the eager grouped model (both float32 on the same kernels), two group shapes, one compile."""
    model = build("llama", torch.float32, layers=3).cuda()
    eager, compiled = effcc.shared_prefix(model), effcc.shared_prefix(model).compile()
    torch._dynamo.utils.counters.clear()
    for seed, (prefix_len, lengths) in enumerate([(40, (16, 9, 1, 24)), (57, (3, 30))]):
        prefix, suffix, mask = ragged_group(prefix_len, lengths, seed)
        loss_weights = weights(mask).float().cuda()
        prefix, suffix, mask = prefix.cuda(), suffix.cuda(), mask.cuda()
        want = eager.token_logprobs(prefix, suffix, mask)
        want_grads = grads_of(model, (want * loss_weights).sum())
        got = compiled.token_logprobs(prefix, suffix, mask)
        got_grads = grads_of(model, (got * loss_weights).sum())
        assert relative_error(got, want) <= 1e-5
        for name, grad in want_grads.items():
            assert relative_error(got_grads[name], grad) <= 1e-4, name
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 3, dict(torch._dynamo.utils.counters["stats"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CUDA graphs)")
def test_a_step_over_a_packed_batch_replays_as_a_cuda_graph():
    """What grouped.pack promises: forward, loss and backward of the compiled grouped model over a packed
    batch capture as one CUDA graph (no CPU copies, no waits), and replays give the eager step's log-probs
    and gradients.  (Compiled: eager CUDA embedding backward itself reads a count on the CPU.)"""
    model = build("llama", torch.float32).cuda()
    grouped, eager = effcc.shared_prefix(model).compile(), effcc.shared_prefix(model)
    prefix, suffix, mask = ragged_group(40, (16, 9, 1, 24))
    loss_weights = weights(mask).float().cuda()
    prefix, suffix, mask = prefix.cuda(), suffix.cuda(), mask.cuda()
    want = eager.token_logprobs(prefix, suffix, mask)
    want_grads = grads_of(model, (want * loss_weights).sum())
    want = want.detach()  # its graph would keep the parameters' gradient accumulators of the default stream alive
    batch = grouped.pack(prefix, suffix, mask)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (kernels compiled, autotuned) away from the capture
        (grouped.token_logprobs(batch) * loss_weights).sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = grouped.token_logprobs(batch)
        (got * loss_weights).sum().backward()
    for _ in range(2):  # replays recompute the gradients, they do not add to them
        graph.replay()
    torch.cuda.synchronize()
    assert relative_error(got, want) <= 1e-5
    parameters = dict(model.named_parameters())
    for name, grad in want_grads.items():
        assert relative_error(parameters[name].grad, grad) <= 1e-4, name
