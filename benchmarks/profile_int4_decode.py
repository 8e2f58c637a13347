"""Launch effcc's int4 decode kernel once for one token at 11008 × 4096 with one fixed configuration,
for Nsight Compute (no autotuning, so that the profiled launch is the kernel itself):

    ncu --kernel-name regex:int4_mma --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        --section Occupancy --section WarpStateStats --section InstructionStats \\
        python benchmarks/profile_int4_decode.py

Its SASS, registers and spills: benchmarks/sass_offline.py (no GPU needed).
"""

import torch

from effcc.backends.triton import quantized_linear as kernels
from effcc.ops import quantized_linear as q

n, k, group = 11008, 4096, 128
x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
packed, scales, zeros = q.quantize_weight_int4(torch.randn(n, k, device="cuda"), group)
config = {"BLOCK_M": 16, "BLOCK_N": 128, "SPLIT_K": 4, "WEIGHTS_AS_A": True, "num_warps": 4, "num_stages": 3}  # the sweep's best here
kernels.int4_linear(x, packed, scales.bfloat16(), zeros, group, None, config=config)
torch.cuda.synchronize()
print(f"launched {config}")
