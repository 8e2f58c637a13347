"""Tiles, warps and pipeline stages of effcc's RMSNorm kernels, swept on the GPU (how the tuned configurations were chosen).

    python benchmarks/sweep_rms_norm_tiles.py [--out benchmarks/results/rms_norm_tiles.json]
    python benchmarks/sweep_rms_norm_tiles.py --plain-and-stages --out benchmarks/results/rms_norm_stages.json
    python benchmarks/sweep_rms_norm_tiles.py --backward-op --out benchmarks/results/rms_norm_bwd_op.json

For each width, 128 MiB bf16 tensors: the fused add + RMSNorm forward and the backward (with the
stream's gradient, as in a Pre-LN block), as a share of the copy bandwidth measured alongside.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import torch
from triton.runtime.errors import OutOfResources
from triton.testing import do_bench_cudagraph

from effcc.backends.triton import rms_norm as kernels


def timed(fn, *args, **kwargs) -> float:
    """Median milliseconds of fn(*args, **kwargs), replayed from a CUDA graph (so the launch is not timed)."""
    return do_bench_cudagraph(lambda: fn(*args, **kwargs), rep=100, return_mode="median")


def width_case(d: int, n: int | None = None) -> SimpleNamespace:
    """bf16 tensors of n rows of width d (x, r, dy, ds; 128 MiB each by default), γ, β, an rstd, and the copy
    bandwidth (GB/s) measured now."""
    n = n or 2**26 // d
    x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    r, dy, ds = (torch.randn_like(x) for _ in range(3))
    w = (1 + 0.1 * torch.randn(d, device="cuda")).bfloat16()
    b = (0.1 * torch.randn(d, device="cuda")).bfloat16()
    rstd = torch.rand(n, device="cuda") + 0.5
    elem = x.numel() * x.element_size()
    copy = 2 * elem / timed(torch.empty_like(x).copy_, x) / 1e6
    return SimpleNamespace(x=x, r=r, dy=dy, ds=ds, w=w, b=b, rstd=rstd, elem=elem, copy=copy)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/rms_norm_tiles.json")
    parser.add_argument("--backward-programs", action="store_true", help="backward only: also sweep programs per SM (2-16)")
    parser.add_argument(
        "--plain-and-stages",
        action="store_true",
        help="the forward without residual (its own tiles), and the backward with software-pipelined row steps",
    )
    parser.add_argument(
        "--backward-op", action="store_true", help="the backward as the model calls it (kernel, then dγ, dβ gathered)"
    )
    parser.add_argument("--widths", type=int, nargs="+", default=[512, 1024, 2048, 4096], help="with --backward-op")
    parser.add_argument("--model-shapes", action="store_true", help="forward tiles at models' sizes, against Inductor's kernels")
    args = parser.parse_args()
    if args.model_shapes:
        return sweep_model_shapes(args.out)
    if args.backward_op:
        return sweep_backward_op(args.out, args.widths)
    if args.backward_programs:
        return sweep_backward_programs(args.out)
    if args.plain_and_stages:
        return sweep_plain_forward_and_stages(args.out)
    rows = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for d in (512, 1024, 2048, 4096):
        case = width_case(d)
        x, r, dy, ds, w, b, rstd, elem, copy = case.x, case.r, case.dy, case.ds, case.w, case.b, case.rstd, case.elem, case.copy
        for tile in (1024, 2048, 4096, 8192, 16384):
            for warps in (2, 4, 8, 16):
                fwd = timed(kernels.forward, x, r, w, b, 1e-5, tile=tile, warps=warps)
                bwd = timed(kernels.backward, dy, x, w, rstd, ds, True, sms, per_sm=4, tile=tile, warps=warps)
                row = {
                    "d": d,
                    "tile": tile,
                    "warps": warps,
                    "fwd_of_copy": 4 * elem / fwd / 1e6 / copy,
                    "bwd_of_copy": 4 * elem / bwd / 1e6 / copy,
                }
                rows.append(row)
        best_f = max((r for r in rows if r["d"] == d), key=lambda r: r["fwd_of_copy"])
        best_b = max((r for r in rows if r["d"] == d), key=lambda r: r["bwd_of_copy"])
        print(f"d={d}: copy {copy:.0f} GB/s; best fwd {best_f}; best bwd {best_b}", flush=True)
    for tile in (1024, 2048, 4096, 8192, 16384):
        for kind in ("fwd", "bwd"):
            worst = min(
                max(r[f"{kind}_of_copy"] for r in rows if r["d"] == d and r["tile"] == tile) for d in (512, 1024, 2048, 4096)
            )
            print(f"tile {tile:6} {kind}: worst width, best warps: {100 * worst:.0f}% of copy")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


def sweep_backward_programs(out: str) -> None:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for d in (512, 1024, 2048, 4096):
        case = width_case(d)
        x, dy, ds, w, rstd, elem, copy = case.x, case.dy, case.ds, case.w, case.rstd, case.elem, case.copy
        for per_sm in (2, 4, 8, 16):
            for tile in (1024, 2048, 4096):
                for warps in (2, 4, 8, 16):
                    ms = timed(kernels.backward, dy, x, w, rstd, ds, True, sms, per_sm=per_sm, tile=tile, warps=warps)
                    rows.append(
                        {"d": d, "per_sm": per_sm, "tile": tile, "warps": warps, "bwd_of_copy": 4 * elem / ms / 1e6 / copy}
                    )
        best = sorted((r for r in rows if r["d"] == d), key=lambda r: -r["bwd_of_copy"])[:3]
        print(f"d={d}: {[(r['per_sm'], r['tile'], r['warps'], round(100 * r['bwd_of_copy'])) for r in best]}", flush=True)
    Path(out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


def sweep_plain_forward_and_stages(out: str) -> None:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for d in (512, 1024, 2048, 4096):
        case = width_case(d)
        x, dy, ds, w, b, rstd, elem, copy = case.x, case.dy, case.ds, case.w, case.b, case.rstd, case.elem, case.copy
        for tile in (2048, 4096, 8192, 16384, 32768):
            for warps in (4, 8, 16):
                ms = timed(kernels.forward, x, None, w, b, 1e-5, tile=tile, warps=warps)
                rows.append({"d": d, "kernel": "fwd", "tile": tile, "warps": warps, "of_copy": 2 * elem / ms / 1e6 / copy})
        for stages in (1, 2, 3):
            for per_sm in (1, 2, 4, 8):
                for tile in (2048, 4096, 8192):
                    for warps in (4, 8):
                        ms = timed(
                            kernels.backward, dy, x, w, rstd, ds, True, sms, per_sm=per_sm, tile=tile, warps=warps, stages=stages
                        )
                        row = {"d": d, "kernel": "bwd", "stages": stages, "per_sm": per_sm, "tile": tile, "warps": warps}
                        rows.append({**row, "of_copy": 4 * elem / ms / 1e6 / copy})
        for kind in ("fwd", "bwd"):
            best = sorted((r for r in rows if r["d"] == d and r["kernel"] == kind), key=lambda r: -r["of_copy"])[:3]
            print(f"d={d} {kind} (copy {copy:.0f} GB/s): {best}", flush=True)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


def sweep_backward_op(out: str, widths=(512, 1024, 2048, 4096)) -> None:
    """The backward as the model calls it (kernel, then dγ, dβ gathered by atomics or by summing partials)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for d in widths:
        case = width_case(d)
        x, dy, ds, w, rstd, elem, copy = case.x, case.dy, case.ds, case.w, case.rstd, case.elem, case.copy
        tuned = kernels.backward_config(d)
        configs = [(*tuned[:4], tuned[4], False)]  # the tuned kernel with partials summed afterwards: the old way
        for per_sm in (1, 2, 4):
            for tile in (4096, 8192, 16384):
                for warps in (4, 8):
                    for stages in (3, 4):
                        configs += [(per_sm, tile, warps, stages, at_end, True) for at_end in (False, True)]
        first = len(rows)
        for per_sm, tile, warps, stages, at_end, atomic in configs:
            knobs = {"per_sm": per_sm, "tile": tile, "warps": warps, "stages": stages, "sum_at_end": at_end, "atomic": atomic}
            try:
                ms = timed(kernels.backward, dy, x, w, rstd, ds, True, sms, **knobs)
            except (RuntimeError, OutOfResources) as error:  # out of registers or shared memory: skip that point
                print(f"d={d} {knobs}: {type(error).__name__}", flush=True)
                continue
            rows.append({"d": d, **knobs, "of_copy": 4 * elem / ms / 1e6 / copy})
        best = sorted((r for r in rows if r["d"] == d), key=lambda r: -r["of_copy"])[:3]
        print(f"d={d} bwd op (copy {copy:.0f} GB/s): old way {rows[first]}; best {best}", flush=True)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


