"""W8A8 and W4A16 linears on one GPU: effcc's Triton kernels vs bf16 cuBLAS (and torch._int_mm),
then LLaMA-7B-shaped decoder layers end to end (eager, Inductor, effcc bf16 / W8A8 / W4A16).

Side by side in one process; medians of CUDA-event timings (triton.testing.do_bench) over
CUDA-graph replays, each replay cycling through enough copies of the weights to overflow
L2, so every call reads its weights from device memory as in a real model.  Achieved
bandwidth is given as a share of a measured device-to-device copy.  JSON goes to
benchmarks/results/.

    python benchmarks/bench_quantized.py [--parts kernels,model] [--layers 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

L2_FLUSH_BYTES = 256 << 20  # rotate through at least this many bytes of weights per replay


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write counted)."""
    from triton.testing import do_bench

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def time_rotating(calls, rep_ms: int = 400) -> float:
    """Median milliseconds per call of `calls` (closures over distinct weight copies), run as one CUDA graph."""
    from triton.testing import do_bench

    for call in calls:  # autotuning and lazy allocation happen outside the capture
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for call in calls:
            call()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, stream=stream):
            for call in calls:
                call()
    return do_bench(graph.replay, warmup=min(50, rep_ms), rep=rep_ms, return_mode="median") / len(calls)


def copies_for(nbytes: int) -> int:
    return max(2, math.ceil(L2_FLUSH_BYTES / nbytes))


# ---- kernels ------------------------------------------------------------------------------------
def bench_w8a8(m, n, k, results):
    from effcc.backends.triton import quantized_linear as kernels
    from effcc.ops import quantized_linear as q

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
    copies = copies_for(n * k * 2)
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(copies)]
    quantised = [q.quantize_weight_int8(w) for w in weights]
    xq, xs = kernels.quantize_rows(x)
    row = {"M": m, "N": n, "K": k}
    row["bf16_cublas_ms"] = time_rotating([lambda w=w: x @ w.t() for w in weights])
    row["int_mm_ms"] = time_rotating([lambda wq=wq: torch._int_mm(xq, wq.t()) for wq, _ in quantised])
    row["effcc_gemm_ms"] = time_rotating([lambda wq=wq, ws=ws: kernels.int8_linear(xq, xs, wq, ws, None, torch.bfloat16) for wq, ws in quantised])
    row["effcc_quantize_ms"] = time_rotating([lambda: kernels.quantize_rows(x)])
    row["effcc_total_ms"] = row["effcc_gemm_ms"] + row["effcc_quantize_ms"]
    flops = 2 * m * n * k
    row["bf16_tflops"] = flops / row["bf16_cublas_ms"] / 1e9
    row["effcc_gemm_tops"] = flops / row["effcc_gemm_ms"] / 1e9
    row["speedup_gemm_vs_bf16"] = row["bf16_cublas_ms"] / row["effcc_gemm_ms"]
    row["speedup_total_vs_bf16"] = row["bf16_cublas_ms"] / row["effcc_total_ms"]
    row["speedup_int_mm_vs_bf16"] = row["bf16_cublas_ms"] / row["int_mm_ms"]
    wq, ws = quantised[0]
    want = q.int8_linear_reference(xq, xs[:, None], wq, ws, None, torch.float64)
    got = kernels.int8_linear(xq, xs, wq, ws, None, torch.float32)
    row["max_rel_error_vs_reference"] = ((got.double() - want).abs().max() / want.abs().max()).item()
    results["w8a8"].append(row)
    print(f"W8A8 {m}x{n}x{k}: bf16 {row['bf16_cublas_ms']:.3f} ms ({row['bf16_tflops']:.0f} TFLOP/s), _int_mm {row['int_mm_ms']:.3f}, "
          f"effcc gemm {row['effcc_gemm_ms']:.3f} ({row['effcc_gemm_tops']:.0f} TOP/s) + quantize {row['effcc_quantize_ms']:.3f} "
          f"-> {row['speedup_total_vs_bf16']:.2f}x (gemm only {row['speedup_gemm_vs_bf16']:.2f}x, _int_mm {row['speedup_int_mm_vs_bf16']:.2f}x)", flush=True)


