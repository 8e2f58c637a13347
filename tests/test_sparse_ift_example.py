"""examples/sparse_ift_digits.py: every family trains on the bundled digits and keeps its FLOPs while RigL moves masks."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import sparse_ift_digits


def test_digits_example_runs_every_family_at_equal_flops():
    result = sparse_ift_digits.main(["--quick"])
    rows = result["rows"]
    assert {(r["model"], r["family"]) for r in rows} == {(m, f) for m in ("mlp", "cnn") for f in ("dense", *sparse_ift_digits.FAMILIES)}
    for row in rows:
        assert 0.5 < row["mean"] <= 1.0, row  # 60 steps already learn digits well above chance (0.1)
        if row["family"] != "dense":
            assert abs(row["flops_sparse"] - row["flops_dense"]) <= 1e-4 * row["flops_dense"], row  # whole weights
            assert row["flops_after_training"] == row["flops_sparse"], row
