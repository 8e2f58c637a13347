"""Fairy2i one-token GEMV on one GPU: effcc's two kernels (multiplication-free, tensor cores) vs bf16 cuBLAS, side by side.

    python benchmarks/bench_fairy2i.py [--stages 1,2,3] [--tensor-cores] [--floor] [--out FILE]

Medians of CUDA-graph replays cycling through enough weight copies to overflow L2 (as
bench_quantized.py); achieved bandwidth of the codes and scales as a share of a measured copy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from triton.runtime.errors import OutOfResources

sys.path.insert(0, str(Path(__file__).parent))
from bench_quantized import copies_for, copy_bandwidth, time_rotating


def bench(out_features: int, in_features: int, stages: int, copy_bw: float, floor: bool = False, tensor_cores: bool = False) -> dict:
    from effcc.backends.triton import fairy2i as kernels
    from effcc.ops import complex_linear as cl

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, in_features, device="cuda", dtype=torch.bfloat16, generator=g)
    weights = [torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(copies_for(out_features * in_features * 2))]
    packed = []
    for w in weights:
        a, b = cl.to_widely_linear(w)
        (ca, sa, _), (cb, sb, _) = cl.quantize_fairy2i(a, stages), cl.quantize_fairy2i(b, stages)
        packed.append((cl.pack_codes(torch.stack((ca, cb), 1)), torch.stack((sa, sb), 1).contiguous()))
    nbytes = sum(t.numel() * t.element_size() for t in packed[0])
    packed = packed * max(1, copies_for(nbytes) // len(packed))
    row = {"out": out_features, "in": in_features, "stages": stages, "bytes": nbytes}
    row["bf16_cublas_ms"] = time_rotating([lambda w=w: x @ w.t() for w in weights])
    want = cl.fairy2i_linear_reference(x.double(), *packed[0], None)
    for name, on_tensor_cores in (("multiplication_free", False), ("tensor_cores", True)):  # both kernels, timed and checked
        row[f"{name}_ms"] = time_rotating([lambda p=p, t=on_tensor_cores: kernels.fairy2i_linear(x, *p, None, tensor_cores=t) for p in packed])
        got = kernels.fairy2i_linear(x, *packed[0], None, tensor_cores=on_tensor_cores)
        row[f"{name}_max_rel_error"] = ((got.double() - want).abs().max() / want.abs().max()).item()
    default = "tensor_cores" if kernels.on_tensor_cores_by_default(x.dtype, stages) else "multiplication_free"
    row["effcc_ms"], row["max_rel_error_vs_reference"] = row[f"{default}_ms"], row[f"{default}_max_rel_error"]
    row["speedup_vs_bf16"] = row["bf16_cublas_ms"] / row["effcc_ms"]
    row["bandwidth_share_of_copy"] = nbytes / (row["effcc_ms"] * 1e-3) / copy_bw
    if tensor_cores:  # each configuration of the tensor-core kernel timed and checked (the autotuner's come from these)
        row["tensor_core_configs"] = []
        for config in kernels.TENSOR_CORE_CONFIGS:
            try:
                got = kernels.fairy2i_linear(x, *packed[0], None, config=config)
                ms = time_rotating([lambda p=p, c=config: kernels.fairy2i_linear(x, *p, None, config=c) for p in packed], rep_ms=100)
            except OutOfResources as exc:
                row["tensor_core_configs"].append({**config, "skipped": str(exc)[:80]})
                continue
            error = ((got.double() - want).abs().max() / want.abs().max()).item()
            row["tensor_core_configs"].append({**config, "ms": ms, "speedup_vs_bf16": row["bf16_cublas_ms"] / ms, "max_rel_error": error})
        best = min((c for c in row["tensor_core_configs"] if "ms" in c), key=lambda c: c["ms"])
        print(f"  tensor cores, best: {best['ms'] * 1e3:.1f} us -> {best['speedup_vs_bf16']:.2f}x, error {best['max_rel_error']:.1e} "
              f"{ {k: v for k, v in best.items() if k.isupper() or k.startswith('num_')} }", flush=True)
    if floor:  # a kernel that only reads as many bytes: the best speed-up a one-launch kernel could reach
        from sweep_int4_decode import read_floor

        words_per_row = nbytes // (4 * out_features)
        row["read_floor"] = read_floor(out_features, 8 * words_per_row, row["bf16_cublas_ms"], copy_bw, g)
    print(f"Fairy2i {stages} stage(s) {out_features}x{in_features}: bf16 {row['bf16_cublas_ms'] * 1e3:.1f} us, effcc {row['effcc_ms'] * 1e3:.1f} us "
          f"-> {row['speedup_vs_bf16']:.2f}x, {100 * row['bandwidth_share_of_copy']:.0f}% of copy bandwidth, error {row['max_rel_error_vs_reference']:.1e}; "
          f"multiplication-free {row['multiplication_free_ms'] * 1e3:.1f} us, tensor cores {row['tensor_cores_ms'] * 1e3:.1f} us", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default="2")
    parser.add_argument("--tensor-cores", action="store_true", help="also time each configuration of the tensor-core kernel")
    parser.add_argument("--floor", action="store_true", help="also time a kernel that only reads as many bytes (the bound)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fairy2i_gemv.json")
    args = parser.parse_args()
    copy_bw = copy_bandwidth()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_bandwidth_gb_s": copy_bw / 1e9, "rows": []}
    for stages in [int(s) for s in args.stages.split(",")]:
        for out_features, in_features in ((4096, 4096), (11008, 4096), (4096, 11008)):  # out × in
            results["rows"].append(bench(out_features, in_features, stages, copy_bw, args.floor, args.tensor_cores))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
