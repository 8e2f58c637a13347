"""Launch effcc's one-token int4 GEMV once at 11008 × 4096 with one fixed configuration, for Nsight
Compute (no autotuning, so that the profiled launch is the kernel itself):

    ncu --kernel-name regex:int4_gemv --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        --section Occupancy --section WarpStateStats --section InstructionStats \\
        python benchmarks/profile_int4_gemv.py

Its SASS, registers and spills: benchmarks/sass_offline.py (no GPU needed).
"""

import torch

from effcc.backends.triton import quantized_linear as kernels
from effcc.ops import quantized_linear as q

n, k, group = 11008, 4096, 128
x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
packed, scales, zeros = q.quantize_weight_int4(torch.randn(n, k, device="cuda"), group)
config = {"BLOCK_N": 16, "GROUPS_PER_STEP": 2, "SPLIT_K": 2, "num_warps": 1, "num_stages": 1}
kernels.int4_linear(x, packed, scales.bfloat16(), zeros, group, None, config=config)
torch.cuda.synchronize()
print(f"launched {config}")
