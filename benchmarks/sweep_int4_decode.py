"""Configurations of effcc's int4 decode kernel (1-16 tokens), swept on the GPU: how its autotuning list
was chosen, and how fast a kernel could be at all.

    python benchmarks/sweep_int4_decode.py [--tokens 1,4,16] [--quick] [--floor] [--out benchmarks/results/int4_sweep.json]

For each LLaMA-7B linear shape (out × in: 4096 × 4096, 11008 × 4096, 4096 × 11008; groups of 128,
bfloat16 activations and scales), each token count and each configuration (tile rows, splits of the
input dimension, warps, pipeline stages, the codes as wgmma's register operand or the second one):
the time of one call, as a CUDA graph cycling through enough weight copies to overflow L2 (every
call reads its weights from device memory), its achieved weight bandwidth as a share of a
device-to-device copy, its speed-up over bf16 cuBLAS on the same shape, and its largest error
against the float64 reference.  --floor adds, per shape, a kernel that only reads the packed weights,
and an empty launch: the best speed-up over bf16 that a one-launch kernel could reach.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import triton
import triton.language as tl
from bench_quantized import copies_for, copy_bandwidth, time_rotating
from triton.runtime.errors import OutOfResources

from effcc.backends.triton import quantized_linear as kernels
from effcc.ops import quantized_linear as q

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
GROUP = 128


def mma_configurations(splits=(1, 2, 4, 8, 16), stages=(3, 4)) -> list[dict]:
    """One 16-row tile of tokens.  The codes as wgmma's register operand need 64 rows a warp group; as
    the second operand, tiles of 32 to 128 rows on 4 warps."""
    out = []
    for block_n, warps, split, stage_count in itertools.product((32, 64, 128, 256), (4, 8), splits, stages):
        base = {"BLOCK_M": 16, "BLOCK_N": block_n, "SPLIT_K": split, "num_warps": warps, "num_stages": stage_count}
        if block_n >= 16 * warps and (block_n < 256 or warps == 8):
            out.append({**base, "WEIGHTS_AS_A": True})
        if warps == 4 and block_n <= 128:
            out.append({**base, "WEIGHTS_AS_A": False})
    return out


@triton.jit
def _stream_words(QW, OUT, N, WORDS, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    """Read every 32-bit word of [N, WORDS] once (XOR per row into OUT): the cost of the weight stream
    alone, with a grid like the decode kernels' (rows × splits of the input dimension)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    per_split = tl.cdiv(WORDS, tl.num_programs(2))
    start = tl.program_id(2) * per_split
    acc = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.int32)
    for w0 in range(start, tl.minimum(start + per_split, WORDS), BLOCK_W):
        cols = w0 + tl.arange(0, BLOCK_W)
        acc ^= tl.load(QW + rows[:, None].to(tl.int64) * WORDS + cols[None, :], mask=(rows < N)[:, None] & (cols < WORDS)[None, :], other=0)
    tl.store(OUT + tl.program_id(2) * N + rows, tl.xor_sum(acc, axis=1), mask=rows < N)


