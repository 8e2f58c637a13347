"""optimize_checkpoint: passes on a model whose weights stay on disk give what effcc.optimize gives in memory.

The checkpoint is a Hugging Face sharded safetensors folder (save_pretrained); the model is built
inside effcc.offload.empty_weights().  Checked: the rewritten tensors equal the in-memory result's,
the loaded result computes the same outputs, calibration and the float64 checks streamed, and the
most weight bytes loaded at once stay near one block's size, far below the model's.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import HF_MODELS, VOCAB, randomize_norms, token_ids

import effcc
from effcc.errors import EffccError
from effcc.offload import empty_weights, graph_tensors, optimize_checkpoint

LAYERS = 6


def gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(n_layer=LAYERS, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64, use_cache=False)


def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(num_hidden_layers=LAYERS, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                       vocab_size=VOCAB, max_position_embeddings=64, use_cache=False)  # fmt: skip


def builder(arch):
    """`arch` with LAYERS blocks (gpt2, llama), or conftest's 2-block model of that name."""
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    deep = {"gpt2": lambda: GPT2LMHeadModel(gpt2_config()), "llama": lambda: LlamaForCausalLM(llama_config())}
    return deep.get(arch) or HF_MODELS[arch]


def saved(arch, folder):
    """A random model of `arch` saved as a sharded checkpoint (several files), and the model itself."""
    torch.manual_seed(0)
    model = randomize_norms(builder(arch)()).eval()
    model.save_pretrained(folder, max_shard_size="20KB")
    return model


def empty(arch):
    with empty_weights():
        return builder(arch)().eval()


CASES = {  # fold, recentre, compress, smoothing (scale and shift), quantisation (int8 and int4)
    "gpt2": ["fold_norm_affine", "ln_to_rmsnorm"],
    "llama": [("smoothquant", {"alpha": 0.5}), "quantize_w8a8"],
    "opt": ["os_plus", ("quantize_w4a16", {"group_size": 16})],
    "bloom": ["ln_to_crmsnorm"],
}


@pytest.mark.parametrize("arch", list(CASES))
def test_streamed_passes_equal_the_in_memory_result(arch, tmp_path):
    model = saved(arch, tmp_path / "ckpt")
    assert len(list((tmp_path / "ckpt").glob("*.safetensors"))) > 2  # really sharded
    ids = token_ids(batch=2, tokens=12)
    calibration = [(token_ids(batch=2, tokens=16, seed=s),) for s in range(3)]
    in_memory = effcc.optimize(model, (ids,), passes=CASES[arch], calibration=calibration)

    result = optimize_checkpoint(
        empty(arch), tmp_path / "ckpt", (ids,), CASES[arch], out=tmp_path / "out", calibration=calibration
    )

    # each pass was verified in float64 as in memory, with the same error
    for streamed, reference in zip(result.passes, in_memory.passes):
        for mine, theirs in ((streamed.changed, reference.changed), (streamed.skipped, reference.skipped)):
            assert [site.detail for site in mine] == [site.detail for site in theirs]  # node numbers may differ
        assert streamed.comparison.max_rel == pytest.approx(reference.comparison.max_rel, rel=1e-6, abs=1e-12)
    # the rewritten tensors on disk are the in-memory ones
    written = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    expected = graph_tensors(in_memory.model)
    assert written.keys() == expected.keys()
    loaded = effcc.load(tmp_path / "out").model  # the folder holds the rewritten graph as well as its weights
    for name, value in graph_tensors(loaded).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)
    # and the loaded graph computes what the in-memory result computes
    other = token_ids(batch=3, tokens=9, seed=7)
    torch.testing.assert_close(loaded(other).logits, in_memory.model(other).logits, rtol=0, atol=0)
    assert not (tmp_path / "out" / ".effcc-spill").exists()


def test_peak_weight_memory_is_about_one_block(tmp_path):
    model = saved("llama", tmp_path / "ckpt")
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    block = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    table = model.model.embed_tokens.weight
    ids = token_ids(batch=2, tokens=12)
    calibration = [(token_ids(batch=2, tokens=16, seed=s),) for s in range(2)]
    result = optimize_checkpoint(
        empty("llama"),
        tmp_path / "ckpt",
        (ids,),
        [("smoothquant", {"alpha": 0.5})],
        out=tmp_path / "out",
        calibration=calibration,
    )
    peak = result.program.store.peak_bytes
    # float64 checks load each weight as float64 (2× its float32 bytes): a block's largest weights,
    # never the model; the embedding table (read by the first node) is the largest single tensor
    largest = 2 * max(table.numel() * table.element_size(), block)
    assert peak <= largest, (peak, largest, total)
    assert peak < total / 2


def test_model_with_real_weights_is_refused(tmp_path):
    model = saved("gpt2", tmp_path / "ckpt")
    with pytest.raises(EffccError, match=r"transformer\.wte\.weight.*empty_weights"):
        optimize_checkpoint(model, tmp_path / "ckpt", (token_ids(),), ["fold_norm_affine"], out=tmp_path / "out")


def test_missing_or_mismatched_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    saved("gpt2", tmp_path / "ckpt")
    shard = next(f for f in sorted((tmp_path / "ckpt").glob("*.safetensors")) if "transformer.h.1.ln_1.weight" in load_file(f))
    tensors = load_file(shard)
    tensors["transformer.h.1.ln_1.weight"] = torch.ones(3)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(EffccError, match=r"transformer\.h\.1\.ln_1\.weight has shape \(3,\) in the checkpoint but \(64,\)"):
        optimize_checkpoint(empty("gpt2"), tmp_path / "ckpt", (token_ids(),), ["fold_norm_affine"], out=tmp_path / "out")
    del tensors["transformer.h.1.ln_1.weight"]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    (tmp_path / "ckpt" / "model.safetensors.index.json").unlink()
    with pytest.raises(EffccError, match=r"transformer\.h\.1\.ln_1\.weight is not in the checkpoint"):
        optimize_checkpoint(empty("gpt2"), tmp_path / "ckpt", (token_ids(),), ["fold_norm_affine"], out=tmp_path / "out")


def test_empty_weights_keeps_buffers_and_puts_parameters_on_meta():
    model = empty("llama")
    assert all(p.is_meta for p in model.parameters())
    assert not model.model.rotary_emb.inv_freq.is_meta
    assert not torch.nn.Linear(2, 2).weight.is_meta  # the patch is gone after the block
