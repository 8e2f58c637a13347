"""Shared-prefix (Prefix Grouper) training step on the GPU: grouped vs ungrouped, one process.

    python benchmarks/bench_prefix_grouper.py [--quick] [--out benchmarks/results/prefix_grouper_h200.json] [--cuda-graph]

1. Attention alone (bf16, H=16, D=64), forward + backward: effcc's prefix-attention
   kernel on the packed layout [P, S_1 … S_G] (eager calls, and under torch.compile, where
   Inductor launches the kernels itself); flex_attention (compiled) with the same
   mask as a block mask; and SDPA (flash) on the ungrouped batch [G, P+S], is_causal.
2. The model: a ~350M-parameter LLaMA-style decoder (d=1024, 24 layers, 16 heads, bf16).
   One GRPO-style step: token log-probs of the suffixes, weighted sum, backward.  Ungrouped:
   the batch [G, P+S] through torch.compile(model) (LM head only on the rows that predict
   a suffix token).  Grouped: effcc.shared_prefix(model).compile().  Both compile layer by layer
   (--whole-graph: as one graph each).  Time (median of CUDA
   event timings) and peak memory for P ∈ {1024, 4096}, G ∈ {4, 8, 16}, S ∈ {256, 512};
   the speedup is compared with the ideal FLOP ratio (ungrouped FLOPs / grouped FLOPs).
   --cuda-graph: each side's whole step (forward, loss, backward) also captured as one CUDA graph
   after the compiled warm-up and replayed, both sides alike: at this model size a compiled step
   takes longer for the CPU to issue (guards, wrappers, ~10³ launches) than for the GPU to run, and
   the graph takes that cost out of both.  The grouped side packs its batch once (grouped.pack), outside the graph.
   --breakdown: each side's step profiled, its GPU time summed by kind of kernel (attention, matmuls,
   Inductor's fused kernels, other), to see what keeps the grouped step from the ideal ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

DEVICE = "cuda"
DTYPE = torch.bfloat16
FAILED_CAPTURES: set[str] = set()  # sides whose CUDA-graph capture failed once


def timed(fn, warmup=2, reps=5, with_cpu=False):
    """Median milliseconds of `fn()` (a whole step, so CUDA events around it are enough); with_cpu: also
    the median CPU time to issue it (no wait for the GPU: close to the step time means CPU-bound)."""
    for _ in range(warmup):
        fn()
    times, issue = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        started = time.perf_counter()
        start.record()
        fn()
        end.record()
        issue.append((time.perf_counter() - started) * 1e3)
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    median = lambda values: sorted(values)[len(values) // 2]
    return (median(times), median(issue)) if with_cpu else median(times)


def peak_memory(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


# ---- 1. attention alone --------------------------------------------------------------------------
def attention_rows(shapes) -> list[dict]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from effcc.ops.prefix_attention import PackedLayout, prefix_attention

    flex = torch.compile(flex_attention)
    rows = []
    heads, dim = 16, 64
    for prefix_len, group, suffix_len in shapes:
        layout = PackedLayout.build([(prefix_len, [suffix_len] * group)], device=DEVICE)
        n = prefix_len + group * suffix_len
        cpu = torch.Generator().manual_seed(n)  # inputs from the CPU: a failed capture leaves the CUDA generator unusable
        q, k, v = (torch.randn(1, heads, n, dim, generator=cpu).to(DEVICE, DTYPE).requires_grad_() for _ in range(3))
        qu, ku, vu = (torch.randn(group, heads, prefix_len + suffix_len, dim, generator=cpu).to(DEVICE, DTYPE).requires_grad_() for _ in range(3))
        gs, pe, ss = layout.group_start, layout.prefix_end, layout.segment_start

        def visible(b, h, qi, kj):
            return (kj >= gs[qi]) & (kj <= qi) & ((kj < pe[qi]) | (kj >= ss[qi]))

        block_mask = create_block_mask(visible, None, None, n, n, device=DEVICE)

        def step(fn, *tensors):
            out = fn(*tensors)
            out.backward(torch.ones_like(out))

        compiled_op = torch.compile(lambda a, b, c: prefix_attention(a, b, c, *layout.op_inputs()))
        cases = {
            "effcc prefix_attention, Triton, torch.compile (packed)": lambda: step(compiled_op, q, k, v),
            "effcc prefix_attention, Triton (packed)": lambda: step(lambda a, b, c: prefix_attention(a, b, c, *layout.op_inputs()), q, k, v),
            "flex_attention (packed, block mask)": lambda: step(lambda a, b, c: flex(a, b, c, block_mask=block_mask), q, k, v),
            "sdpa flash (ungrouped batch)": lambda: step(lambda a, b, c: torch.nn.functional.scaled_dot_product_attention(a, b, c, is_causal=True), qu, ku, vu),
        }
        for name, fn in cases.items():
            row = {"case": name, "P": prefix_len, "G": group, "S": suffix_len, "ms_fwd_bwd": timed(fn, warmup=3, reps=10)}
            row["ms_fwd_bwd_graph"] = graphed_attention_ms(fn, (q, k, v, qu, ku, vu))
            rows.append(row)
            graph_ms = f"{row['ms_fwd_bwd_graph']:.3f}" if row["ms_fwd_bwd_graph"] else "-"
            print(f"  attention P={prefix_len} G={group} S={suffix_len}  {name:52s} {row['ms_fwd_bwd']:.3f} ms, as a CUDA graph {graph_ms} ms", flush=True)
    return rows


def graphed_attention_ms(step, leaves) -> float | None:
    """GPU time of `step` replayed from a CUDA graph (ten steps in one graph, so replay launch is noise):
    the eager calls at P = 1024 take longer for the CPU to issue than for the GPU to run."""
    def ten_steps():
        for _ in range(10):
            step()

    def let_go():
        for t in leaves:
            t.grad = None

    try:
        graph = captured(ten_steps, let_go)
        return timed(graph.replay, warmup=3, reps=10) / 10
    except Exception as error:  # noqa: BLE001 -- a case that cannot be captured keeps its eager time
        print(f"  (no CUDA graph: {type(error).__name__}: {str(error).splitlines()[0][:200]})", flush=True)
        return None


# ---- 2. the model ------------------------------------------------------------------------------
def decoder(layers=24, width=1024, heads=16, vocab=32000):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=layers, hidden_size=width, intermediate_size=2816, num_attention_heads=heads,
                         num_key_value_heads=heads, vocab_size=vocab, max_position_embeddings=8192, use_cache=False)
    return LlamaForCausalLM(config).to(DEVICE, DTYPE).eval()


def step_flops(model, prefix_len, group, suffix_len, grouped: bool) -> float:
    """Forward + backward FLOPs (3 × forward) of the linears and attention; the LM head is the same in both."""
    config = model.config
    d, layers = config.hidden_size, config.num_hidden_layers
    per_token = 2 * sum(p.numel() for name, p in model.named_parameters() if ".layers." in name and p.dim() == 2)
    if grouped:
        tokens = prefix_len + group * suffix_len
        pairs = prefix_len * (prefix_len + 1) / 2 + group * (suffix_len * prefix_len + suffix_len * (suffix_len + 1) / 2)
    else:
        tokens = group * (prefix_len + suffix_len)
        pairs = group * (prefix_len + suffix_len) * (prefix_len + suffix_len + 1) / 2
    attention = layers * 2 * 2 * d * pairs
    head = 2 * d * config.vocab_size * group * suffix_len
    return 3 * (tokens * per_token + attention + head)


def ungrouped_step(compiled, prefix, suffixes, weights):
    torch.compiler.cudagraph_mark_step_begin()  # a new step for --mode reduce-overhead (no-op otherwise)
    prefix_len, suffix_len = prefix.numel(), suffixes.shape[1]
    batch = torch.cat([prefix.expand(suffixes.shape[0], -1), suffixes], dim=1)
    rows = torch.arange(prefix_len - 1, prefix_len + suffix_len - 1, device=batch.device)  # the rows that predict suffix tokens
    logits = compiled(batch, logits_to_keep=rows).logits  # a tensor of rows: no recompile per length
    logprobs = torch.log_softmax(logits.float(), -1).gather(-1, suffixes[..., None]).squeeze(-1)
    (logprobs * weights).sum().backward()


def grouped_step(grouped, prefix, suffixes, weights):
    torch.compiler.cudagraph_mark_step_begin()
    (grouped.token_logprobs(prefix, suffixes) * weights).sum().backward()


KERNEL_KINDS = (  # (kind, name fragments), first match wins: where a step's GPU time goes
    ("attention", ("_forward_kernel", "_backward_kernel", "_delta_kernel", "flash", "fmha", "attention")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "matmul")),
    ("fused elementwise / reductions (Inductor)", ("triton_",)),
)


def kernel_breakdown(step, let_go_of_gradients, steps=3) -> dict:
    """GPU time of `step` by kind of kernel (torch.profiler, warm step; the kernels a CUDA graph of it
    replays: gradients let go before each step, so none is added to an old one)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            let_go_of_gradients()
            step()
        torch.cuda.synchronize()
    kernels = [(e.key, e.device_time_total / steps / 1e3, e.count // steps) for e in prof.key_averages()
               if e.device_time_total > 0 and not e.key.startswith(("Memcpy", "Memset", "cuda"))]
    kinds: dict[str, float] = {}
    for name, ms, _ in kernels:
        kind = next((kind for kind, fragments in KERNEL_KINDS if any(f in name for f in fragments)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + ms
    kernels.sort(key=lambda k: -k[1])
    return {"total_ms": sum(ms for _, ms, _ in kernels), "by_kind_ms": kinds,
            "kernels": [{"kernel": name[:120], "ms": round(ms, 4), "launches": count} for name, ms, count in kernels]}


def captured(step, let_go_of_gradients) -> torch.cuda.CUDAGraph:
    """`step` warmed up on a side stream, then captured as one CUDA graph.  The gradients are let go
    before the capture, so they land in the graph's memory and every replay writes them anew (as a step
    after zero_grad(set_to_none=True) does) instead of adding to them."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    let_go_of_gradients()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


@contextlib.contextmanager
def hf_masks_as_outside_a_capture():
    """Hugging Face's mask code, seeing a CUDA-graph capture, assumes it may not read tensors and builds an
    explicit causal mask: another attention kernel than the plain step's, and a recompile of the compiled
    layers inside the capture, which fails.  Outside a capture the ungrouped batch (no padding, not packed)
    gets no mask (SDPA is_causal) after a packed-sequence check that reads the GPU.  The step is captured
    on that same path: capture detection off, and the check given its known answer (None: not packed)."""
    from transformers import masking_utils
    from transformers.utils import import_utils

    patches = [(import_utils, "is_cuda_stream_capturing", lambda: False),
               (masking_utils, "find_packed_sequence_indices", lambda position_ids: None)]
    originals = [(module, name, getattr(module, name)) for module, name, _ in patches if hasattr(module, name)]
    for module, name, replacement in patches:
        if hasattr(module, name):
            setattr(module, name, replacement)
    try:
        yield
    finally:
        for module, name, original in originals:
            setattr(module, name, original)


def gradient_fingerprint(model) -> float:
    """Sum of the gradients' norms: equal (to bf16 rounding) when two ways of running the step agree."""
    return float(sum(p.grad.float().norm() for p in model.parameters() if p.grad is not None))


class LayerRun(torch.nn.Module):
    """Consecutive Hugging Face decoder layers called as one, to be compiled as one part (the ungrouped
    side's counterpart of `compile(blocks_per_part=k)`)."""

    def __init__(self, layers):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, hidden_states, *args, **kwargs):
        for layer in self.layers:
            hidden_states = layer(hidden_states, *args, **kwargs)
        return hidden_states


def compiled_sides(model, eager: bool, whole_graph: bool, mode: str | None = None, blocks_per_part: int = 1):
    """(ungrouped, grouped) callables.  By default both compile by layer, one layer's code for all 24
    (`layer.compile()` on the Hugging Face layers; effcc.shared_prefix(...).compile() cuts its graph
    into layers likewise): compiling two 24-layer graphs took most of a 10-minute device call."""
    import effcc

    if eager:
        return model, effcc.shared_prefix(model)
    if whole_graph:
        return torch.compile(model, dynamic=True, mode=mode), effcc.shared_prefix(model).compile(by_block=False, mode=mode)
    grouped = effcc.shared_prefix(model).compile(mode=mode, blocks_per_part=blocks_per_part)  # captured before the layers are wrapped
    layers = list(model.model.layers)
    if blocks_per_part > 1:
        model.model.layers = torch.nn.ModuleList(LayerRun(layers[i : i + blocks_per_part]) for i in range(0, len(layers), blocks_per_part))
    for part in model.model.layers:
        part.compile(dynamic=True, mode=mode)
    # the embedding too, as the grouped side compiles the part before the layers: eager CUDA embedding
    # backward reads a count on the CPU (a wait for the GPU, and no CUDA graph can hold it)
    model.model.embed_tokens.compile(dynamic=True, mode=mode)
    return model, grouped


def model_rows(shapes, on_row=lambda row: None, budget_s=float("inf"), eager=False, whole_graph=False, mode=None,
               blocks_per_part=1, cuda_graph=False, breakdown=False) -> list[dict]:
    model = decoder()
    params = sum(p.numel() for p in model.parameters())
    print(f"  model: {params / 1e6:.0f}M parameters", flush=True)
    started = time.time()
    compiled, grouped = compiled_sides(model, eager, whole_graph, mode, blocks_per_part)
    rows = []
    for prefix_len, group, suffix_len in shapes:
        inputs = torch.Generator().manual_seed(prefix_len + group + suffix_len)  # on the CPU: a failed capture leaves the CUDA generator unusable
        prefix = torch.randint(0, 32000, (prefix_len,), generator=inputs).to(DEVICE)
        suffixes = torch.randint(0, 32000, (group, suffix_len), generator=inputs).to(DEVICE)
        weights = torch.randn(group, suffix_len, generator=inputs).to(DEVICE)
        label = "eager" if eager else "torch.compile, whole graph" if whole_graph else \
            "torch.compile by layer" if blocks_per_part == 1 else f"torch.compile by {blocks_per_part} layers"
        row = {"P": prefix_len, "G": group, "S": suffix_len, "params_M": params / 1e6, "mode": label + (f", mode={mode}" if mode else "")}
        row["ideal_flop_ratio"] = step_flops(model, prefix_len, group, suffix_len, False) / step_flops(model, prefix_len, group, suffix_len, True)
        if time.time() - started > budget_s:
            print(f"  skipped P={prefix_len} G={group} S={suffix_len}: time budget", flush=True)
            continue
        steps = {"grouped": lambda: grouped_step(grouped, prefix, suffixes, weights),
                 "ungrouped": lambda: ungrouped_step(compiled, prefix, suffixes, weights)}
        for name, fn in steps.items():
            model.zero_grad(set_to_none=True)
            try:
                row[f"{name}_ms"], row[f"{name}_cpu_issue_ms"] = timed(fn, with_cpu=True)
                model.zero_grad(set_to_none=True)
                row[f"{name}_peak_GiB"] = peak_memory(fn)
                fingerprint = gradient_fingerprint(model)
            except torch.OutOfMemoryError:
                row[f"{name}_ms"], row[f"{name}_peak_GiB"] = None, "OOM"
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            if breakdown and row[f"{name}_ms"]:
                row[f"{name}_kernels"] = kernel_breakdown(fn, lambda: model.zero_grad(set_to_none=True))
                model.zero_grad(set_to_none=True)
                print(f"  {name} kernels: " + json.dumps(row[f"{name}_kernels"]["by_kind_ms"]), flush=True)
            if cuda_graph and row[f"{name}_ms"] and name not in FAILED_CAPTURES:
                row.update(graphed_timing(name, grouped, model, fn, prefix, suffixes, weights, fingerprint))
        if row["grouped_ms"] and row["ungrouped_ms"]:
            row["speedup"] = row["ungrouped_ms"] / row["grouped_ms"]
            row["of_ideal"] = row["speedup"] / row["ideal_flop_ratio"]
        if row.get("grouped_graph_ms") and row.get("ungrouped_graph_ms"):
            row["speedup_graph"] = row["ungrouped_graph_ms"] / row["grouped_graph_ms"]
            row["of_ideal_graph"] = row["speedup_graph"] / row["ideal_flop_ratio"]
        print("  " + json.dumps(row), flush=True)
        rows.append(row)
        on_row(row)
    return rows


def graphed_timing(name, grouped, model, step, prefix, suffixes, weights, fingerprint) -> dict:
    """The side's step as one CUDA graph: replay time, and whether its gradients match the plain step's."""
    if name == "grouped":  # packed once, outside the graph: packing copies from the CPU, which a graph would freeze
        batch = grouped.pack(prefix, suffixes)

        def step():
            torch.compiler.cudagraph_mark_step_begin()
            (grouped.token_logprobs(batch) * weights).sum().backward()
    out = {}
    try:
        with hf_masks_as_outside_a_capture():
            graph = captured(step, lambda: model.zero_grad(set_to_none=True))
        out[f"{name}_graph_ms"] = timed(graph.replay)
        out[f"{name}_graph_grad_rel_diff"] = abs(gradient_fingerprint(model) / fingerprint - 1)
        del graph
    except Exception as error:  # noqa: BLE001 -- a capture that fails is a finding: keep the row and say why
        # a failed capture raises again on leaving the capture: the first error is the one to report
        causes = [error, *([error.__context__] if error.__context__ else [])]
        out[f"{name}_graph_error"] = " <- ".join(f"{type(e).__name__}: {str(e).splitlines()[0][:300]}" for e in causes)
        FAILED_CAPTURES.add(name)  # its memory pool is not given back: trying again would run out of memory
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return out


def check_equal_losses(shapes) -> dict:
    """The two steps compute the same thing: compare log-probs and one gradient at bf16 tolerance."""
    import effcc

    model = decoder(layers=2)
    grouped = effcc.shared_prefix(model)
    prefix_len, group, suffix_len = shapes[0]
    prefix = torch.randint(0, 32000, (prefix_len,), device=DEVICE)
    suffixes = torch.randint(0, 32000, (group, suffix_len), device=DEVICE)
    batch = torch.cat([prefix.expand(group, -1), suffixes], dim=1)
    with torch.no_grad():
        reference = torch.log_softmax(model(batch).logits[:, prefix_len - 1 : -1].float(), -1).gather(-1, suffixes[..., None]).squeeze(-1)
        ours = grouped.token_logprobs(prefix, suffixes)
    return {"max_abs_logprob_diff_bf16": float((reference - ours).abs().max()), "mean_abs_logprob": float(reference.abs().mean())}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two shapes only")
    parser.add_argument("--skip-attention", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/prefix_grouper.json")
    parser.add_argument("--eager", action="store_true", help="model rows without torch.compile (both sides)")
    parser.add_argument("--whole-graph", action="store_true", help="compile each side as one graph, not layer by layer")
    parser.add_argument("--blocks-per-part", type=int, default=1, help="compile runs of this many layers as one part (both sides)")
    parser.add_argument("--mode", help="torch.compile mode for both sides (reduce-overhead fails by layer: pytorch#152887)")
    parser.add_argument("--cuda-graph", action="store_true", help="also time each side's whole step captured as one CUDA graph")
    parser.add_argument("--breakdown", action="store_true", help="also profile each side's step: GPU time by kind of kernel")
    parser.add_argument("--shapes", help="model shapes as PxGxS,PxGxS (default: the 12 of the issue)")
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="start no new model shape after this many seconds")
    args = parser.parse_args()
    # ordered so that a run cut short by --budget-s still spans the table
    shapes = [(1024, 4, 256), (4096, 16, 512), (4096, 8, 256), (1024, 16, 512), (1024, 8, 256), (4096, 4, 512),
              (1024, 4, 512), (4096, 16, 256), (1024, 16, 256), (4096, 8, 512), (1024, 8, 512), (4096, 4, 256)]
    if args.shapes:
        shapes = [tuple(int(x) for x in shape.split("x")) for shape in args.shapes.split(",")]
    if args.quick:
        shapes = [(1024, 4, 256), (4096, 16, 512)]
    started = time.time()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": str(DTYPE)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():  # after every section, so a run cut short still leaves its figures
        result["seconds"] = time.time() - started
        out.write_text(json.dumps(result, indent=1))

    print(f"device: {result['device']}", flush=True)
    result["agreement"] = check_equal_losses(shapes)
    print(f"  agreement: {result['agreement']}", flush=True)
    save()
    if not args.skip_attention:
        result["attention"] = attention_rows([(1024, 8, 256), (4096, 8, 512), (4096, 16, 256)])
        save()
    result["model"] = []
    model_rows(shapes, on_row=lambda row: (result["model"].append(row), save()), budget_s=args.budget_s, eager=args.eager,
               whole_graph=args.whole_graph, mode=args.mode, blocks_per_part=args.blocks_per_part, cuda_graph=args.cuda_graph, breakdown=args.breakdown)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
