"""effcc.save / effcc.load: safetensors + a JSON description; a round trip computes the same outputs, bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build, token_ids

import effcc
from effcc.errors import EffccError
from effcc.models import ResNet18
from effcc.offload import empty_weights, optimize_checkpoint
from effcc.program import graph_tensors

CASES = {  # exact, compressing, smoothing + int8, int4, complex 2-bit codes
    "gpt2": None,  # the default passes; GPT-2 ties its embeddings
    "bloom": ["ln_to_crmsnorm"],
    "llama": [("smoothquant", {"alpha": 0.5}), "quantize_w8a8"],
    "opt": ["os_plus", ("quantize_w4a16", {"group_size": 16})],
    "qwen2": ["real_to_complex", ("fairy2i", {"stages": 2})],
}


def same_outputs(a, b, *inputs):
    torch.testing.assert_close(a(*inputs).logits, b(*inputs).logits, rtol=0, atol=0)


@pytest.mark.parametrize("arch", list(CASES))
def test_round_trip_gives_identical_outputs(arch, tmp_path):
    model = build(arch)
    calibration = [(token_ids(batch=2, tokens=16, seed=s),) for s in range(2)]
    result = effcc.optimize(model, (token_ids(),), passes=CASES[arch], calibration=calibration)

    effcc.save(result, tmp_path / "saved")
    loaded = effcc.load(tmp_path / "saved")

    # on the example inputs and on a shape the model was not captured with
    same_outputs(result.model, loaded.model, token_ids())
    same_outputs(result.model, loaded.model, token_ids(batch=3, tokens=11, seed=5))
    # the report travels with the model
    assert [p.name for p in loaded.passes] == [p.name for p in result.passes]
    # the description is plain JSON a person can read: every operator by name
    description = json.loads((tmp_path / "saved" / "effcc.json").read_text())
    targets = {node.get("target") for node in description["graph"]["nodes"] if node["op"] == "call_function"}
    assert all(isinstance(t, str) for t in targets)
    expected_op = {
        "llama": "effcc::w8a8_linear.default",
        "opt": "effcc::w4a16_linear.default",
        "qwen2": "effcc::fairy2i_linear.default",
    }
    if arch in expected_op:
        assert expected_op[arch] in targets


def test_tied_tensors_are_stored_once_and_stay_tied(tmp_path):
    from safetensors import safe_open

    result = effcc.optimize(build("gpt2"), (token_ids(),), passes=[])  # GPT-2 reads wte as its LM head too
    folder = effcc.save(result, tmp_path / "saved")
    tensors = json.loads((folder / "effcc.json").read_text())["tensors"]
    assert tensors["lm_head.weight"]["key"] == tensors["transformer.wte.weight"]["key"]
    with safe_open(str(folder / "model.safetensors"), "pt") as stored:
        assert len(list(stored.keys())) == len({entry["key"] for entry in tensors.values()}) < len(tensors)
    loaded = effcc.load(folder).program
    names = [name for name in graph_tensors(loaded.gm) if "wte" in name or "lm_head" in name]
    assert len({id(loaded.tensor(name)) for name in names}) == 1  # one tensor ...
    assert sum(len(loaded.readers(name)) for name in names) == 2  # ... read by the embedding and the LM head


def test_a_cnn_round_trips(tmp_path):
    torch.manual_seed(0)
    model = ResNet18(num_classes=10, width=8).eval()
    images = torch.randn(2, 3, 32, 32)
    result = effcc.optimize(model, (images,), passes=None)
    loaded = effcc.load(effcc.save(result, tmp_path / "cnn"))
    other = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(loaded.model(other), result.model(other), rtol=0, atol=0)


def test_a_loaded_result_exports_to_onnx(tmp_path):
    result = effcc.optimize(build("llama"), (token_ids(),), passes=["ln_to_rmsnorm"])
    loaded = effcc.load(effcc.save(result, tmp_path / "saved"))
    path = effcc.export_onnx(loaded, tmp_path / "model.onnx")
    comparison = effcc.check_onnx(path, result, (token_ids(batch=1, tokens=6, seed=3),))
    assert comparison.within(1e-4), comparison


def test_an_optimize_checkpoint_folder_loads_directly(tmp_path):
    from transformers import LlamaForCausalLM

    model = build("llama")
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="20KB")
    config = model.config
    with empty_weights():
        shell = LlamaForCausalLM(config).eval()
    ids = token_ids()
    streamed = optimize_checkpoint(shell, tmp_path / "ckpt", (ids,), ["ln_to_rmsnorm"], out=tmp_path / "out")
    in_memory = effcc.optimize(model, (ids,), passes=["ln_to_rmsnorm"])

    loaded = effcc.load(tmp_path / "out")

    same_outputs(loaded.model, in_memory.model, token_ids(batch=3, tokens=9, seed=7))
    # and saving the streamed result again copies its shards without loading the model at once
    again = effcc.load(effcc.save(streamed, tmp_path / "again", shard_bytes=4096))
    assert len(list((tmp_path / "again").glob("model-*.safetensors"))) > 2
    same_outputs(again.model, in_memory.model, ids)


def test_loading_never_runs_code_named_in_the_file(tmp_path):
    result = effcc.optimize(build("gpt2"), (token_ids(),), passes=[])
    folder = effcc.save(result, tmp_path / "saved")
    description = json.loads((folder / "effcc.json").read_text())
    node = next(n for n in description["graph"]["nodes"] if n["op"] == "call_function")
    for target in ("builtins.eval", "os.system", "aten::__import__.default", "subprocess::run.default"):
        node["target"] = target
        (folder / "effcc.json").write_text(json.dumps(description))
        with pytest.raises(EffccError, match=rf"node {node['name']!r}.*(unknown|not registered|not an operator)"):
            effcc.load(folder)
    node["op"] = "call_method"
    (folder / "effcc.json").write_text(json.dumps(description))
    with pytest.raises(EffccError, match="call_method"):
        effcc.load(folder)


def test_bad_folders_are_named(tmp_path):
    with pytest.raises(EffccError, match="not a model saved by effcc.save"):
        effcc.load(tmp_path)
    (tmp_path / "effcc.json").write_text('{"format": "something else"}')
    with pytest.raises(EffccError, match="not an effcc saved model"):
        effcc.load(tmp_path)
    (tmp_path / "effcc.json").write_text("{")
    with pytest.raises(EffccError, match="not valid JSON"):
        effcc.load(tmp_path)


def test_what_save_cannot_write_is_named_with_what_to_save_instead(tmp_path):
    model = build("gpt2")
    with pytest.raises(EffccError, match="got a GPT2LMHeadModel; optimize the model first"):
        effcc.save(model, tmp_path / "plain")
    with pytest.raises(EffccError, match="cannot write a SharedPrefixModel.*effcc.shared_prefix\\(model\\) again"):
        effcc.save(effcc.shared_prefix(model), tmp_path / "grouped")
    assert not (tmp_path / "plain").exists() and not (tmp_path / "grouped").exists()


def test_a_sparse_ift_result_saved_after_rigl_training_keeps_the_trained_weights_and_masks(tmp_path):
    """The captured graph shares the trainable module's tensors, and RigL moves masks in place: what is saved is what was trained."""
    from effcc.sparsity import RigL

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    x = torch.randn(32, 16)
    res = effcc.optimize(model, (x,), passes=["sparse_ift"])
    optimizer = torch.optim.Adam(res.model.parameters(), lr=1e-2)
    updater = RigL(res.model, optimizer, total_steps=30, update_every=10)
    for _ in range(30):
        optimizer.zero_grad()
        res.model(x).square().mean().backward()
        optimizer.step()
        updater.step()
    assert sum(u.grown for u in updater.history) > 0  # masks did move
    loaded = effcc.load(effcc.save(res, tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), res.model(x), rtol=0, atol=0)
