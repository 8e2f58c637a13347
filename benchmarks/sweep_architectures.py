"""Every entry point on many Hugging Face families, decoders and vision encoders (CPU, small configs, random weights).

    python benchmarks/sweep_architectures.py [--only qwen3,falcon] [--out benchmarks/results/architecture_sweep_cpu.json]

For each family: effcc.optimize with the default passes (each verified in float64 against the model),
torch.compile(model, backend="effcc") on two shapes, ONNX export run in ONNX Runtime,
effcc.shared_prefix (grouped log-probs vs the ungrouped batch), and the quantisation recipes.  Each
cell is the largest relative error against the original model, the passes' counts of sites changed,
or the error's first line: a family that fails somewhere shows where and why.  The tests hold the
guarantees on fewer families; this sweep is how new families get looked at.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import transformers as hf
from rich.console import Console
from rich.table import Table

import effcc

VOCAB = 96
LLAMA_LIKE = {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": VOCAB, "use_cache": False, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}


def llama_like(family: str, **extra):
    config, model = getattr(hf, f"{family}Config"), getattr(hf, f"{family}ForCausalLM")
    return lambda: model(config(**LLAMA_LIKE, **extra))


FAMILIES = {
    "llama": llama_like("Llama"),
    "mistral": llama_like("Mistral", sliding_window=None),
    "mixtral": llama_like("Mixtral", num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    "qwen2": llama_like("Qwen2"),
    "qwen3": llama_like("Qwen3", head_dim=8),
    "gemma": llama_like("Gemma", head_dim=8),
    "gemma2": llama_like("Gemma2", head_dim=8, sliding_window=64),
    "gemma3": lambda: hf.Gemma3ForCausalLM(hf.Gemma3TextConfig(**LLAMA_LIKE, head_dim=8, sliding_window=64)),
    "phi3": llama_like("Phi3"),
    "olmo": llama_like("Olmo"),
    "olmo2": llama_like("Olmo2"),
    "granite": llama_like("Granite"),
    "stablelm": llama_like("StableLm"),
    "starcoder2": llama_like("Starcoder2", sliding_window=None),
    "cohere": llama_like("Cohere"),
    "phi": lambda: hf.PhiForCausalLM(hf.PhiConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, vocab_size=VOCAB,
                                                  use_cache=False)),
    "gpt2": lambda: hf.GPT2LMHeadModel(hf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64, use_cache=False)),
    "gptj": lambda: hf.GPTJForCausalLM(hf.GPTJConfig(n_layer=2, n_embd=32, n_head=4, rotary_dim=4, vocab_size=VOCAB, n_positions=64,
                                                     bos_token_id=0, eos_token_id=0, use_cache=False)),
    "gpt_neox": lambda: hf.GPTNeoXForCausalLM(hf.GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                                               vocab_size=VOCAB, use_cache=False)),
    "gpt_bigcode": lambda: hf.GPTBigCodeForCausalLM(hf.GPTBigCodeConfig(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64,
                                                                        use_cache=False)),
    "codegen": lambda: hf.CodeGenForCausalLM(hf.CodeGenConfig(n_layer=2, n_embd=32, n_head=4, rotary_dim=4, vocab_size=VOCAB, n_positions=64,
                                                              use_cache=False)),
    "falcon": lambda: hf.FalconForCausalLM(hf.FalconConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB,
                                                           new_decoder_architecture=False, multi_query=True, use_cache=False)),
    "opt": lambda: hf.OPTForCausalLM(hf.OPTConfig(num_hidden_layers=2, hidden_size=32, ffn_dim=64, num_attention_heads=4, vocab_size=VOCAB,
                                                  max_position_embeddings=64, word_embed_proj_dim=32, use_cache=False)),
    "bloom": lambda: hf.BloomForCausalLM(hf.BloomConfig(n_layer=2, hidden_size=32, n_head=4, vocab_size=VOCAB, use_cache=False)),
    "mpt": lambda: hf.MptForCausalLM(hf.MptConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=VOCAB, use_cache=False)),
    "biogpt": lambda: hf.BioGptForCausalLM(hf.BioGptConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                                           vocab_size=VOCAB, use_cache=False)),
}
VISION = {  # encoders on 32×32 images: no shared prefix (not causal), the same other entry points
    "vit": lambda: hf.ViTForImageClassification(hf.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                             intermediate_size=64, num_labels=5)),
    "deit": lambda: hf.DeiTForImageClassification(hf.DeiTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                                                num_attention_heads=4, intermediate_size=64, num_labels=5)),
    "dinov2": lambda: hf.Dinov2Model(hf.Dinov2Config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                     mlp_ratio=2)),
    "beit": lambda: hf.BeitForImageClassification(hf.BeitConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                                                num_attention_heads=4, intermediate_size=64, num_labels=5)),
    "convnext": lambda: hf.ConvNextForImageClassification(hf.ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], num_labels=5)),
    "resnet": lambda: hf.ResNetForImageClassification(hf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                                                                      num_labels=5)),
    "swin": lambda: hf.SwinForImageClassification(hf.SwinConfig(image_size=16, patch_size=2, embed_dim=8, depths=[1, 1], num_heads=[2, 2],
                                                                window_size=4, num_labels=5)),
    "clip_vision": lambda: hf.CLIPVisionModel(hf.CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                                                  num_attention_heads=4, intermediate_size=64)),
}
RECIPES = {
    "smoothquant + w8a8": [("smoothquant", {"alpha": 0.5}), "quantize_w8a8"],
    "os+ + w4a16": ["os_plus", ("quantize_w4a16", {"group_size": 16})],
    "fairy2i": ["real_to_complex", ("fairy2i", {"stages": 2})],
}


def ids(batch: int, tokens: int, seed: int) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def images(batch: int, size: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))



def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


def logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def changed(result) -> str:
    return ", ".join(f"{p.name} {len(p.changed)}/{len(p.changed) + len(p.skipped)}" for p in result.passes)


def optimized(model, example, other) -> str:
    result = effcc.optimize(model, (example,))
    with torch.no_grad():
        error = relative(logits(result.model(other)), logits(model(other)))
    return f"{error:.0e} ({changed(result)})"


def compiled(model, example, other) -> str:
    torch._dynamo.reset()
    backend = torch.compile(model, backend="effcc")
    with torch.no_grad():
        return f"{max(relative(logits(backend(x)), logits(model(x))) for x in (example, other)):.0e}"


def onnx(model, example, other, folder: Path) -> str:
    result = effcc.optimize(model, (example,), verify=False)
    path = effcc.export_onnx(result, folder / "model.onnx")
    return f"{effcc.check_onnx(path, model, (other,)).max_rel:.0e}"


def grouped(model) -> str:
    prefix, suffixes = ids(1, 7, 2)[0], ids(3, 5, 3)
    got = effcc.shared_prefix(model).token_logprobs(prefix, suffixes)
    with torch.no_grad():
        full = logits(model(torch.cat([prefix.expand(3, -1), suffixes], 1)))[:, prefix.numel() - 1 : -1]
        want = torch.log_softmax(full.float(), -1).gather(-1, suffixes[..., None]).squeeze(-1)
    return f"{relative(got.detach(), want):.0e}"


def quantised(model, recipe, example, calibration) -> str:
    return changed(effcc.optimize(model, (example,), passes=recipe, calibration=[(batch,) for batch in calibration], verify=False))


def attempt(fn, *args) -> str:
    try:
        return fn(*args)
    except Exception as error:  # noqa: BLE001 -- a sweep reports every failure and goes on
        return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:160]}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated families (default: all, decoders and vision encoders)")
    parser.add_argument("--out", default="benchmarks/results/architecture_sweep_cpu.json")
    args = parser.parse_args()
    families = args.only.split(",") if args.only else [*FAMILIES, *VISION]
    console, rows = Console(width=240), []
    with tempfile.TemporaryDirectory() as folder:
        for family in families:
            started = time.time()
            torch.manual_seed(0)
            model = (FAMILIES.get(family) or VISION[family])().eval()
            if family in FAMILIES:
                example, other, calibration = ids(2, 12, 0), ids(3, 9, 1), [ids(2, 16, seed) for seed in range(2)]
            else:
                size = model.config.image_size if hasattr(model.config, "image_size") else 32
                example, other, calibration = images(2, size, 0), images(3, size, 1), [images(2, size, seed) for seed in (2, 3)]
            row = {"family": family, "optimize (default passes)": attempt(optimized, model, example, other),
                   "torch.compile": attempt(compiled, model, example, other), "onnx runtime": attempt(onnx, model, example, other, Path(folder)),
                   "shared_prefix": attempt(grouped, model) if family in FAMILIES else "n/a (not causal)"}
            row.update({recipe: attempt(quantised, model, passes, example, calibration) for recipe, passes in RECIPES.items()})
            row["seconds"] = round(time.time() - started, 1)
            console.print(f"{family}: {row}", soft_wrap=True)
            rows.append(row)
    table = Table(title="effcc on Hugging Face families (CPU, relative error vs the model, or sites changed/seen)")
    for column in rows[0]:
        table.add_column(column, overflow="ellipsis", no_wrap=True, max_width=36)
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    console.print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"torch": torch.__version__, "transformers": hf.__version__, "rows": rows}, indent=1))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
