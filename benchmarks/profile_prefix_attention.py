"""Where the time of one prefix-attention forward + backward goes (torch.profiler, CUDA), per kernel.

    python benchmarks/profile_prefix_attention.py [--shapes 1024x8x256,4096x8x512] [--heads 16] [--head-dim 64]
    git show main:effcc/backends/triton/prefix_attention.py > /tmp/main_kernels.py
    python benchmarks/profile_prefix_attention.py --against /tmp/main_kernels.py

Prints, for each shape (prefix P × G suffixes × suffix length S, one group), the GPU time of each
kernel per step, the FLOP rate of the whole step (forward 4·visible pairs·D per head, backward 2.5×)
and the tiles the autotuner chose.  --against FILE: another version of the kernels' module
(effcc/backends/triton/prefix_attention.py, e.g. from another commit) profiled on the same inputs in
the same process, side by side, so that a change is timed against its baseline on one GPU; repeat it
to add more versions (each labelled by its file name).
"""

import argparse
import importlib.util
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from effcc.backends.triton import prefix_attention as current_kernels
from effcc.ops.prefix_attention import PackedLayout


def visible_pairs(prefix: int, groups: int, suffix: int) -> int:
    """(query, key) pairs of one group: the prefix causally, each suffix over the prefix and itself causally."""
    return prefix * (prefix + 1) // 2 + groups * (suffix * prefix + suffix * (suffix + 1) // 2)


def load_kernels(path: Path, index: int = 0):
    """Another version of the kernels' module, as a module of effcc.backends.triton (its relative imports resolve)."""
    spec = importlib.util.spec_from_file_location(f"effcc.backends.triton._prefix_attention_version{index}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kernel_times(kernels, q, k, v, layout, steps: int = 10) -> list[tuple[str, float]]:
    """(kernel, ms per step) of `kernels`' forward + backward, called directly (no op, no autograd)."""
    group_start, prefix_end, segment_start, visible_until = layout.op_inputs()
    scale = q.shape[-1] ** -0.5
    grad_out = torch.ones_like(q)

    def step():
        out, lse = kernels.forward(q, k, v, group_start, prefix_end, segment_start, scale)
        kernels.backward(grad_out, q, k, v, out, lse, group_start, prefix_end, segment_start, visible_until, scale)

    for _ in range(5):  # autotuning, then warm
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / steps / 1e3) for e in prof.key_averages() if e.device_time_total > 0 and "kernel" in e.key]
    return sorted(rows, key=lambda r: -r[1])


def chosen_configs(kernels, head_dim: int, n: int) -> str:
    """The tiles each kernel's autotuner chose for this head dim and length (older versions key by head dim alone)."""
    which = (head_dim > 128, n <= getattr(kernels, "SHORT_SEQUENCE", 0))
    tuners = {"forward": "_FORWARD", "dK/dV": "_DKDV", "dQ": "_DQ", "backward": "_BACKWARD"}
    chosen = {}
    for name, attribute in tuners.items():
        table = getattr(kernels, attribute, {})  # {(wide head, short sequence): tuner}, or [narrow, wide] in older versions
        tuner = table.get(which) if isinstance(table, dict) else table[which[0]]
        if getattr(tuner, "best_config", None) is not None:  # a version may not run every kernel it defines
            chosen[name] = tuner.best_config
    return "; ".join(f"{name} {config}" for name, config in chosen.items())


def profile_shape(prefix: int, groups: int, suffix: int, heads: int, head_dim: int, versions: dict) -> None:
    layout = PackedLayout.build([(prefix, [suffix] * groups)], device="cuda")
    n = layout.group_start.shape[0]
    q, k, v = (torch.randn(heads, n, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flops = 3.5 * 4 * visible_pairs(prefix, groups, suffix) * head_dim * heads
    times = {label: kernel_times(kernels, q, k, v, layout) for label, kernels in versions.items()}
    totals = {label: sum(ms for _, ms in rows) for label, rows in times.items()}
    print(f"P={prefix} G={groups} S={suffix} (N={n}, H={heads}, D={head_dim}), ms per step: " + ", ".join(
        f"{label} {total:.3f} ({flops / total / 1e9:.0f} TFLOP/s)" for label, total in totals.items()))
    names = list(dict.fromkeys(name for rows in times.values() for name, _ in rows))
    for name in names:
        print("  " + "  ".join(f"{dict(rows).get(name, 0.0):7.3f}" for rows in times.values()) + f"  {name[:70]}")
    for label, kernels in versions.items():
        print(f"  autotuned ({label}): {chosen_configs(kernels, head_dim, n)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="1024x8x256,4096x8x512,4096x16x256")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--against", type=Path, action="append", default=[],
                        help="another version of effcc/backends/triton/prefix_attention.py, profiled side by side (repeatable)")
    args = parser.parse_args()
    print(torch.cuda.get_device_name())
    versions = {"this": current_kernels}
    for index, path in enumerate(args.against):
        versions[path.stem] = load_kernels(path, index)
    for shape in args.shapes.split(","):
        prefix, groups, suffix = (int(x) for x in shape.split("x"))
        profile_shape(prefix, groups, suffix, args.heads, args.head_dim, versions)


if __name__ == "__main__":
    main()
