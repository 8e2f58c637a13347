"""The Python front door: optimize(), verify(), export_onnx(), check_onnx()."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import fx, nn

from .backends import onnx as onnx_backend
from .capture import capture
from .errors import CaptureError
from .passes import Pass, default_passes, make_pass
from .pipeline import run_module_passes, run_passes, split_module_passes
from .program import Program
from .report import PassResult, Report
from .verify import Comparison
from .verify import verify as _verify


@dataclass
class OptimizeResult:
    """What optimize() returns: the rewritten model, and what was done to get it.

    `model` is a torch.fx.GraphModule; call it like the original (same inputs, same output
    structure).  When only module-rewriting passes ran (sparse_ift), `model` is the new
    nn.Module to train, and `program` its captured graph, which shares its tensors.  `report` prints as a table; `passes` holds the same facts as data."""

    model: fx.GraphModule
    report: Report
    program: Program

    @property
    def passes(self) -> list[PassResult]:
        return self.report.passes

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def optimize(
    model: nn.Module,
    example_inputs: tuple,
    passes=None,
    *,
    example_kwargs: dict | None = None,
    verify: bool = True,
    dynamic: bool = True,
    calibration=None,
) -> OptimizeResult:
    """Capture `model`, apply `passes` and verify each against the original in float64.

    passes: names or (name, {options}) pairs, applied in order; None runs the default
    (exact) passes.  The caller's model and its parameters are never changed.
    dynamic: keep sizes the model does not specialise on (batch, sequence) symbolic; images keep
        their height and width (only their batch size may vary).
    calibration: batches (each a tuple of positional inputs) for passes that need activation
    statistics (smoothquant); read by each such pass on the graph as it is then.
    """
    tensors = [*model.named_parameters(), *model.named_buffers()] if isinstance(model, nn.Module) else []
    on_meta = next((name for name, t in tensors if t.is_meta), None)
    if on_meta is not None:
        raise CaptureError(
            f"{type(model).__name__}.{on_meta} is on the meta device (it has no values), and effcc.optimize needs the weights; "
            "for weights in a safetensors checkpoint use effcc.optimize_checkpoint(model, checkpoint, example_inputs, passes, out=...)"
        )
    chosen: list[Pass] = default_passes() if passes is None else [make_pass(p) for p in passes]
    module_passes, graph_passes = split_module_passes(chosen)
    rewritten, module_results = run_module_passes(model, module_passes, example_inputs, example_kwargs or {})
    # A model effcc built itself is captured without copying its tensors, so the program (and
    # an ONNX export of it) follows the training of `result.model`.
    program = capture(rewritten, example_inputs, example_kwargs, dynamic=dynamic, detach=rewritten is model)
    program.calibration = [b if isinstance(b, tuple) else (b,) for b in calibration] if calibration is not None else None
    report = run_passes(rewritten, program, graph_passes, verify=verify)
    report.model = type(model).__name__
    report.passes[:0] = module_results
    return OptimizeResult(program.gm if graph_passes or not module_passes else rewritten, report, program)


def verify(original: nn.Module, rewritten, inputs: tuple, kwargs: dict | None = None) -> Comparison:
    """Max abs / rel error of `rewritten` (a model or an OptimizeResult) vs `original`, in float64."""
    if isinstance(rewritten, OptimizeResult):
        rewritten = rewritten.model
    return _verify(original, rewritten, inputs, kwargs)


def export_onnx(
    result, path, example_inputs: tuple | None = None, *, example_kwargs: dict | None = None, opset: int | None = None
) -> Path:
    """Write an optimize() result (or any model, with example_inputs) to an ONNX file.

    A result keeps the dynamic sizes it was captured with (batch, sequence length)."""
    if isinstance(result, OptimizeResult):
        program = result.program
        args = example_inputs if example_inputs is not None else program.example_args
        kwargs = example_kwargs if example_kwargs is not None else program.example_kwargs
        return onnx_backend.export_onnx(result.model, path, args, kwargs, dynamic_shapes=program.dynamic_shapes, opset=opset,
                                         name=result.report.model)
    if example_inputs is None:
        raise TypeError("export_onnx(model, path, example_inputs): example_inputs are needed for a plain model")
    return onnx_backend.export_onnx(result, path, example_inputs, example_kwargs, opset=opset)


def check_onnx(
    path, model, example_inputs: tuple, example_kwargs: dict | None = None, *, rtol: float = onnx_backend.export.ONNX_RTOL
) -> Comparison:
    """Run an ONNX file in ONNX Runtime and compare it with `model` (original or result) in PyTorch."""
    if isinstance(model, OptimizeResult):
        model = model.model
    return onnx_backend.check_onnx(path, model, example_inputs, example_kwargs, rtol=rtol)
