"""Sparse-IFT on the GPU: does a layer with the dense layer's FLOPs run as fast as the dense layer?

    python benchmarks/bench_sparse_ift.py [--quick] [--out benchmarks/results/sparse_ift_h100.json]

Training runs masked dense math (the Sparse-IFT reference does too): a Sparse Wide layer at
density d is a 1/d times larger dense matmul.  effcc.sparsity.freeze lowers block-masked layers
to effcc's block-sparse Triton kernel, which reads only the kept blocks.  bf16, one process,
median of triton.testing.do_bench.

1. Layers: a dense K → N linear (cuBLAS, and under Inductor) against its iso-FLOP Sparse Wide
   form K → N/d at density d (blocks 32×32, 64×64, 128×128): masked dense (cuBLAS on the wide matrix)
   and effcc's kernel.  iso-FLOP speed = dense time / effcc time (1.0: as fast as dense at
   equal FLOPs); skip speedup = masked dense time / effcc time.
2. A model: GPT-2 shapes (d=1024, 4 layers, 8×512 tokens) with sparse_ift `wide` and `parallel`
   (s=0.75, blocks 64×64) on the hidden linears: forward time of the dense model eager and under
   Inductor, the Sparse-IFT model masked dense (eager: the math it trains with) and after
   effcc.sparsity.freeze (wide: block-sparse kernel; parallel: folded into dense), eager and Inductor.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import effcc
from effcc.ops.sparse import pack_blocks
from effcc.sparsity import blocks, freeze

DEVICE = "cuda"


def bench(fn, ms=200) -> float:
    return do_bench(fn, warmup=50, rep=ms, return_mode="median")


def random_block_mask(out_features, in_features, block, density, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    kept = torch.rand(out_features // block[0], in_features // block[1], generator=g) < density
    return blocks.expand(kept, (out_features, in_features), block).to(DEVICE)


def layer_rows(quick: bool, deadline: float) -> list[dict]:
    rows = []
    shapes = [(4096, 4096)] if quick else [(4096, 4096), (1024, 4096)]
    for k, n in shapes:
        dense_w = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) / k**0.5
        for density in (0.25,) if quick else (0.5, 0.25, 0.1):
            wide = round(n / density / 128) * 128
            for block in [(64, 64)] if quick else [(32, 32), (64, 64), (128, 128)]:
                mask = random_block_mask(wide, k, block, density)
                w = (torch.randn(wide, k, device=DEVICE) / k**0.5 * mask).bfloat16()
                packed = pack_blocks(w, mask, block)
                args = (packed.values, packed.row_offsets, packed.col_blocks, None, wide)
                for m in (16, 2048) if quick else (16, 2048, 8192):
                    if time.perf_counter() > deadline:
                        return rows
                    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
                    sparse = torch.ops.effcc.block_sparse_linear(x, *args)
                    err = ((sparse.float() - F.linear(x, w).float()).abs().max() / F.linear(x, w).float().abs().max()).item()
                    compiled = torch.compile(lambda t, weight=dense_w: F.linear(t, weight))
                    t_dense = bench(lambda: F.linear(x, dense_w))
                    t_inductor = bench(lambda: compiled(x))
                    t_masked = bench(lambda: F.linear(x, w))
                    t_effcc = bench(lambda: torch.ops.effcc.block_sparse_linear(x, *args))
                    active = 2 * m * packed.values.numel()
                    row = {"K": k, "N": n, "N_wide": wide, "density": packed.values.numel() / w.numel(), "block": list(block), "tokens": m,
                           "dense_ms": t_dense, "inductor_ms": t_inductor, "masked_dense_ms": t_masked, "effcc_ms": t_effcc,
                           "iso_flop_speed": t_dense / t_effcc, "skip_speedup": t_masked / t_effcc,
                           "effcc_tflops": active / t_effcc / 1e9, "dense_tflops": 2 * m * n * k / t_dense / 1e9, "max_rel_err": err}  # fmt: skip
                    rows.append(row)
                    print(f"K={k:5} N={n:5}→{wide:6} d={row['density']:.2f} block={block[0]:3}×{block[1]:<3} M={m:5}  dense {t_dense:7.3f} ms  "
                          f"inductor {t_inductor:7.3f}  masked {t_masked:7.3f}  effcc {t_effcc:7.3f}  iso-FLOP speed {row['iso_flop_speed']:5.2f}  "
                          f"skip {row['skip_speedup']:5.2f}×  ({row['effcc_tflops']:.0f} vs {row['dense_tflops']:.0f} TFLOP/s, err {err:.1e})", flush=True)  # fmt: skip
    return rows


def model_rows(quick: bool) -> list[dict]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2 if quick else 4, n_embd=1024, n_head=16, vocab_size=32000, n_positions=1024, use_cache=False)
    dense = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 32000, (8, 512))
    variants = {}
    for family in ("wide", "parallel"):
        options = {"family": family, "sparsity": 0.75, "block": (64, 64)}
        sparse = effcc.optimize(dense, (ids[:1, :16],), passes=[("sparse_ift", options)]).model.eval().to(DEVICE, torch.bfloat16)
        frozen = freeze(sparse)
        variants[f"{family}: masked dense, eager (training math)"] = sparse
        variants[f"{family}: frozen, eager"] = frozen
        variants[f"{family}: frozen, inductor"] = torch.compile(frozen)
    dense = dense.to(DEVICE, torch.bfloat16)
    variants = {"dense eager": dense, "dense inductor": torch.compile(dense), **variants}
    ids = ids.to(DEVICE)
    rows = []
    with torch.no_grad():
        for name, model in variants.items():
            out = model(ids).logits.float()
            ms = bench(lambda m=model: m(ids), ms=400)
            rows.append({"variant": name, "ms": ms})
            print(f"{name:45} {ms:8.2f} ms  (logits {'finite' if out.isfinite().all() else 'NOT finite'})", flush=True)
    base = rows[1]["ms"]
    for row in rows:
        row["vs_dense_inductor"] = base / row["ms"]
    print("speed vs dense Inductor (1.0 = as fast): " + ", ".join(f"{r['variant']}: {r['vs_dense_inductor']:.2f}" for r in rows))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--budget-s", type=float, default=420, help="stop adding layer cases after this many seconds")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--skip-layers", action="store_true", help="only the model part")
    args = parser.parse_args()
    device = torch.cuda.get_device_name()
    print(f"device: {device}, torch {torch.__version__}")
    start = time.perf_counter()
    result = {"device": device, "torch": torch.__version__}
    result["layers"] = [] if args.skip_layers else layer_rows(args.quick, start + args.budget_s)
    result["model"] = model_rows(args.quick)
    out = args.out or Path(__file__).parent / "results" / f"sparse_ift_{device.split()[1].lower() if len(device.split()) > 1 else 'gpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out} in {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
