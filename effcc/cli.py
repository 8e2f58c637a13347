"""The `effcc` command: optimise a model from a shell, export it, check it."""

from __future__ import annotations

import argparse
import ast
import importlib
import sys
import tempfile
from pathlib import Path

from rich.console import Console

from .errors import EffccError

EPILOG = """\
examples:
  effcc demo                                  optimise the bundled TinyGPT, export it to ONNX, check it in ONNX Runtime
  effcc passes                                list the passes, one line each
  effcc optimize effcc.models:tiny_gpt        run the default (exact) passes on a model from a factory
  effcc optimize mypkg.models:build --passes fold_norm_affine --export out.onnx
  effcc optimize mypkg.models:build --passes ln_to_rmsnorm --weights ckpt/ --out ckpt-rms/ --device cuda
                                              the same on a model larger than memory: weights streamed from ckpt/
  effcc optimize effcc.models:tiny_gpt_with_calibration --passes smoothquant,quantize_w8a8 --save w8a8/ --report w8a8.html
                                              save the result (effcc.load("w8a8/") reads it) and a report with plots
  effcc report w8a8/ --markdown w8a8.md       the report of a saved result, as a table and as a file

A factory is a function `pkg.module:name` that takes no arguments and returns
(model, example_inputs), example_inputs being the tuple of positional arguments of
model.forward, or (model, example_inputs, calibration) with a list of input batches for
passes that calibrate (smoothquant, os_plus; see effcc.models:tiny_gpt_with_calibration).  Give pass options as name:key=value, e.g. --passes smoothquant:alpha=0.5.
Every pass is verified against the original model in float64; the report shows the error.
"""


def parse_pass(text: str):
    """'name' or 'name:key=value:key=value' → 'name' or (name, {options})."""
    name, *pairs = text.strip().split(":")
    if not pairs:
        return name
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise EffccError(f"pass option {pair!r} of {name!r} should be key=value")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return name, options


def load_factory(target: str):
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise EffccError(f"expected a factory as pkg.module:function, got {target!r}")
    sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise EffccError(f"cannot import {module_name!r}: {error}") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise EffccError(f"{module_name} has no function {attribute!r}")
    made = factory()
    if not (isinstance(made, tuple) and len(made) in (2, 3) and isinstance(made[1], tuple)):
        raise EffccError(
            f"{target}() must return (model, example_inputs) or (model, example_inputs, calibration batches) "
            f"with example_inputs a tuple, got {type(made).__name__}"
        )
    return made if len(made) == 3 else (*made, None)


def cmd_passes(args, console: Console) -> int:
    from . import REGISTRY

    width = max(map(len, REGISTRY))
    for name, cls in REGISTRY.items():
        default = " (default)" if cls.default else ""
        console.print(
            f"{name:<{width}}  [{cls.guarantee}]{default}  {cls.summary}", highlight=False, markup=False, soft_wrap=True
        )
    return 0


def optimise_and_export(model, example_inputs, passes, export: Path | None, verify: bool, console: Console, calibration=None):
    from . import Guarantee, check_onnx, export_onnx, optimize

    with console.status("capturing and rewriting"):
        result = optimize(model, example_inputs, passes, verify=verify, calibration=calibration)
    console.print(result.report)
    if export is not None:
        with console.status(f"exporting {export}"):
            export_onnx(result, export)
            # Exact passes: against the original model, end to end.  After a lossy or iso-FLOP pass
            # (a different function), against the rewritten model, which is what was exported.
            changed = [p.guarantee for p in result.report.passes if p.guarantee != Guarantee.EXACT]
            comparison = check_onnx(export, result if changed else model, example_inputs)
        against = f"the rewritten ({changed[0]}) model" if changed else "the original model"
        console.print(f"ONNX: wrote {export}; ONNX Runtime vs {against} in PyTorch: {comparison}", highlight=False)
    return result


def save_result(result, folder: Path | None, report_file: Path | None, console: Console) -> None:
    """--save DIR and --report FILE of `effcc optimize`."""
    from .saving import save

    if folder is not None:
        with console.status(f"saving to {folder}"):
            save(result, folder)
        console.print(f"saved the result to {folder} (effcc.load({str(folder)!r}) reads it)", highlight=False)
    if report_file is not None:
        result.report.save(report_file)
        console.print(f"wrote the report to {report_file}", highlight=False)


def cmd_report(args, console: Console) -> int:
    from .saving import load

    with console.status(f"loading {args.saved}"):
        result = load(args.saved)
    console.print(result.report)
    for file in (args.html, args.markdown):
        if file is not None:
            result.report.save(file)
            console.print(f"wrote {file}", highlight=False)
    return 0


