"""SmoothQuant + W8A8 on a checkpoint larger than the GPU memory it is allowed: weights streamed.

    python benchmarks/bench_offload.py [--layers 12] [--cap-gib 3] [--out benchmarks/results/offload_h100.json]

1. Writes a LLaMA-7B-shaped checkpoint (d=4096, MLP 11008, vocab 32000; --layers of them) with
   random weights (float32 by default) as safetensors shards, tensor by tensor (never the whole model in memory).
2. Caps this process's GPU memory below the model's size (torch.cuda.set_per_process_memory_fraction).
3. Runs effcc.optimize_checkpoint(smoothquant α=0.5, quantize_w8a8) on the GPU with calibration
   batches: every pass is verified in float64 and calibrated, streaming one weight at a time.
Prints and saves: model bytes, the cap, peak GPU memory, peak weight bytes held, time per pass, and
the rewritten checkpoint's size.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import effcc
from effcc.offload import INDEX, empty_weights


def llama_7b_shape(layers: int, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=layers, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                         vocab_size=32000, max_position_embeddings=4096, use_cache=False)  # fmt: skip
    with empty_weights():
        return LlamaForCausalLM(config).to(dtype).eval()


def write_random_checkpoint(model, folder: Path, device: str, shard_bytes: int = 2**31) -> int:
    """Random weights for every parameter of `model` (on meta, in its dtype), written shard by shard; returns bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device).manual_seed(0)
    shard, size, total, weight_map, index = {}, 0, 0, {}, 0

    def flush():
        nonlocal shard, size, index
        index += 1
        name = f"model-{index:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, size = {}, 0

    for name, p in model.named_parameters():
        if p.dim() == 1:  # norm scales near 1, a few outlier channels as trained LLMs have
            value = 1 + 0.1 * torch.randn(p.shape, generator=g, device=device)
            value[:4] *= 20
        else:
            value = 0.02 * torch.randn(p.shape, generator=g, device=device)
        value = value.to(p.dtype).cpu()
        nbytes = value.numel() * value.element_size()
        if size and size + nbytes > shard_bytes:
            flush()
        shard[name] = value
        size += nbytes
        total += nbytes
    flush()
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--cap-gib", type=float, default=3.0, help="GPU memory this process may use")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per calibration batch")
    parser.add_argument("--batches", type=int, default=4, help="calibration batches")
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="weights' dtype (bf16 re-rounds migrated weights: a deep random model drifts past the bf16 tolerance)",
    )
    parser.add_argument("--out", default="benchmarks/results/offload.json")
    parser.add_argument("--work", help="folder for the checkpoints (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp())
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    row = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "layers": args.layers, "dtype": args.dtype, "shape": "LLaMA-7B (d=4096, MLP 11008, vocab 32000)"}  # fmt: skip

    model = llama_7b_shape(args.layers, getattr(torch, args.dtype))
    start = time.perf_counter()
    if (work / "ckpt" / INDEX).exists():  # written by an earlier run with --work
        row["model_GiB"] = json.loads((work / "ckpt" / INDEX).read_text())["metadata"]["total_size"] / 2**30
    else:
        row["model_GiB"] = write_random_checkpoint(model, work / "ckpt", args.device) / 2**30
    row["write_checkpoint_s"] = time.perf_counter() - start
    print(json.dumps(row), flush=True)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(args.cap_gib * 2**30 / total, device)
        torch.cuda.reset_peak_memory_stats(device)
        row["gpu_cap_GiB"] = args.cap_gib
    g = torch.Generator().manual_seed(1)
    calibration = [(torch.randint(0, 32000, (1, args.tokens), generator=g),) for _ in range(args.batches)]
    ids = torch.randint(0, 32000, (1, 32), generator=g)
    start = time.perf_counter()
    result = effcc.optimize_checkpoint(
        model, work / "ckpt", (ids,), [("smoothquant", {"alpha": 0.5}), "quantize_w8a8"],
        out=work / "w8a8", calibration=calibration, device=device,
    )  # fmt: skip
    row["optimize_s"] = time.perf_counter() - start
    row["passes"] = [
        {
            "pass": p.name,
            "changed": len(p.changed),
            "skipped": len(p.skipped),
            "max_rel_f64": p.comparison.max_rel,
            "seconds": p.seconds,
        }
        for p in result.passes
    ]
    store = result.program.store
    row["peak_weights_held_GiB"] = store.peak_bytes / 2**30
    row["weight_loads"] = store.loads
    if device.type == "cuda":
        row["peak_gpu_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    row["rewritten_GiB"] = sum(f.stat().st_size for f in (work / "w8a8").glob("*.safetensors")) / 2**30
    print(result.report.passes and json.dumps(row, indent=1), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(row, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