def read_floor(n: int, k: int, bf16_ms: float, copy_bw: float, generator) -> dict:
    """The fastest of a few tilings of _stream_words over the packed weights (rotated copies, as the
    kernels are timed), and an empty launch: how fast a 1-token kernel could be if its arithmetic
    were free, so the best speed-up over bf16 this launch design allows."""
    words = [torch.randint(-2**31, 2**31 - 1, (n, k // 8), dtype=torch.int32, device="cuda", generator=generator)
             for _ in range(copies_for(n * k // 2))]
    out = torch.empty(16 * n, dtype=torch.int32, device="cuda")
    best = None
    for block_n, block_w, split, warps in itertools.product((16, 64), (64, 128), (2, 4, 8, 16), (4, 8)):
        meta = {"BLOCK_N": block_n, "BLOCK_W": block_w, "num_warps": warps}
        grid = (triton.cdiv(n, block_n), 1, split)
        ms = time_rotating([lambda w=w, grid=grid, meta=meta: _stream_words[grid](w, out, n, k // 8, **meta) for w in words], rep_ms=100)
        if best is None or ms < best["ms"]:
            best = {"ms": ms, "BLOCK_N": block_n, "BLOCK_W": block_w, "SPLIT": split, "num_warps": warps}
    empty_ms = time_rotating([lambda: _stream_words[(1, 1, 1)](words[0], out, 0, 0, BLOCK_N=16, BLOCK_W=64)] * 8, rep_ms=100)
    floor = {**best, "bandwidth_share_of_copy": n * k / 2 / (best["ms"] * 1e-3) / copy_bw,
             "speedup_bound_vs_bf16": bf16_ms / best["ms"], "empty_launch_ms": empty_ms}
    print(f"  read floor: {best['ms'] * 1e3:.1f} us ({100 * floor['bandwidth_share_of_copy']:.0f}% of copy), "
          f"bound {floor['speedup_bound_vs_bf16']:.2f}x over bf16; empty launch {empty_ms * 1e3:.1f} us", flush=True)
    return floor


def random_int4_weights(n: int, k: int, copies: int, generator) -> list[tuple]:
    """Uniform codes, zero points and positive scales: the kernels' cost does not depend on the values."""
    out = []
    for _ in range(copies):
        packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda", generator=generator)
        scales = (torch.rand(n, k // GROUP, device="cuda", generator=generator) * 0.02 + 0.001).bfloat16()
        zeros = torch.randint(0, 16, (n, k // GROUP), dtype=torch.uint8, device="cuda", generator=generator)
        out.append((packed, scales, zeros))
    return out


def sweep_shape(n: int, k: int, tokens: int, copy_bw: float, generator, floor: bool = False, quick: bool = False) -> dict:
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16, generator=generator)
    dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=generator) for _ in range(copies_for(n * k * 2))]
    bf16_ms = time_rotating([lambda w=w, x=x: x @ w.t() for w in dense])
    del dense
    int4_bytes = n * k // 2 + 3 * n * (k // GROUP)
    weights = random_int4_weights(n, k, copies_for(int4_bytes), generator)
    packed, scales, zeros = weights[0]
    want = q.w4a16_linear_reference(x.double(), packed, scales.double(), zeros, GROUP, None)
    shape = {"M": tokens, "N": n, "K": k, "bf16_cublas_ms": bf16_ms, "weight_bytes_int4": int4_bytes, "configs": []}
    configs = mma_configurations(splits=(2, 4, 8), stages=(3,)) if quick else mma_configurations()
    for config in configs:
        try:
            got = kernels.int4_linear(x, *weights[0], GROUP, None, config=config)
            error = ((got.double() - want).abs().max() / want.abs().max()).item()
            ms = time_rotating([lambda w=w, c=config: kernels.int4_linear(x, *w, GROUP, None, config=c) for w in weights], rep_ms=100)
        except OutOfResources as exc:
            shape["configs"].append({**config, "skipped": str(exc)[:80]})
            continue
        except Exception as exc:  # noqa: BLE001 (a configuration that fails to compile or run is reported; the sweep goes on)
            print(f"  failed: {config}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            shape["configs"].append({**config, "failed": f"{type(exc).__name__}: {str(exc)[:200]}"})
            continue
        shape["configs"].append({**config, "ms": ms, "speedup_vs_bf16": bf16_ms / ms,
                                 "bandwidth_share_of_copy": int4_bytes / (ms * 1e-3) / copy_bw, "max_rel_error": error})
    if floor:
        shape["read_floor"] = read_floor(n, k, bf16_ms, copy_bw, generator)
    timed = sorted((c for c in shape["configs"] if "ms" in c), key=lambda c: c["ms"])
    print(f"M={tokens} {n}x{k}: bf16 {bf16_ms * 1e3:.1f} us; best int4:", flush=True)
    for c in timed[:6]:
        knobs = " ".join(f"{key}={value}" for key, value in c.items() if key.isupper() or key == "num_warps")
        print(f"  {c['ms'] * 1e3:6.1f} us  {c['speedup_vs_bf16']:.2f}x  {100 * c['bandwidth_share_of_copy']:.0f}% of copy  "
              f"err {c['max_rel_error']:.1e}  {knobs}", flush=True)
    return shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="1,4,16", help="comma-separated token counts, 1 to 16")
    parser.add_argument("--floor", action="store_true", help="also time a kernel that only reads the packed weights (the bound)")
    parser.add_argument("--quick", action="store_true", help="only 2, 4 or 8 splits and 3 stages (where the winners were on an H200)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "int4_sweep.json")
    args = parser.parse_args()
    copy_bw = copy_bandwidth()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "copy_bandwidth_gb_s": copy_bw / 1e9, "group_size": GROUP, "shapes": []}
    print(f"{results['device']}: copy {copy_bw / 1e9:.0f} GB/s", flush=True)
    generator = torch.Generator(device="cuda").manual_seed(0)
    for tokens in (int(t) for t in args.tokens.split(",")):
        for n, k in SHAPES:
            results["shapes"].append(sweep_shape(n, k, tokens, copy_bw, generator, args.floor, args.quick))
            args.out.write_text(json.dumps(results, indent=2))  # after every shape: a run cut short keeps what it measured
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