def cmd_optimize(args, console: Console) -> int:
    passes = None if args.passes is None else [parse_pass(p) for p in args.passes.split(",") if p.strip()]
    if args.weights is not None:
        return optimise_checkpoint(args, passes, console)
    if args.out is not None:
        raise EffccError("--out is where --weights writes the rewritten checkpoint; give --weights too, or --export FILE.onnx")
    model, example_inputs, calibration = load_factory(args.target)
    result = optimise_and_export(model, example_inputs, passes, args.export, not args.no_verify, console, calibration)
    save_result(result, args.save, args.report, console)
    return 0


def optimise_checkpoint(args, passes, console: Console) -> int:
    """--weights: the factory's model is built with its parameters on meta; they stream from the checkpoint."""
    from .offload import empty_weights, optimize_checkpoint
    from .passes import default_passes

    if args.out is None or args.export is not None:
        raise EffccError("with --weights, give --out DIR for the rewritten checkpoint (ONNX export needs the model in memory)")
    with empty_weights():
        model, example_inputs, calibration = load_factory(args.target)
    passes = passes if passes is not None else [p.name for p in default_passes()]
    with console.status(f"rewriting, weights streamed from {args.weights}"):
        result = optimize_checkpoint(
            model,
            args.weights,
            example_inputs,
            passes,
            out=args.out,
            device=args.device,
            verify=not args.no_verify,
            calibration=calibration,
        )
    console.print(result.report)
    console.print(f"wrote the rewritten model to {args.out} (effcc.load({str(args.out)!r}) reads it)", highlight=False)
    save_result(result, args.save, args.report, console)
    return 0


def cmd_demo(args, console: Console) -> int:
    from .models import tiny_gpt

    model, example_inputs = tiny_gpt()
    out = args.out or Path(tempfile.mkdtemp(prefix="effcc-demo-"))
    console.print(
        f"TinyGPT (Pre-LN, {sum(p.numel() for p in model.parameters()):,} parameters), ids {tuple(example_inputs[0].shape)}"
    )
    optimise_and_export(model, example_inputs, None, out / "tiny_gpt.onnx", True, console)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="effcc",
        description="effcc rewrites PyTorch models into equivalent, faster ones and proves each rewrite in float64.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"effcc {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="command")
    commands.add_parser("passes", help="list registered passes").set_defaults(run=cmd_passes)
    opt = commands.add_parser(
        "optimize",
        help="optimise a model built by a factory function",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    opt.add_argument("target", help="factory as pkg.module:function returning (model, example_inputs)")
    opt.add_argument("--passes", help="comma-separated passes, in order (default: the exact default passes)")
    opt.add_argument(
        "--export", type=Path, metavar="FILE.onnx", help="also export the result to ONNX and check it in ONNX Runtime"
    )
    opt.add_argument("--no-verify", action="store_true", help="skip the float64 verification after each pass")
    opt.add_argument(
        "--weights",
        type=Path,
        metavar="CHECKPOINT",
        help="a safetensors file or sharded folder: the factory's model is "
        "built without weights and they are streamed from here (for models larger than memory)",
    )
    opt.add_argument(
        "--out", type=Path, metavar="DIR", help="with --weights: folder for the rewritten weights (safetensors shards)"
    )
    opt.add_argument("--device", default="cpu", help="with --weights: where calibration and checks run (cpu, cuda)")
    opt.add_argument(
        "--save", type=Path, metavar="DIR", help="save the result: safetensors + a JSON description, read by effcc.load(DIR)"
    )
    opt.add_argument(
        "--report", type=Path, metavar="FILE", help="write the report with plots to FILE.html or FILE.md (needs matplotlib)"
    )
    opt.set_defaults(run=cmd_optimize)
    report = commands.add_parser("report", help="show the report of a saved result; write it as HTML or Markdown")
    report.add_argument("saved", type=Path, help="a folder written by effcc.save, `effcc optimize --save` or --out")
    report.add_argument("--html", type=Path, metavar="FILE.html", help="also write the report with its plots as HTML")
    report.add_argument("--markdown", type=Path, metavar="FILE.md", help="also write it as Markdown (plots next to it)")
    report.set_defaults(run=cmd_report)
    demo = commands.add_parser("demo", help="optimise the bundled TinyGPT, export to ONNX, run it in ONNX Runtime")
    demo.add_argument("--out", type=Path, help="folder for tiny_gpt.onnx (default: a new temporary folder)")
    demo.set_defaults(run=cmd_demo)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 0
    console = Console(stderr=False)
    try:
        return args.run(args, console)
    except EffccError as error:
        Console(stderr=True).print(f"[bold red]error:[/] {error}", highlight=False)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
