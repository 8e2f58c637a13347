"""Run the few PTX instructions of effcc's inline-assembly decoders on the CPU, so that their bit tricks are
tested where no GPU is (Triton's interpreter runs no PTX): prmt, shl, shr, lop3, and, and the paired
16-bit subtractions.  Registers are 32-bit Python ints; $k are the asm block's operands."""

from __future__ import annotations

import re

import torch

MASK = 0xFFFFFFFF
_FLOAT16 = {"bf16x2": torch.bfloat16, "f16x2": torch.float16}


def halves_to_floats(word: int, dtype: torch.dtype) -> list[float]:
    """The two 16-bit lanes of a register (lane 0 in the low bits) as floats of `dtype`."""
    lanes = torch.tensor([word & 0xFFFF, word >> 16], dtype=torch.int32).to(torch.int16)
    return lanes.view(dtype).float().tolist()


def floats_to_halves(values: list[float], dtype: torch.dtype) -> int:
    bits = torch.tensor(values, dtype=torch.float32).to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
    return int(bits[0]) | int(bits[1]) << 16


def _prmt(a: int, b: int, selector: int) -> int:
    source = a | b << 32
    out = 0
    for i in range(4):
        nibble = selector >> 4 * i & 0xF
        assert nibble < 8, "sign-replicating selectors are not emulated"
        out |= (source >> 8 * nibble & 0xFF) << 8 * i
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    out = 0
    for bit in range(32):
        index = (a >> bit & 1) << 2 | (b >> bit & 1) << 1 | (c >> bit & 1)
        out |= (lut >> index & 1) << bit
    return out


def run(asm: str, operands: dict[int, int]) -> dict[int, int]:
    """Execute `asm` with input operands {k: value}; returns every operand written ($k)."""
    registers: dict[str, int] = {f"${k}": v & MASK for k, v in operands.items()}

    def value(token: str) -> int:
        token = token.strip()
        return registers[token] if token in registers else int(token, 0) & MASK

    for line in asm.replace("\\n", "\n").splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        opcode, rest = line.split(None, 1)
        dest, *args = [t.strip() for t in rest.split(",")]
        if opcode == "prmt.b32":
            result = _prmt(value(args[0]), value(args[1]), value(args[2]))
        elif opcode == "shl.b32":
            result = value(args[0]) << value(args[1]) & MASK
        elif opcode == "shr.u32":
            result = value(args[0]) >> value(args[1])
        elif opcode == "lop3.b32":
            result = _lop3(*(value(t) for t in args))
        elif opcode == "and.b32":
            result = value(args[0]) & value(args[1])
        elif match := re.fullmatch(r"sub\.rn\.(bf16x2|f16x2)", opcode):
            dtype = _FLOAT16[match.group(1)]
            left, right = halves_to_floats(value(args[0]), dtype), halves_to_floats(value(args[1]), dtype)
            result = floats_to_halves([x - y for x, y in zip(left, right)], dtype)
        else:
            raise NotImplementedError(f"PTX instruction {opcode!r} is not emulated")
        registers[dest] = result
    return {int(name[1:]): v for name, v in registers.items() if name.startswith("$")}