def bench_w4a16(m, n, k, group, copy_bw, results):
    from effcc.backends.triton import quantized_linear as kernels
    from effcc.ops import quantized_linear as q

    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
    bf16_copies = copies_for(n * k * 2)
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(bf16_copies)]
    packed = [q.quantize_weight_int4(w, group) for w in weights]
    packed = [(p, s.to(torch.bfloat16), z) for p, s, z in packed]
    int4_bytes = sum(t.numel() * t.element_size() for t in packed[0])
    packed = packed * max(1, copies_for(int4_bytes) // len(packed))
    row = {"M": m, "N": n, "K": k, "group_size": group, "weight_bytes_int4": int4_bytes}
    row["bf16_cublas_ms"] = time_rotating([lambda w=w: x @ w.t() for w in weights])
    row["effcc_ms"] = time_rotating([lambda p=p: kernels.int4_linear(x, *p, group, None) for p in packed])
    row["speedup_vs_bf16"] = row["bf16_cublas_ms"] / row["effcc_ms"]
    row["effcc_weight_bandwidth_share_of_copy"] = int4_bytes / (row["effcc_ms"] * 1e-3) / copy_bw
    row["bf16_weight_bandwidth_share_of_copy"] = n * k * 2 / (row["bf16_cublas_ms"] * 1e-3) / copy_bw
    p, s, z = packed[0]
    want = q.w4a16_linear_reference(x.double(), p, s.double(), z, group, None)
    got = kernels.int4_linear(x, p, s, z, group, None)
    row["max_rel_error_vs_reference"] = ((got.double() - want).abs().max() / want.abs().max()).item()
    row["config"] = str(kernels._int4_mma.best_config) if m <= kernels.MMA_TOKENS else "dequantise + cuBLAS"
    results["w4a16"].append(row)
    print(f"W4A16 M={m} {n}x{k}: bf16 {row['bf16_cublas_ms'] * 1e3:.1f} us, effcc {row['effcc_ms'] * 1e3:.1f} us -> {row['speedup_vs_bf16']:.2f}x, "
          f"weight BW {100 * row['effcc_weight_bandwidth_share_of_copy']:.0f}% of copy (bf16 {100 * row['bf16_weight_bandwidth_share_of_copy']:.0f}%) [{row['config']}]", flush=True)


# ---- LLaMA-7B-shaped decoder layers ------------------------------------------------------------
def llama_layers(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=4096, use_cache=False)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    with torch.no_grad():  # trained-looking norms, so that folding them is not a no-op
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model


def linear_weight_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for n, t in module.state_dict().items() if ".layers." in n and n.endswith("proj.weight"))


def stored_bytes(gm, key_filter) -> int:
    return sum(t.numel() * t.element_size() for n, t in gm.state_dict().items() if key_filter(n))


