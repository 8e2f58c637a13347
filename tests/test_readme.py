"""The README's commands are the ones CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = 'pip install -e ".[test]" && python -m pytest'
    assert command in readme
    assert ci.strip().splitlines()[-1] == command


def test_the_shared_prompt_example_runs():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Shared prompts (Prefix Grouper)", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    scope = {}
    exec("import torch, effcc\n" + code, scope)
    assert scope["logits"].shape == (4, 6, 100) and scope["logprobs"].shape == (4, 6)
    assert all(p.grad is not None for p in scope["policy"].parameters())
