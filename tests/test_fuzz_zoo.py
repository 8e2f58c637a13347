"""A fuzzed zoo: random transformers through every pass; rewritten or refused, never silently wrong.

hypothesis draws Hugging Face families and their shape (depth, width, heads and grouped KV heads,
pre- or post-LN (OPT), LayerNorm or RMSNorm (by family), parallel residual (GPT-NeoX), tied
embeddings, biases, GELU / SiLU / ReLU, odd sizes) and hand-written transformers that mix the same
choices freely: nn.MultiheadAttention or a hand-written attention, LayerNorm or nn.RMSNorm, pre- or
post-norm, parallel residual, tied embeddings, odd head sizes.  Each pass runs through effcc.optimize, which verifies it
in float64 against the original (a VerificationError there is a silent mismatch caught); the
result is then checked once more, independently, on inputs of another shape.

CI runs a few examples per pass; `EFFCC_FUZZ_EXAMPLES=200 pytest tests/test_fuzz_zoo.py -s` runs more.
The counts are printed at the end of the session (-s shows them).
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from torch import nn

import effcc
from effcc.pipeline import CAPTURE_RTOL

EXAMPLES = int(os.environ.get("EFFCC_FUZZ_EXAMPLES", "4"))
VOCAB = 61  # odd on purpose
COUNTS: Counter = Counter()


@st.composite
def transformers_models(draw):
    """(a description, a float64 model in eval mode) of a random family and shape."""
    family = draw(st.sampled_from(["gpt2", "opt", "gpt_neox", "llama", "phi"]))
    layers = draw(st.integers(1, 3))
    heads = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([4, 6, 8]))
    width = heads * head_dim
    hidden = draw(st.sampled_from([width, 2 * width + 2, 3 * width]))
    act = draw(st.sampled_from(["gelu_new", "relu", "silu"]))
    tied = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    common = {
        "vocab_size": VOCAB,
        "tie_word_embeddings": tied,
        "use_cache": False,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
    }
    if family == "gpt2":
        model = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                n_layer=layers, n_embd=width, n_head=heads, n_inner=hidden, activation_function=act, n_positions=64, **common
            )
        )
        shape = {}
    elif family == "opt":
        pre = draw(st.booleans())
        bias = draw(st.booleans())
        config = transformers.OPTConfig(num_hidden_layers=layers, hidden_size=width, ffn_dim=hidden, num_attention_heads=heads, do_layer_norm_before=pre,
                           enable_bias=bias, activation_function=act, max_position_embeddings=64, word_embed_proj_dim=width, **common)  # fmt: skip
        model, shape = transformers.OPTForCausalLM(config), {"pre_ln": pre, "bias": bias}
    elif family == "gpt_neox":
        parallel = draw(st.booleans())
        config = transformers.GPTNeoXConfig(num_hidden_layers=layers, hidden_size=width, intermediate_size=hidden, num_attention_heads=heads,
                               use_parallel_residual=parallel, hidden_act=act, **common)  # fmt: skip
        model, shape = transformers.GPTNeoXForCausalLM(config), {"parallel": parallel}
    elif family == "llama":
        kv = draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0]))
        bias = draw(st.booleans())
        config = transformers.LlamaConfig(num_hidden_layers=layers, hidden_size=width, intermediate_size=hidden, num_attention_heads=heads,
                             num_key_value_heads=kv, attention_bias=bias, mlp_bias=bias, hidden_act=act, **common)  # fmt: skip
        model, shape = transformers.LlamaForCausalLM(config), {"kv_heads": kv, "bias": bias}
    else:
        config = transformers.PhiConfig(
            num_hidden_layers=layers,
            hidden_size=width,
            intermediate_size=hidden,
            num_attention_heads=heads,
            hidden_act=act,
            **common,
        )
        model, shape = transformers.PhiForCausalLM(config), {}
    with torch.no_grad():  # norms away from γ = 1, β = 0, so folds and migrations move real values
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name.lower() or ".ln" in name):
                p.add_(0.3 * torch.randn_like(p))
    try:  # some drawn configs are not valid models (Phi's rotary part must be even): not effcc's to refuse
        with torch.no_grad():
            model.eval()(ids(1, 5, 0))
    except Exception:  # noqa: BLE001 - any failure of the model itself
        reject()
    described = {
        "family": family,
        "layers": layers,
        "heads": heads,
        "width": width,
        "hidden": hidden,
        "act": act,
        "tied": tied,
        **shape,
    }
    return described, model.double().eval()


class HandWrittenAttention(nn.Module):
    """Causal attention as people write it by hand: fused qkv, SDPA (or nn.MultiheadAttention's own)."""

    def __init__(self, width: int, heads: int, bias: bool, torch_mha: bool):
        super().__init__()
        self.heads, self.torch_mha = heads, torch_mha
        if torch_mha:
            self.mha = nn.MultiheadAttention(width, heads, bias=bias, batch_first=True)
        else:
            self.qkv, self.out = nn.Linear(width, 3 * width, bias=bias), nn.Linear(width, width, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.torch_mha:
            mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).triu(1)
            return self.mha(x, x, x, attn_mask=mask, need_weights=False)[0]
        b, t, d = x.shape
        q, k, v = (part.view(b, t, self.heads, d // self.heads).transpose(1, 2) for part in self.qkv(x).chunk(3, dim=-1))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class HandWrittenBlock(nn.Module):
    def __init__(self, width, heads, hidden, norm, placement, parallel, bias, act, torch_mha):
        super().__init__()
        make_norm = {"layer": lambda: nn.LayerNorm(width, bias=bias), "rms": lambda: nn.RMSNorm(width)}[norm]
        self.placement, self.parallel = placement, parallel
        self.norm1, self.norm2 = make_norm(), make_norm()
        self.attn = HandWrittenAttention(width, heads, bias, torch_mha)
        activation = {"gelu": nn.GELU(), "silu": nn.SiLU(), "relu": nn.ReLU()}[act]
        self.mlp = nn.Sequential(nn.Linear(width, hidden, bias=bias), activation, nn.Linear(hidden, width, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.placement == "post":
            x = self.norm1(x + self.attn(x))
            return self.norm2(x + self.mlp(x))
        if self.parallel:
            return x + self.attn(self.norm1(x)) + self.mlp(self.norm2(x))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class HandWrittenTransformer(nn.Module):
    def __init__(self, layers, width, heads, hidden, norm, placement, parallel, bias, act, torch_mha, tied):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(VOCAB, width), nn.Embedding(64, width)
        block = (width, heads, hidden, norm, placement, parallel, bias, act, torch_mha)
        self.blocks = nn.ModuleList(HandWrittenBlock(*block) for _ in range(layers))
        self.final_norm = nn.LayerNorm(width) if norm == "layer" else nn.RMSNorm(width)
        self.head = nn.Linear(width, VOCAB, bias=False)
        if tied:
            self.head.weight = self.tokens.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.final_norm(x) if self.blocks[0].placement == "pre" else x)


@st.composite
def hand_written_models(draw):
    """(a description, a float64 hand-written transformer) with every choice drawn independently."""
    heads = draw(st.sampled_from([1, 2, 3, 4]))
    drawn = {
        "layers": draw(st.integers(1, 3)),
        "heads": heads,
        "width": heads * draw(st.sampled_from([4, 5, 8])),  # 5: odd widths, which some passes must refuse
        "norm": draw(st.sampled_from(["layer", "rms"])),
        "placement": draw(st.sampled_from(["pre", "post"])),
        "parallel": draw(st.booleans()),
        "bias": draw(st.booleans()),
        "act": draw(st.sampled_from(["gelu", "silu", "relu"])),
        "torch_mha": draw(st.booleans()),
        "tied": draw(st.booleans()),
    }
    drawn["hidden"] = draw(st.sampled_from([drawn["width"] * 2, drawn["width"] * 3 + 1]))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = HandWrittenTransformer(**drawn)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.weight.add_(0.3 * torch.randn_like(module.weight))
                if getattr(module, "bias", None) is not None:
                    module.bias.add_(0.3 * torch.randn_like(module.bias))
    return {"family": "hand-written", **drawn}, model.double().eval()


PASSES = [  # (passes, needs calibration)
    (["fold_norm_affine"], False),
    (["ln_to_rmsnorm"], False),
    (["ln_to_crmsnorm"], False),
    (["causal_attention"], False),
    ([("smoothquant", {"alpha": 0.5})], True),
    (["os_plus"], True),
    (["real_to_complex"], False),
    ([("quantize_w8a8", {"bound": 0.5})], False),
    ([("quantize_w4a16", {"group_size": 2, "bound": 2.0})], False),
    (["real_to_complex", ("fairy2i", {"stages": 3, "bound": 2.0})], False),
]


def ids(batch: int, tokens: int, seed: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def rewrite_or_refuse(passes, calibrated, described, model):
    """Run `passes` on `model`; count what was rewritten and refused; fail on any silent mismatch."""
    calibration = [(ids(2, 9, s),) for s in range(2)] if calibrated else None
    try:
        res = effcc.optimize(model, (ids(2, 7, 0),), passes=passes, calibration=calibration)
    except effcc.VerificationError as error:  # effcc's own check caught a wrong rewrite: that is the bug this hunts
        COUNTS["silent mismatches"] += 1
        raise AssertionError(f"{passes} on {described}: {error}") from error
    COUNTS["models tried"] += 1
    for result in res.passes:
        COUNTS["sites rewritten"] += len(result.changed)
        COUNTS["sites refused"] += len(result.skipped)
        assert all(site.detail for site in result.skipped), "a refusal without a reason"
    if res.passes[-1].guarantee is effcc.Guarantee.ISO_FLOP:
        return  # a different function by design: its guarantee (the FLOPs) was checked by optimize
    # once more, independently, on another batch size and length than the example inputs, against the
    # eager model (which may keep a step in float32 on purpose: the capture's own tolerance is added)
    tolerance = sum(result.rtol for result in res.passes) + CAPTURE_RTOL
    comparison = effcc.verify(model, res, (ids(3, 11, 1),))
    if not comparison.within(tolerance):
        COUNTS["silent mismatches"] += 1
        raise AssertionError(f"{passes} on {described}: {comparison} on other inputs, above {tolerance}")


@pytest.mark.parametrize(("passes", "calibrated"), PASSES, ids=lambda v: str(v[0]) if isinstance(v, list) else "")
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(drawn=transformers_models())
def test_every_pass_rewrites_or_refuses_never_silently_wrong(passes, calibrated, drawn):
    rewrite_or_refuse(passes, calibrated, *drawn)


HAND_WRITTEN_PASSES = [*PASSES, ([("sparse_ift", {"family": "wide", "sparsity": 0.5})], False)]


@pytest.mark.parametrize(("passes", "calibrated"), HAND_WRITTEN_PASSES, ids=lambda v: str(v[0]) if isinstance(v, list) else "")
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(drawn=hand_written_models())
def test_hand_written_models_are_rewritten_or_refused(passes, calibrated, drawn):
    rewrite_or_refuse(passes, calibrated, *drawn)


def teardown_module():
    print(f"\nfuzzed zoo: {dict(COUNTS)}")
    assert COUNTS["silent mismatches"] == 0
