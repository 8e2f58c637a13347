"""Small models that ship with effcc, for the demo, the CLI and the docs.

`tiny_gpt()` is a factory in the form `effcc optimize` expects: it returns
(model, example_inputs).  The weights are random (seeded), with norm scales and shifts
drawn away from 1 and 0 so that a rewrite that mishandles them shows up as an error.
"""

from __future__ import annotations

import site
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(batch, tokens, width))


class Block(nn.Module):
    """Pre-LN: x + attn(ln1(x)), then + mlp(ln2(x))."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """A Pre-LN GPT with learned positions and an LM head tied to the token embedding."""

    def __init__(self, vocab: int = 256, width: int = 64, depth: int = 2, heads: int = 4, context: int = 64):
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tokens.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.tokens(ids) + self.positions(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def tiny_gpt(seed: int = 0, batch: int = 2, tokens: int = 16):
    """(TinyGPT with seeded random weights, (token ids,)) — a factory for `effcc optimize`."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = TinyGPT().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.copy_(1 + 0.5 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=generator))
    ids = torch.randint(0, model.tokens.num_embeddings, (batch, tokens), generator=generator)
    return model, (ids,)


def tiny_gpt_with_calibration(seed: int = 0, batches: int = 4):
    """(TinyGPT, (token ids,), calibration batches): a factory for passes that calibrate (smoothquant, os_plus)."""
    model, example_inputs = tiny_gpt(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    calibration = [(torch.randint(0, model.tokens.num_embeddings, (4, 32), generator=generator),) for _ in range(batches)]
    return model, example_inputs, calibration


class BasicBlock(nn.Module):
    """ResNet's two 3×3 convs with batch norms and a shortcut (a 1×1 conv + BN when the shape changes)."""

    def __init__(self, channels_in: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or channels_in != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(channels_in, channels, 1, stride, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18's layout (a stem, four stages of two basic blocks, average pool, linear), as torchvision's
    CIFAR-style variants build it: a 3×3 stem without max pooling, base width `width` (64 in the paper)."""

    def __init__(self, num_classes: int = 10, width: int = 64, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        stages, channels_in = [], width
        for i, channels in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(channels_in, channels, stride), BasicBlock(channels, channels)))
            channels_in = channels
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(channels_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def installed_text_corpus() -> torch.Tensor:
    """English text found on this machine, as byte ids: the package descriptions and the .md / .rst
    files in site-packages.  For training small byte-level models offline (no download)."""
    parts = []
    for folder in site.getsitepackages():
        for path in (
            sorted(Path(folder).glob("*.dist-info/METADATA"))
            + sorted(Path(folder).glob("**/*.md"))
            + sorted(Path(folder).glob("**/*.rst"))
        ):
            parts.append(path.read_bytes())
    return torch.frombuffer(bytearray(b"\n".join(parts)), dtype=torch.uint8).long()


def text_windows(data: torch.Tensor, count: int, context: int, generator: torch.Generator) -> torch.Tensor:
    """`count` random windows of context + 1 tokens (inputs and their next-token targets)."""
    starts = torch.randint(0, len(data) - context - 1, (count,), generator=generator)
    return torch.stack([data[s : s + context + 1] for s in starts.tolist()])
