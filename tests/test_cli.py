"""The `effcc` command line."""

import subprocess

import pytest

from effcc.cli import main, parse_pass


def test_help_teaches(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for expected in ("effcc demo", "effcc passes", "effcc optimize", "pkg.module:", "float64", "effcc report", "--save"):
        assert expected in text


def test_passes_lists_one_line_each(capsys):
    assert main(["passes"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("fold_norm_affine") and "[exact]" in line for line in lines)


@pytest.mark.parametrize(
    "passes", ["fold_norm_affine", "quantize_w8a8", "real_to_complex,fairy2i:stages=2", "sparse_ift:family='parallel'"]
)
def test_optimize_a_factory_and_export(passes, tmp_path, capsys):
    out = tmp_path / "tiny.onnx"
    assert main(["optimize", "effcc.models:tiny_gpt", "--passes", passes, "--export", str(out)]) == 0
    text = " ".join(capsys.readouterr().out.split())  # undo the console's line wrapping
    assert out.exists()
    against = {"fold_norm_affine": "the original model", "sparse_ift:family='parallel'": "the rewritten (iso_flop) model"}.get(
        passes, "the rewritten (lossy) model"
    )
    assert passes.split(",")[-1].split(":")[0] in text and f"ONNX Runtime vs {against}" in text


@pytest.mark.parametrize(
    "argv,message",
    [
        (["optimize", "effcc.models"], "pkg.module:function"),
        (["optimize", "no_such_module:f"], "cannot import 'no_such_module'"),
        (["optimize", "effcc.models:missing"], "has no function 'missing'"),
        (["optimize", "effcc.models:TinyGPT"], "must return (model, example_inputs)"),
        (["optimize", "effcc.models:tiny_gpt", "--passes", "nope"], "unknown pass 'nope'"),
        (["optimize", "effcc.models:tiny_gpt", "--passes", "fold_norm_affine:x"], "should be key=value"),
    ],
)
def test_errors_are_one_line_without_traceback(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in " ".join(err.split()) and "Traceback" not in err


def test_pass_options_parse_as_literals():
    assert parse_pass("fold_norm_affine") == "fold_norm_affine"
    assert parse_pass("smoothquant:alpha=0.5:mode=auto") == ("smoothquant", {"alpha": 0.5, "mode": "auto"})


def test_console_script_demo_runs(tmp_path):
    done = subprocess.run(["effcc", "demo", "--out", str(tmp_path)], check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "tiny_gpt.onnx").exists()
    text = " ".join(done.stdout.split())
    assert "ONNX Runtime vs the original model" in text and "fold_norm_affine" in text
    assert "Traceback" not in done.stderr


def test_optimize_with_weights_streamed_from_a_checkpoint(tmp_path, capsys):
    from safetensors.torch import save_model

    from effcc.models import tiny_gpt

    model, _ = tiny_gpt()
    save_model(model, str(tmp_path / "tiny.safetensors"))  # the factory's model, saved: what --weights reads
    argv = ["optimize", "effcc.models:tiny_gpt", "--passes", "fold_norm_affine", "--weights", str(tmp_path / "tiny.safetensors")]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "fold_norm_affine" in text and "streamed" in text and (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert main(argv) == 2 and "--out DIR" in capsys.readouterr().err


def test_save_then_report_a_saved_result(tmp_path, capsys):
    import effcc

    saved, html = tmp_path / "w8a8", tmp_path / "w8a8.html"
    argv = ["optimize", "effcc.models:tiny_gpt_with_calibration", "--passes", "smoothquant,quantize_w8a8", "--save", str(saved)]
    assert main([*argv, "--report", str(html)]) == 0
    assert "effcc.load" in capsys.readouterr().out and (saved / "effcc.json").exists() and "<svg" in html.read_text()

    assert main(["report", str(saved), "--markdown", str(tmp_path / "w8a8.md")]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "smoothquant" in text and "quantize_w8a8" in text  # the saved report's table
    assert "quantize_w8a8" in (tmp_path / "w8a8.md").read_text()
    assert effcc.load(saved).passes[-1].name == "quantize_w8a8"
    assert main(["report", str(tmp_path)]) == 2 and "not a model saved by effcc.save" in " ".join(capsys.readouterr().err.split())
