"""Run passes one after another, verifying the whole model in float64 after each."""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .errors import CaptureError, EffccError, VerificationError, first_line
from .passes import Guarantee, Pass, SiteLog
from .program import Program, graph_tensors
from .progress import steps
from .report import PassResult, Report
from .verify import Comparison, compare, count_flops, reference_outputs

# Captured graph vs eager model, both in float64.  Not 0: a model may keep a step in float32
# on purpose (LLaMA's rotary angles) where the float64 graph computes it in float64.
CAPTURE_RTOL = 1e-5


def storage_dtype(program: Program) -> torch.dtype:
    """The floating dtype most of the model's stored values use (what rewritten tensors are rounded to)."""
    counts: dict[torch.dtype, int] = {}
    for t in list(program.gm.parameters()) + list(program.gm.buffers()):
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def stored_bytes(program: Program) -> int:
    """Bytes of every tensor the graph reads (weights, buffers, constants; a tied tensor once)."""
    unique = {id(t): t for t in graph_tensors(program.gm).values()}
    return sum(t.numel() * t.element_size() for t in unique.values())


def check_pass_list(passes: list[Pass]) -> None:
    names = [p.name for p in passes]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise EffccError(f"pass {', '.join(map(repr, repeated))} is asked for more than once; name each pass once")
    for i, a in enumerate(passes):
        for b in passes[i + 1 :]:
            why = a.contradicts.get(b.name) or b.contradicts.get(a.name)
            if why:
                raise EffccError(f"passes {a.name!r} and {b.name!r} contradict each other: {why}; keep one of them")


def split_module_passes(passes: list[Pass]) -> tuple[list[Pass], list[Pass]]:
    """(passes that rewrite modules, graph passes): the first kind must lead the list."""
    leading = 0
    while leading < len(passes) and passes[leading].rewrites_modules:
        leading += 1
    late = [p.name for p in passes[leading:] if p.rewrites_modules]
    if late:
        raise EffccError(f"{', '.join(late)} rewrites the model's layers and must come before every graph pass in the list")
    return passes[:leading], passes[leading:]


def run_module_passes(model: nn.Module, passes: list[Pass], args: tuple, kwargs: dict) -> tuple[nn.Module, list[PassResult]]:
    """Apply module-rewriting passes (Sparse-IFT) one after another; `model` is left as it is.

    Their guarantee is FLOPs, so that is what is checked: the forward FLOPs on the example
    inputs before and after each, which may differ only by the rounding the pass declares."""
    results = []
    before = count_flops(model, args, kwargs) if passes else 0
    for p in passes:
        start = time.perf_counter()
        log = SiteLog()
        new = p.transform(model, args, kwargs, log)
        after = count_flops(new, args, kwargs)
        if p.guarantee is Guarantee.ISO_FLOP and abs(after - before) > p.flop_slack:
            raise VerificationError(
                f"pass {p.name!r} changed the forward FLOPs of {type(model).__name__} from {before:,} to {after:,}, more than "
                f"the {p.flop_slack:,} its rounding allows. This is a bug in effcc; please report it with the model."
            )
        results.append(
            PassResult(p.name, p.guarantee, log.changed, log.skipped, None, None, time.perf_counter() - start, (before, after))
        )
        model, before = new, after
    return model, results


def apply_pass(program: Program, p: Pass) -> SiteLog:
    """Run one pass on `program` and tidy the graph; what it changed and skipped comes back."""
    log = SiteLog()
    p.apply(program, log)
    program.recompile()
    return log


def run_passes(model: nn.Module, program: Program, passes: list[Pass], *, verify: bool = True) -> Report:
    """Apply `passes` to `program` in order (it is modified); `model` is the untouched original."""
    check_pass_list(passes)
    report = Report(type(model).__name__, capture=None, notes=list(program.notes))
    reference, flops = _captured_reference(model, program, report) if verify else (None, None)
    dtype = storage_dtype(program)
    with steps("effcc", total=len(passes)) as advance:
        for p in passes:
            advance(f"{p.name}: rewriting", by=0)
            start = time.perf_counter()
            before = stored_bytes(program)
            log = apply_pass(program, p)
            comparison, flop_counts = None, None
            if verify:  # the float64 check also counts the forward FLOPs after the pass
                advance(f"{p.name}: checking in float64", by=0)
                with FlopCounterMode(display=False) as counter:
                    comparison = _check(program, reference)
                flop_counts, flops = (flops, counter.get_total_flops()), counter.get_total_flops()
            rtol, seconds = p.rtol(dtype), time.perf_counter() - start
            sizes = (before, stored_bytes(program))
            report.passes.append(
                PassResult(p.name, p.guarantee, log.changed, log.skipped, comparison, rtol, seconds, flop_counts, sizes)
            )
            if comparison is not None and not comparison.within(rtol):
                raise VerificationError(
                    f"pass {p.name!r} changed what {type(model).__name__} computes: {comparison}, above its tolerance "
                    f"{rtol:.0e} for {dtype} weights (float64 evaluation). This is a bug in effcc; run without "
                    f"{p.name!r} and report it with the model."
                )
            advance()
    return report


def _captured_reference(model: nn.Module, program: Program, report: Report):
    """(the captured graph's float64 outputs, its forward FLOPs), after checking it against the eager model.

    Each pass is measured against the captured graph in float64, so its figure is the rewrite's own
    error; the capture itself is checked against the eager model here (into report.capture)."""
    name = type(model).__name__
    with FlopCounterMode(display=False) as counter:
        reference = _run(f"could not run the captured graph of {name} in float64", program)
    if program.store is None:
        eager = _run(f"could not run {name} on the example inputs in float64", program, model)
        report.capture = compare(reference, eager)
    else:
        report.notes.append("the capture was not compared with the eager model: its weights are on disk, not in it")
    if report.capture is not None and not report.capture.within(CAPTURE_RTOL):
        raise VerificationError(
            f"the captured graph of {name} does not reproduce the model ({report.capture}); "
            "effcc cannot rewrite it safely. Is forward() random or stateful (sampling, caches)?"
        )
    return reference, counter.get_total_flops()


def _run(what: str, program: Program, eager_model: nn.Module | None = None):
    """The captured graph's float64 outputs, or `eager_model`'s, on the example inputs."""
    try:
        if eager_model is not None:
            return reference_outputs(eager_model, program.example_args, program.example_kwargs)
        return program.run_float64()
    except Exception as error:
        hint = (
            "It runs in its own dtype, so an op it uses has no float64 form or its code breaks in float64; effcc checks "
            "every rewrite against the model in float64: verify=False (--no-verify) rewrites it without those checks"
            if _runs_as_given(program, eager_model) else "Are the example inputs what the model takes?"
        )
        raise CaptureError(f"{what}: {type(error).__name__}: {first_line(error)}. {hint}") from error


def _runs_as_given(program: Program, eager_model: nn.Module | None) -> bool:
    """Whether the model (or the captured graph) runs on the example inputs as they are, in its own dtype."""
    try:
        with torch.no_grad():
            (eager_model or program.gm)(*program.example_args, **program.example_kwargs)
    except Exception:  # noqa: BLE001 -- any failure: the inputs themselves are in question
        return False
    return True


def _check(program: Program, reference) -> Comparison:
    return compare(program.run_float64(), reference)
