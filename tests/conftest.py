"""Shared model builders: Hugging Face architectures from configs, random weights, seeded."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():  # Triton kernels run in its interpreter on the CPU (set before they are defined)
    os.environ.setdefault("TRITON_INTERPRET", "1")
warnings.filterwarnings("ignore", category=FutureWarning)

VOCAB = 96


def randomize_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Norm scales/shifts drawn away from 1/0: with HF's init (γ=1, β=0) a fold is a no-op."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            owner = name.rsplit(".", 2)[-2] if "." in name else ""
            if p.dim() == 1 and ("norm" in owner.lower() or "ln" in owner.lower() or "layernorm" in name.lower()):
                if leaf == "weight":
                    p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0, use_cache=False))


def _opt():
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(
        OPTConfig(num_hidden_layers=2, hidden_size=32, ffn_dim=64, num_attention_heads=4, vocab_size=VOCAB,
                  max_position_embeddings=64, word_embed_proj_dim=32, bos_token_id=0, eos_token_id=0, pad_token_id=1, use_cache=False)
    )


def _opt_post_ln():
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(
        OPTConfig(num_hidden_layers=2, hidden_size=32, ffn_dim=64, num_attention_heads=4, vocab_size=VOCAB, do_layer_norm_before=False,
                  max_position_embeddings=64, word_embed_proj_dim=32, bos_token_id=0, eos_token_id=0, pad_token_id=1, use_cache=False)
    )


def _llama(layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(num_hidden_layers=layers, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                    vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0, use_cache=False)
    )


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(
        Qwen2Config(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                    vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0, use_cache=False)
    )


def _bert():
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM(
        BertConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0)
    )


def _gemma():
    from transformers import GemmaConfig, GemmaForCausalLM

    return GemmaForCausalLM(
        GemmaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                    vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0, use_cache=False)
    )


def _neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(
        GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, vocab_size=VOCAB,
                      bos_token_id=0, eos_token_id=0, use_parallel_residual=True, use_cache=False)
    )


def _bloom():
    from transformers import BloomConfig, BloomForCausalLM

    return BloomForCausalLM(BloomConfig(n_layer=2, hidden_size=32, n_head=4, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0, use_cache=False))


def _phi():
    from transformers import PhiConfig, PhiForCausalLM

    return PhiForCausalLM(
        PhiConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, vocab_size=VOCAB,
                  bos_token_id=0, eos_token_id=0, pad_token_id=0, use_cache=False)
    )


def _falcon():
    """Linears written as `x @ W.T` (FalconLinear), the MLP's output added in place (`+=`), parallel blocks, multi-query."""
    from transformers import FalconConfig, FalconForCausalLM

    return FalconForCausalLM(FalconConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB, new_decoder_architecture=False,
                                          multi_query=True, bos_token_id=0, eos_token_id=0, use_cache=False))


HF_MODELS = {"bloom": _bloom, "phi": _phi, "falcon": _falcon, "gpt2": _gpt2, "opt": _opt, "llama": _llama, "bert": _bert, "gemma": _gemma, "qwen2": _qwen2, "gpt_neox": _neox, "opt_post_ln": _opt_post_ln}


def build(name: str, dtype: torch.dtype = torch.float32, seed: int = 0, **sizes) -> torch.nn.Module:
    """`sizes` go to the architecture's factory where it takes them (llama: layers)."""
    torch.manual_seed(seed)
    return randomize_norms(HF_MODELS[name](**sizes), seed).to(dtype).eval()


def token_ids(batch: int = 2, tokens: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, tokens), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def ids():
    return token_ids()
