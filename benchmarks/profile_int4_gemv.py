"""Launch effcc's one-token int4 GEMV kernel once at 4096 × 4096 with fixed configurations,
for Nsight Compute (no autotuning, so that the profiled launch is the kernel itself):

    ncu --kernel-name regex:int4_gemv --section SpeedOfLight --section MemoryWorkloadAnalysis \
        --section Occupancy --section WarpStateStats python benchmarks/profile_int4_gemv.py
"""

import torch

from effcc.backends.triton import quantized_linear as k
from effcc.ops import quantized_linear as q

n = kdim = 4096
group = 128
x = torch.randn(1, kdim, device="cuda", dtype=torch.bfloat16)
packed, scales, zeros = q.quantize_weight_int4(torch.randn(n, kdim, device="cuda"), group)
scales = scales.bfloat16()
out = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
partial = torch.empty(8 * n, device="cuda", dtype=torch.float32)
arrived = torch.zeros(n // 8, device="cuda", dtype=torch.int32)

split, block_n = 4, 64
k._int4_gemv_kernel[(n // block_n, 1, split)](
    x, packed, scales, zeros, scales, out, partial, arrived, 1, n, kdim, 1,
    x.stride(0), packed.stride(0), scales.stride(0), zeros.stride(0), out.stride(0),
    GROUP=group, HAS_BIAS=False, BLOCK_M=1, BLOCK_N=block_n, GROUPS_PER_STEP=2, SPLIT_K=split, num_warps=8, num_stages=1)
torch.cuda.synchronize()
print("launched")
