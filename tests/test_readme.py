"""The README's commands are the ones CI runs."""

from pathlib import Path

import effcc
from effcc.verify import count_flops

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = 'pip install -e ".[test]" && python -m pytest'
    assert command in readme
    assert ci.strip().splitlines()[-1] == command


def run_example(heading: str) -> dict:
    """Run the first Python block under `heading` in the README; its variables come back."""
    section = (ROOT / "README.md").read_text().split(heading, 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    scope = {}
    exec("import torch, effcc\n" + code, scope)
    return scope


def test_the_shared_prompt_example_runs():
    scope = run_example("### Shared prompts (Prefix Grouper)")
    assert scope["logits"].shape == (4, 6, 100) and scope["logprobs"].shape == (4, 6)
    assert all(p.grad is not None for p in scope["policy"].parameters())


def test_the_sparse_ift_example_runs():
    scope = run_example("### Sparse iso-FLOP training (Sparse-IFT)")
    res, sparse, rigl = scope["res"], scope["sparse"], scope["rigl"]
    before, after = res.passes[0].flops
    assert abs(after - before) <= 1e-4 * before
    assert count_flops(sparse, (scope["images"],)) == after  # RigL moved masks, not FLOPs
    assert any(moved for *_, moved in rigl.history)
    assert not effcc.sparsity.masked_layers(scope["fast"])


def test_the_models_larger_than_memory_example_runs():
    scope = run_example("#### Models larger than memory")
    res, ids = scope["res"], scope["ids"]
    assert [p.name for p in res.passes] == ["fold_norm_affine", "ln_to_rmsnorm"] and all(p.changed for p in res.passes)
    reference = scope["GPT2LMHeadModel"].from_pretrained("/tmp/gpt2-ckpt").eval()
    assert effcc.verify(reference, scope["rewritten"], (ids,)).within(1e-4)


def test_the_save_load_report_example_runs():
    scope = run_example("### Save, load, report")
    folder = scope["folder"]
    assert (folder / "llama-w8a8" / "effcc.json").exists() and "<svg" in (folder / "llama-w8a8.html").read_text()
    assert [p.name for p in scope["loaded"].passes] == ["smoothquant", "quantize_w8a8"]
