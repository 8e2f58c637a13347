"""What a run did, for a person: one table of passes, then every change and every refusal."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from .passes import Guarantee, Site
from .verify import Comparison


@dataclass
class PassResult:
    name: str
    guarantee: Guarantee
    changed: list[Site]
    skipped: list[Site]
    comparison: Comparison | None  # float64 error vs the original after this pass (None: not verified)
    rtol: float | None
    seconds: float
    flops: tuple[int, int] | None = None  # forward FLOPs before/after (iso-FLOP passes)
    tensor_bytes: tuple[int, int] | None = None  # bytes of the stored tensors (weights, buffers) before/after


@dataclass
class Report:
    model: str
    capture: Comparison | None  # the captured graph vs the original, before any pass
    passes: list[PassResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __rich__(self):
        seconds = sum(p.seconds for p in self.passes)
        table = Table(title=f"effcc: {self.model} ({seconds:.1f}s in passes)", title_justify="left", expand=False)
        for column in ("pass", "guarantee", "changed", "skipped", "err (f64)", "tol", "weights MiB"):
            table.add_column(column, justify="left" if column in ("pass", "guarantee") else "right", no_wrap=True)
        if self.capture is not None:
            table.add_row("(capture)", "", "", "", f"{self.capture.max_rel:.1e}", "", "")
        for p in self.passes:
            err = f"{p.comparison.max_rel:.1e}" if p.comparison else "unverified"
            if p.flops is not None:
                err = f"FLOPs {(p.flops[1] - p.flops[0]) / p.flops[0]:+.1e}"
            tol = f"{p.rtol:.0e}" if p.rtol is not None else ""
            size = f"{p.tensor_bytes[0] / 2**20:.2f} → {p.tensor_bytes[1] / 2**20:.2f}" if p.tensor_bytes else ""
            table.add_row(p.name, str(p.guarantee), str(len(p.changed)), str(len(p.skipped)), err, tol, size)
        parts = [table]
        for p in self.passes:
            if p.flops is not None:
                parts.append(
                    Text(f"  {p.name}: forward FLOPs on the example inputs: {p.flops[0]:,} dense → {p.flops[1]:,} active")
                )
            for site in p.changed:
                parts.append(Text.assemble(("  ✓ ", "green"), f"{p.name}: {site.where}: {site.detail}"))
            for site in p.skipped:
                parts.append(Text.assemble(("  ✗ ", "yellow"), f"{p.name}: skipped {site.where}: {site.detail}"))
        parts.extend(Text(f"  note: {note}", style="dim") for note in self.notes)
        return Group(*parts)

    def __str__(self) -> str:
        console = Console(width=120, file=io.StringIO(), color_system=None)
        console.print(self)
        return console.file.getvalue().rstrip()
