"""Where the time of one prefix-attention forward + backward goes (torch.profiler, CUDA), per kernel.

    python benchmarks/profile_prefix_attention.py [--shapes 1024x8x256,4096x8x512] [--heads 16] [--head-dim 64]

Prints, for each shape (prefix P × G suffixes × suffix length S, one group), the GPU time of each
kernel per step and the FLOP rate of the whole step (forward 4·visible pairs·D per head, backward 2.5×).
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from effcc.ops.prefix_attention import PackedLayout, prefix_attention


def visible_pairs(prefix: int, groups: int, suffix: int) -> int:
    """(query, key) pairs of one group: the prefix causally, each suffix over the prefix and itself causally."""
    return prefix * (prefix + 1) // 2 + groups * (suffix * prefix + suffix * (suffix + 1) // 2)


def profile_shape(prefix: int, groups: int, suffix: int, heads: int, head_dim: int, steps: int = 10) -> None:
    layout = PackedLayout.build([(prefix, [suffix] * groups)], device="cuda")
    n = layout.group_start.shape[0]
    q, k, v = (torch.randn(1, heads, n, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))

    def step():
        out = prefix_attention(q, k, v, *layout.op_inputs())
        out.backward(torch.ones_like(out))

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / steps / 1e3) for e in prof.key_averages() if e.device_time_total > 0]
    rows.sort(key=lambda r: -r[1])
    kernels = [(name, ms) for name, ms in rows if "kernel" in name]
    total = sum(ms for _, ms in kernels)
    flops = 3.5 * 4 * visible_pairs(prefix, groups, suffix) * head_dim * heads
    print(f"P={prefix} G={groups} S={suffix} (N={n}, H={heads}, D={head_dim}): attention kernels {total:.3f} ms per step, "
          f"{flops / total / 1e9:.0f} TFLOP/s")
    for name, ms in kernels:
        print(f"  {ms:7.3f} ms  {name[:70]}")
    print("  autotuned: " + "; ".join(f"{name} {tuner.best_config}" for name, tuner in chosen_configs(head_dim, n)))


def chosen_configs(head_dim: int, n: int):
    """(kernel name, its autotuner) of the kernels that ran at this head dim and length: best_config is this shape's choice."""
    from effcc.backends.triton import prefix_attention as kernels

    which = (head_dim > 128, n <= kernels.SHORT_SEQUENCE)
    return [("forward", kernels._FORWARD[which]), ("dK/dV", kernels._DKDV[which]), ("dQ", kernels._DQ[which])]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="1024x8x256,4096x8x512,4096x16x256")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args()
    print(torch.cuda.get_device_name())
    for shape in args.shapes.split(","):
        prefix, groups, suffix = (int(x) for x in shape.split("x"))
        profile_shape(prefix, groups, suffix, args.heads, args.head_dim)


if __name__ == "__main__":
    main()