def bench_model(layers: int, results):
    from triton.testing import do_bench

    import effcc
    from effcc.passes import default_passes

    model = llama_layers(layers)
    defaults = [p.name for p in default_passes()]
    variants = {
        "eager": None,
        "inductor": {"backend": "inductor"},
        "effcc_bf16": {"backend": "effcc", "options": {"passes": defaults}},
        "effcc_w8a8": {"backend": "effcc", "options": {"passes": defaults + ["quantize_w8a8"]}},
        "effcc_w4a16": {"backend": "effcc", "options": {"passes": defaults + ["quantize_w4a16"]}},
    }
    # Weight memory of the decoder layers' linears, before and after (stored tensors of the program).
    ids = torch.randint(0, 32000, (1, 1), device="cuda")
    memory = {"bf16_linear_weights_bytes": linear_weight_bytes(model)}
    for name, passes in (("w8a8", ["quantize_w8a8"]), ("w4a16", ["quantize_w4a16"])):
        gm = effcc.optimize(model, (ids,), passes=passes, verify=False).program.gm
        memory[f"{name}_linear_weights_bytes"] = stored_bytes(gm, lambda n: ".layers." in n and ("int8" in n or "int4" in n or "scale" in n or "zeros" in n))
    memory["w8a8_ratio"] = memory["bf16_linear_weights_bytes"] / memory["w8a8_linear_weights_bytes"]
    memory["w4a16_ratio"] = memory["bf16_linear_weights_bytes"] / memory["w4a16_linear_weights_bytes"]
    results["model_memory"] = memory
    print(f"linear weights: bf16 {memory['bf16_linear_weights_bytes'] / 2**20:.0f} MiB, W8A8 {memory['w8a8_linear_weights_bytes'] / 2**20:.0f} MiB "
          f"({memory['w8a8_ratio']:.2f}x smaller), W4A16 {memory['w4a16_linear_weights_bytes'] / 2**20:.0f} MiB ({memory['w4a16_ratio']:.2f}x smaller)", flush=True)

    for phase, tokens in (("decode", 1), ("prefill", 2048)):
        ids = torch.randint(0, 32000, (1, tokens), device="cuda")
        with torch.no_grad():
            reference = model(ids).logits.double()
            row = {"phase": phase, "tokens": tokens, "layers": layers}
            for name, spec in variants.items():
                torch._dynamo.reset()
                fn = model if spec is None else torch.compile(model, **spec)
                out = fn(ids).logits  # compiles
                row[f"{name}_rel_error_vs_eager"] = ((out.double() - reference).abs().max() / reference.abs().max()).item()
                try:
                    row[f"{name}_ms"] = time_rotating([lambda fn=fn, ids=ids: fn(ids)])
                    row[f"{name}_timing"] = "cuda graph"
                except Exception as error:  # noqa: BLE001 - some paths cannot be captured; time them plainly
                    row[f"{name}_ms"] = do_bench(lambda fn=fn, ids=ids: fn(ids), warmup=50, rep=300, return_mode="median")
                    row[f"{name}_timing"] = f"plain ({type(error).__name__})"
                print(f"{phase} {name}: {row[f'{name}_ms']:.3f} ms ({row[f'{name}_timing']}), rel error vs eager {row[f'{name}_rel_error_vs_eager']:.2e}", flush=True)
            for name in ("effcc_bf16", "effcc_w8a8", "effcc_w4a16"):
                row[f"{name}_speedup_vs_inductor"] = row["inductor_ms"] / row[f"{name}_ms"]
        results["model"].append(row)
        print(f"{phase}: vs Inductor bf16  W8A8 {row['effcc_w8a8_speedup_vs_inductor']:.2f}x  W4A16 {row['effcc_w4a16_speedup_vs_inductor']:.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="kernels,model", help="comma-separated: kernels, model")
    parser.add_argument("--layers", type=int, default=2, help="LLaMA-7B-shaped decoder layers in the end-to-end model")
    parser.add_argument("--quick", action="store_true", help="one shape per kernel (a smoke test)")
    parser.add_argument("--w4a16-tokens", default="1,4,16,2048", help="token counts for the W4A16 kernel rows")
    parser.add_argument("--skip-w8a8", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quantized.json")
    args = parser.parse_args()
    parts = set(args.parts.split(","))

    name = torch.cuda.get_device_name()
    results = {"device": name, "torch": torch.__version__, "python": platform.python_version(), "w8a8": [], "w4a16": [], "model": []}
    import triton

    results["triton"] = triton.__version__
    copy_bw = copy_bandwidth()
    results["copy_bandwidth_gb_s"] = copy_bw / 1e9
    print(f"{name}: device-to-device copy {copy_bw / 1e9:.0f} GB/s", flush=True)
    start = time.time()
    if "kernels" in parts:
        for m, n, k in [] if args.skip_w8a8 else [(4096, 4096, 4096), (4096, 11008, 4096)][: 1 if args.quick else None]:
            bench_w8a8(m, n, k, results)
        shapes = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (N, K): out × in
        for m in [int(t) for t in args.w4a16_tokens.split(",")][: 1 if args.quick else None]:
            for n, k in shapes[: 1 if args.quick else None]:
                bench_w4a16(m, n, k, 128, copy_bw, results)
    if "model" in parts:
        bench_model(args.layers, results)
    results["seconds"] = time.time() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
