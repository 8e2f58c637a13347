"""Where the time of one prefix-attention forward + backward goes (torch.profiler, CUDA).

    python benchmarks/profile_prefix_attention.py
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from effcc.ops.prefix_attention import PackedLayout, prefix_attention


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    layout = PackedLayout.build([(1024, [256] * 8)], device="cuda")
    n = layout.group_start.shape[0]
    q, k, v = (torch.randn(1, 16, n, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))

    def step():
        out = prefix_attention(q, k, v, *layout.op_inputs())
        out.backward(torch.ones_like(out))

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
