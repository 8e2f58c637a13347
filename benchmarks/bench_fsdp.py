"""effcc's rewritten ~1B decoders trained under FSDP2: 2 GPUs vs 1, side by side.

    python benchmarks/bench_fsdp.py [--gpus 2] [--out benchmarks/results/fsdp_h200x2.json]
    python benchmarks/bench_fsdp.py --tiny --cpu        # the same on 2 CPU processes (gloo), tiny models

Runs itself under torchrun twice, on 1 process and on --gpus processes, and prints the two side by side:
1. A Pre-RMSNorm training step (AdamW, bf16) of a Pythia-1B-shaped GPT-NeoX (d=2048, 16 layers, parallel
   residual): the original model (LayerNorm, Hugging Face eager) and effcc's ln_to_rmsnorm(trainable)
   graph run as ATen ops, and the same with causal_attention (the traced causal mask → is_causal, so
   SDPA takes its flash kernel) and its norms on effcc's Triton RMSNorm kernels (CUDA only);
   each cut into blocks and sharded by `effcc.distributed.fully_shard_blocks`.  No torch.compile:
   compiling each block under FSDP2 would compile every block's graph separately.  Global batch
   8 × 2048 tokens, split over the ranks.
2. A shared-prefix GRPO step of a ~1.1B LLaMA-shaped decoder through `effcc.shared_prefix`: 4 groups of
   8 answers (prompt 1024, answers 256 tokens), the groups split over the ranks (data parallel).
One process trains the plain model (no FSDP); several shard it.  Reported per setting: median step
time, tokens per second, peak GPU memory of the busiest rank, and the first step's loss (the same
data on 1 and N ranks, so it must agree to bf16 rounding).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import effcc
from effcc.backends.triton.lowering import lower_rms_norms
from effcc.distributed import fully_shard_blocks

STEPS, WARMUP = 6, 2


# ---- the models -------------------------------------------------------------------------------------
TINY = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4, "vocab_size": 512}


def size(tiny: bool, intermediate: int, heads: int, vocab: int) -> dict:
    """TINY, or a ~1B decoder: 16 layers of width 2048."""
    full = {
        "num_hidden_layers": 16,
        "hidden_size": 2048,
        "intermediate_size": intermediate,
        "num_attention_heads": heads,
        "vocab_size": vocab,
    }
    return TINY if tiny else full


def pythia_like(tiny: bool):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(
        **size(tiny, 8192, 8, 50304), use_parallel_residual=True, use_cache=False, max_position_embeddings=4096
    )
    return GPTNeoXForCausalLM(config)


def llama_like(tiny: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**size(tiny, 5632, 16, 32000), max_position_embeddings=8192, use_cache=False))


# ---- timing -----------------------------------------------------------------------------------------
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step, device) -> dict:
    """Median step time over STEPS after WARMUP, peak memory, and the first step's loss."""
    import time

    gc.collect()  # what building the variant left behind (effcc's float64 checks) is not the step's
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    losses, times = [], []
    for i in range(WARMUP + STEPS):
        sync(device)
        start = time.perf_counter()
        losses.append(step())
        sync(device)
        if i >= WARMUP:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"step_ms": 1e3 * sorted(times)[len(times) // 2], "peak_GiB": peak, "first_loss": losses[0]}


def everywhere(value: float, op) -> float:
    """A number reduced over the ranks (max of peaks and times, mean of losses)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.item() if op == "max" else t.item() / dist.get_world_size()


def measured_on_every_rank(row: dict, step, device) -> dict:
    """`row` with the step's figures: the slowest rank's time, the busiest rank's memory, the mean loss."""
    row.update(measure(step, device))
    row["step_ms"] = everywhere(row["step_ms"], "max")
    row["first_loss"] = everywhere(row["first_loss"], "mean")
    if row["peak_GiB"] is not None:
        row["peak_GiB"] = everywhere(row["peak_GiB"], "max")
    row["tokens_per_s"] = row["tokens_per_step"] / row["step_ms"] * 1e3
    return row


# ---- 1. Pre-RMSNorm training step ----------------------------------------------------------------------
def pre_rmsnorm_rows(args, device, rank, world) -> list[dict]:
    batch, tokens = (8, 128) if args.tiny else (8, 2048)
    vocab = 512 if args.tiny else 50304
    ids = torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(1)).to(device)
    mine = ids[rank * batch // world : (rank + 1) * batch // world]
    rows = []
    passes = {  # variant → effcc passes (and whether its norms go to effcc's Triton kernels)
        "original": None,
        "effcc_pre_rmsnorm": ([("ln_to_rmsnorm", {"trainable": True})], False),
        "effcc_pre_rmsnorm_causal": ([("ln_to_rmsnorm", {"trainable": True}), "causal_attention"], device.type == "cuda"),
    }
    for variant, chosen in passes.items():
        model = pythia_like(args.tiny).to(device, torch.bfloat16).eval()  # eval: dropout off, as effcc captures
        if chosen is not None:
            model = effcc.optimize(model, (ids[:2, :16],), passes=chosen[0]).model
            if chosen[1]:  # effcc's fused RMSNorm (+bias) kernels, forward and backward
                lower_rms_norms(model)
        if world > 1:
            model = fully_shard_blocks(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step(model=model, optimizer=optimizer):
            logits = model(mine).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), mine[:, 1:].flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()

        row = {"workload": "pre_rmsnorm_train_step", "variant": variant, "ranks": world, "tokens_per_step": batch * tokens}
        rows.append(measured_on_every_rank(row, step, device))
        del model, optimizer, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ---- 2. shared-prefix GRPO step ------------------------------------------------------------------------
def grouped_rows(args, device, rank, world) -> list[dict]:
    groups, answers, prefix_len, suffix_len = (4, 4, 32, 16) if args.tiny else (4, 8, 1024, 256)
    vocab = 512 if args.tiny else 32000
    g = torch.Generator().manual_seed(2)
    data = [
        (torch.randint(0, vocab, (prefix_len,), generator=g).to(device), torch.randint(0, vocab, (answers, suffix_len), generator=g).to(device),
         torch.randn(answers, 1, generator=g).to(device))
        for _ in range(groups)
    ]  # fmt: skip
    mine = data[rank * groups // world : (rank + 1) * groups // world]
    model = llama_like(args.tiny).to(device, torch.bfloat16).eval()
    grouped = effcc.shared_prefix(model)
    if world > 1:
        grouped = fully_shard_blocks(grouped)
    optimizer = torch.optim.AdamW(grouped.parameters(), lr=1e-5)  # the model's own parameters, or their shards

    def step():
        logprobs = grouped.token_logprobs([p for p, _, _ in mine], [s for _, s, _ in mine])
        loss = torch.stack([-(a * lp).mean() for lp, (_, _, a) in zip(logprobs, mine)]).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    row = {"workload": "shared_prefix_grpo_step", "variant": "effcc_shared_prefix", "ranks": world,
           "tokens_per_step": groups * (prefix_len + answers * suffix_len)}  # fmt: skip
    return [measured_on_every_rank(row, step, device)]


# ---- driver --------------------------------------------------------------------------------------------
def worker(args) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.cpu:
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("gloo" if args.cpu else "nccl", device_id=None if args.cpu else device)
    rows = []
    for name, run in (("pre_rmsnorm", pre_rmsnorm_rows), ("grouped", grouped_rows)):
        if name in args.workloads:
            rows += run(args, device, rank, world)
            if rank == 0:
                print(json.dumps(rows[-1]), flush=True)
    if rank == 0:
        Path(args.part).write_text(json.dumps(rows))
    if world > 1:
        dist.destroy_process_group()


def launch(args, ranks: int, part: Path) -> list[dict]:
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}", "--standalone", __file__,
               "--worker", "--part", str(part), "--workloads", *args.workloads] + (["--tiny"] if args.tiny else []) + (["--cpu"] if args.cpu else [])  # fmt: skip
    subprocess.run(command, check=True, env=env)
    return json.loads(part.read_text())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2, help="ranks of the sharded run (default 2)")
    parser.add_argument("--tiny", action="store_true", help="tiny models (a smoke test of the script)")
    parser.add_argument("--cpu", action="store_true", help="CPU processes with gloo instead of GPUs with NCCL")
    parser.add_argument("--workloads", nargs="+", default=["pre_rmsnorm", "grouped"], choices=["pre_rmsnorm", "grouped"])
    parser.add_argument("--out", default="benchmarks/results/fsdp.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--part", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        rows = launch(args, 1, Path(tmp) / "one.json") + launch(args, args.gpus, Path(tmp) / "many.json")
    device = "cpu" if args.cpu else torch.cuda.get_device_name(0)
    for row in rows[len(rows) // 2 :]:  # speedup of N ranks over 1 on the same workload and variant
        one = next(r for r in rows if r["ranks"] == 1 and r["workload"] == row["workload"] and r["variant"] == row["variant"])
        row["throughput_vs_1"] = row["tokens_per_s"] / one["tokens_per_s"]
        row["first_loss_diff_vs_1"] = abs(row["first_loss"] - one["first_loss"])
    print(f"\n{device}, torch {torch.__version__}")
    print(f"{'workload':26} {'variant':20} {'ranks':>5} {'step ms':>9} {'tok/s':>10} {'peak GiB':>9} {'vs 1':>6} {'1st loss':>9}")
    for r in rows:
        peak = f"{r['peak_GiB']:.2f}" if r["peak_GiB"] is not None else "-"
        ratio = f"{r['throughput_vs_1']:.2f}" if "throughput_vs_1" in r else ""
        print(
            f"{r['workload']:26} {r['variant']:20} {r['ranks']:>5} {r['step_ms']:9.1f} {r['tokens_per_s']:10.0f} {peak:>9} {ratio:>6} {r['first_loss']:9.4f}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": device, "torch": torch.__version__, "rows": rows}, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