MODEL_SHAPES = (  # (name, width, rows): batches of real models, and the 128 MiB tensors of the other sweeps
    ("ViT-L/16 32x197", 1024, 32 * 197),
    ("GPT-2-medium 8x1024", 1024, 8192),
    ("d=512 4x4096", 512, 16384),
    ("d=2048 8x1024", 2048, 8192),
    ("d=4096 8x1024", 4096, 8192),
    *((f"128 MiB d={d}", d, 2**26 // d) for d in (512, 1024, 2048, 4096)),
)


def sweep_model_shapes(out: str) -> None:
    """Forward tiles, and the backward's programs per SM, at the sizes models run as well as at 128 MiB, against
    Inductor's kernels for the same math: small tensors fill few waves of programs, unlike large ones.  Ends with,
    per width, the forward tile whose worst shape is closest to that shape's best."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    compiled_add_norm = torch.compile(lambda x, r, w, b: (torch.nn.functional.rms_norm(x + r, [x.shape[-1]], w, 1e-5) + b, x + r))
    compiled_norm = torch.compile(lambda x, w, b: torch.nn.functional.rms_norm(x, [x.shape[-1]], w, 1e-5) + b)
    rows = []
    for name, d, n in MODEL_SHAPES:
        case = width_case(d, n)
        x, r, dy, ds, w, b, rstd, elem, copy = case.x, case.r, case.dy, case.ds, case.w, case.b, case.rstd, case.elem, case.copy
        shape = {"shape": name, "d": d, "rows": n}
        inductor = {"fused": timed(compiled_add_norm, x, r, w, b), "plain": timed(compiled_norm, x, w, b)}
        for kind, moved in (("fused", 4), ("plain", 2)):
            residual = r if kind == "fused" else None
            for tile in (1024, 2048, 4096, 8192, 16384):
                for warps in (2, 4, 8, 16):
                    if tile < d or (warps == 16 and d < 2048) or (warps == 2 and d > 2048):
                        continue
                    ms = timed(kernels.forward, x, residual, w, b, 1e-5, tile=tile, warps=warps)
                    row = {**shape, "kind": kind, "tile": tile, "warps": warps, "programs": -(-n // (tile // d))}
                    rows.append({**row, "us": 1e3 * ms, "of_copy": moved * elem / ms / 1e6 / copy, "vs_inductor": inductor[kind] / ms})
            ms = timed(kernels.forward, x, residual, w, b, 1e-5)
            rows.append({**shape, "kind": f"{kind} tuned", "us": 1e3 * ms, "of_copy": moved * elem / ms / 1e6 / copy, "vs_inductor": inductor[kind] / ms})
            print(f"{name} {kind}: Inductor {1e3 * inductor[kind]:.1f} us, tuned {1e3 * ms:.1f} us ({inductor[kind] / ms:.3f}x)", flush=True)
        for per_sm in (None, 1, 2, 4):
            ms = timed(kernels.backward, dy, x, w, rstd, ds, True, sms, per_sm=per_sm)
            rows.append({**shape, "kind": "backward", "per_sm": per_sm or "tuned", "us": 1e3 * ms, "of_copy": 4 * elem / ms / 1e6 / copy})
        print(f"{name} backward: {[(q['per_sm'], round(q['us'], 1)) for q in rows[-4:]]}", flush=True)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    for d in sorted({d for _, d, _ in MODEL_SHAPES}):
        for kind in ("fused", "plain"):
            mine = [q for q in rows if q["d"] == d and q["kind"] == kind]
            fastest = {name: min(q["us"] for q in mine if q["shape"] == name) for name in {q["shape"] for q in mine}}
            configs = {(q["tile"], q["warps"]) for q in mine}
            worst = {c: min(fastest[q["shape"]] / q["us"] for q in mine if (q["tile"], q["warps"]) == c) for c in configs}
            tile, warps = max(worst, key=worst.get)
            print(f"d={d} {kind}: tile {tile}, warps {warps}: worst shape at {100 * worst[tile, warps]:.1f}% of its best", flush=True)


if __name__ == "__main__":
    main()
