"""What a run did, for a person: one table of passes, then every change and every refusal.

`print(result.report)` gives the table in a terminal (rich); `result.report.save("run.html")`
(or ".md") writes the same facts as a file, with plots drawn from the numbers the passes
recorded at each site (`Site.figures`): per-layer weight error, per-channel activation maxima
before and after smoothing, Fairy2i's weight error per stage.  `to_dict` / `from_dict` give
the report as plain JSON-ready data.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import io
import math
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from .errors import EffccError
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

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "guarantee": str(self.guarantee),
            "changed": [_site_to_dict(s) for s in self.changed],
            "skipped": [_site_to_dict(s) for s in self.skipped],
            "comparison": _comparison_to_dict(self.comparison),
            "rtol": _number_to_json(self.rtol),
            "seconds": self.seconds,
            "flops": list(self.flops) if self.flops is not None else None,
            "tensor_bytes": list(self.tensor_bytes) if self.tensor_bytes is not None else None,
        }

    @classmethod
    def from_dict(cls, d: dict) -> PassResult:
        return cls(
            name=d["name"],
            guarantee=Guarantee(d["guarantee"]),
            changed=[_site_from_dict(s) for s in d["changed"]],
            skipped=[_site_from_dict(s) for s in d["skipped"]],
            comparison=_comparison_from_dict(d["comparison"]),
            rtol=_number_from_json(d["rtol"]),
            seconds=d["seconds"],
            flops=tuple(d["flops"]) if d.get("flops") is not None else None,
            tensor_bytes=tuple(d["tensor_bytes"]) if d.get("tensor_bytes") is not None else None,
        )


@dataclass
class Report:
    model: str
    capture: Comparison | None  # the captured graph vs the original, before any pass
    passes: list[PassResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __rich__(self):
        seconds = sum(p.seconds for p in self.passes)
        table = Table(title=f"effcc: {self.model} ({seconds:.1f}s in passes)", title_justify="left", expand=False)
        # The files' summary, less the absolute error and the seconds (the title has the total).
        shown = [i for i, column in enumerate(_COLUMNS) if column not in ("max abs (f64)", "seconds")]
        for i in shown:
            column = {"max rel (f64)": "err (f64)"}.get(_COLUMNS[i], _COLUMNS[i])
            table.add_column(column, justify="left" if column in ("pass", "guarantee") else "right", no_wrap=True)
        for row in _summary_rows(self):
            table.add_row(*(row[i] for i in shown))
        parts = [table]
        for p in self.passes:
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

    def to_dict(self) -> dict:
        """The report as plain data (str, numbers, lists, dicts, None) for JSON."""
        return {
            "model": self.model,
            "capture": _comparison_to_dict(self.capture),
            "passes": [p.to_dict() for p in self.passes],
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Report:
        return cls(
            model=d["model"],
            capture=_comparison_from_dict(d["capture"]),
            passes=[PassResult.from_dict(p) for p in d["passes"]],
            notes=list(d["notes"]),
        )

    def to_markdown(self, path: str | Path | None = None) -> str:
        """The report as Markdown.  With `path` (where the text will be written), the plots are
        written as SVG files into `<stem>_files/` beside it and linked; without it they are left out."""
        images = _write_plots(self, Path(path)) if path is not None else {}
        lines = [f"# effcc report: {self.model}", "", *_markdown_table(self), ""]
        lines += [f"- note: {note}" for note in self.notes]
        for i, p in enumerate(self.passes):
            lines += ["", f"## {p.name} ({p.guarantee})", ""]
            for title, link in images.get(i, []):
                lines += [f"![{title}]({link})", ""]
            lines += _markdown_sites(f"Changed ({len(p.changed)})", p.changed)
            lines += _markdown_sites(f"Skipped ({len(p.skipped)})", p.skipped)
        return "\n".join(lines).rstrip() + "\n"

    def to_html(self) -> str:
        """The report as one self-contained HTML page (plots inline as SVG, no external resources)."""
        plots = dict(_plots_by_pass(self))
        body = [f"<h1>effcc report: {html.escape(self.model)}</h1>", _html_table(self)]
        if self.notes:
            body.append("<ul class='notes'>" + "".join(f"<li>{html.escape(n)}</li>" for n in self.notes) + "</ul>")
        for i, p in enumerate(self.passes):
            body.append(f"<section><h2>{html.escape(p.name)} <small>{html.escape(str(p.guarantee))}</small></h2>")
            for _, title, svg in plots.get(i, []):
                body.append(f"<figure>{_inline(svg)}<figcaption>{html.escape(title)}</figcaption></figure>")
            body.append(_html_sites(f"Changed ({len(p.changed)})", p.changed, opened=False))
            body.append(_html_sites(f"Skipped ({len(p.skipped)})", p.skipped, opened=True))  # refusals are what to read
            body.append("</section>")
        return (
            "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>effcc report: {html.escape(self.model)}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(body)
            + "\n</body></html>\n"
        )

    def save(self, path: str | Path) -> Path:
        """Write the report to `path`: Markdown (.md, .markdown; plots beside it) or HTML (.html, .htm)."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix in (".md", ".markdown"):
            text = self.to_markdown(path)
        elif suffix in (".html", ".htm"):
            text = self.to_html()
        else:
            raise EffccError(
                f"cannot save a report as {suffix or 'a file without a suffix'!r} ({path}): name it .html/.htm or .md/.markdown"
            )
        path.write_text(text, encoding="utf-8")
        return path


# --- cells shared by the terminal table and the files ---


def _error_cell(p: PassResult, measure) -> str:
    """The float64 error; an iso-FLOP pass changes the function on purpose, so it has none to show."""
    if p.comparison is not None:
        return f"{measure(p.comparison):.1e}"
    return "—" if p.guarantee is Guarantee.ISO_FLOP else "unverified"


def _tolerance_cell(p: PassResult) -> str:
    return f"{p.rtol:.0e}" if p.rtol is not None else ""


def _flops_cell(p: PassResult) -> str:
    return f"{_si(p.flops[0])} → {_si(p.flops[1])}" if p.flops is not None else ""


def _bytes_cell(p: PassResult) -> str:
    return f"{p.tensor_bytes[0] / 2**20:.2f} → {p.tensor_bytes[1] / 2**20:.2f}" if p.tensor_bytes else ""


def _si(count: int) -> str:
    for factor, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(count) >= factor:
            return f"{count / factor:.2f}{unit}"
    return str(count)


_COLUMNS = ("pass", "guarantee", "changed", "skipped", "max abs (f64)", "max rel (f64)", "tol", "FLOPs", "weights MiB", "seconds")


def _summary_rows(report: Report) -> list[tuple[str, ...]]:
    rows = []
    if report.capture is not None:
        c = report.capture
        rows.append(("(capture)", "", "", "", f"{c.max_abs:.1e}", f"{c.max_rel:.1e}", "", "", "", ""))
    for p in report.passes:
        rows.append(
            (
                p.name,
                str(p.guarantee),
                str(len(p.changed)),
                str(len(p.skipped)),
                _error_cell(p, lambda c: c.max_abs),
                _error_cell(p, lambda c: c.max_rel),
                _tolerance_cell(p),
                _flops_cell(p),
                _bytes_cell(p),
                f"{p.seconds:.2f}",
            )
        )
    return rows


# --- Markdown ---


def _markdown_table(report: Report) -> list[str]:
    def row(cells) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return [row(_COLUMNS), row("---" for _ in _COLUMNS), *(row(r) for r in _summary_rows(report))]


def _write_plots(report: Report, path: Path) -> dict[int, list[tuple[str, str]]]:
    """Write the plots as SVG files into `<stem>_files/` beside `path`: pass index → [(title, relative link)]."""
    folder = path.parent / f"{path.stem}_files"
    links = {}
    for index, plots in _plots_by_pass(report):
        folder.mkdir(parents=True, exist_ok=True)
        for slug, title, svg in plots:
            (folder / f"{slug}.svg").write_text(svg, encoding="utf-8")
            links.setdefault(index, []).append((title, urllib.parse.quote(f"{folder.name}/{slug}.svg")))
    return links


def _markdown_sites(heading: str, sites: list[Site]) -> list[str]:
    if not sites:
        return []
    return [f"### {heading}", "", *(f"- `{s.where}`: {s.detail}" for s in sites), ""]


# --- HTML ---

_CSS = (
    "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:72em;padding:0 1em;color:#222}"
    "table{border-collapse:collapse}th,td{padding:.25em .6em;border-bottom:1px solid #ddd;text-align:right}"
    "th:first-child,td:first-child,th:nth-child(2),td:nth-child(2){text-align:left}"
    "h2 small{color:#777;font-weight:normal}figure{margin:1em 0}figure svg{max-width:100%;height:auto}"
    "figcaption{color:#555;font-size:.9em}details{margin:.5em 0}summary{cursor:pointer;font-weight:600}"
    "li{margin:.15em 0}code{background:#f4f4f4;padding:0 .2em}.notes{color:#555}"
)


def _html_table(report: Report) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in _COLUMNS)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in _summary_rows(report))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _html_sites(heading: str, sites: list[Site], opened: bool) -> str:
    if not sites:
        return ""
    items = "".join(f"<li><code>{html.escape(s.where)}</code>: {html.escape(s.detail)}</li>" for s in sites)
    return f"<details{' open' if opened else ''}><summary>{html.escape(heading)}</summary><ul>{items}</ul></details>"


def _inline(svg: str) -> str:
    """matplotlib's SVG file without its XML declaration and doctype, to sit inside HTML."""
    return svg[svg.index("<svg") :]


# --- plots (matplotlib, imported only when there is something to draw) ---

ACTIVATION_SITES = 4  # activation plots show this many sites of a pass: those smoothing flattened most


def _layer_name(site: Site) -> str:
    return site.where.split(" (")[0]


def _draw_layer_error(fig, sites: list[Site]) -> None:
    names, errors = [_layer_name(s) for s in sites], [s.figures["weight_rel_error"] for s in sites]
    fig.set_size_inches(min(16, 4 + 0.25 * len(sites)), 4)
    ax = fig.add_subplot()
    ax.bar(range(len(errors)), errors, color="#4c72b0")
    _label_layers(ax, names)
    ax.set_ylabel("weight max rel error")
    ax.set_title("per-layer weight error (graph order)")


def _draw_stages(fig, sites: list[Site]) -> None:
    names = [_layer_name(s) for s in sites]
    stages = max(len(s.figures["weight_error_by_stage"]) for s in sites)
    fig.set_size_inches(min(16, 4 + 0.25 * len(sites)), 4)
    ax = fig.add_subplot()
    for stage in range(stages):
        errors = [s.figures["weight_error_by_stage"][stage] for s in sites if len(s.figures["weight_error_by_stage"]) > stage]
        ax.plot(range(len(errors)), errors, marker="o", label=f"stage {stage + 1}")
    _label_layers(ax, names)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("relative weight error (Frobenius)")
    ax.set_title("weight error per Fairy2i stage")
    ax.legend()


def _draw_activations(fig, sites: list[Site]) -> None:
    def flattening(site: Site) -> float:
        return max(site.figures["act_absmax_before"]) / max(max(site.figures["act_absmax_after"]), 1e-300)

    shown = sorted(sites, key=flattening, reverse=True)[:ACTIVATION_SITES]
    fig.set_size_inches(10, 2.6 * len(shown))
    for i, site in enumerate(shown):
        ax = fig.add_subplot(len(shown), 1, i + 1)
        before, after = site.figures["act_absmax_before"], site.figures["act_absmax_after"]
        ax.plot(before, label="before", color="#c44e52", linewidth=0.9)
        ax.plot(after, label="after", color="#4c72b0", linewidth=0.9)
        ax.set_yscale("log")
        ax.set_title(f"{_layer_name(site)}: max |x| {max(before):.3g} → {max(after):.3g}", fontsize=9)
        ax.set_ylabel("max |x|")
        ax.legend(fontsize=8, loc="upper right")
    fig.axes[-1].set_xlabel("channel")


def _label_layers(ax, names: list[str]) -> None:
    step = max(1, len(names) // 48)  # at most ~48 names under the axis; the rest are still bars
    ticks = list(range(0, len(names), step))
    ax.set_xticks(ticks, [names[i] for i in ticks], rotation=90, fontsize=6)
    ax.set_xlabel("layer")


# figure name a pass records → (plot title, file slug, drawing function)
PLOTS = {
    "weight_rel_error": ("per-layer weight error", "layer-error", _draw_layer_error),
    "act_absmax_before": ("per-channel activation max before / after smoothing", "activations", _draw_activations),
    "weight_error_by_stage": ("weight error per stage", "stages", _draw_stages),
}


def _plots_by_pass(report: Report):
    """(pass index, [(file slug, title, SVG text)]) for every pass whose sites recorded something to plot."""
    for index, p in enumerate(report.passes):
        drawn = []
        for figure, (title, kind, draw) in PLOTS.items():
            sites = [s for s in p.changed if figure in s.figures]
            if sites:
                slug = f"{index:02d}-{p.name}-{kind}"
                drawn.append((slug, f"{p.name}: {title}", _svg(functools.partial(draw, sites=sites), slug)))
        if drawn:
            yield index, drawn


def _svg(draw, slug: str) -> str:
    """Draw on a fresh matplotlib Figure and return it as SVG text.

    A bare Figure (not pyplot) renders without touching the user's global backend or state."""
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError as error:
        raise EffccError("the report's plots need matplotlib: pip install 'effcc[report]'") from error
    # text kept as text (smaller, searchable); ids salted per plot so several SVGs can share one HTML page
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": slug}):
        fig = Figure(layout="constrained")
        draw(fig)
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    return buffer.getvalue()


# --- plain data ---


def _site_to_dict(site: Site) -> dict:
    return {"where": site.where, "detail": site.detail, "figures": dict(site.figures)}


def _site_from_dict(d: dict) -> Site:
    return Site(d["where"], d["detail"], dict(d.get("figures", {})))


def _comparison_to_dict(comparison: Comparison | None) -> dict | None:
    if comparison is None:
        return None
    return {key: _number_to_json(value) for key, value in dataclasses.asdict(comparison).items()}


def _comparison_from_dict(d: dict | None) -> Comparison | None:
    return Comparison(**{key: _number_from_json(value) for key, value in d.items()}) if d is not None else None


def _number_to_json(value):
    """inf and nan as strings: strict JSON has no literal for them (an unbounded lossy pass has rtol = inf)."""
    return repr(value) if isinstance(value, float) and not math.isfinite(value) else value


def _number_from_json(value):
    return float(value) if value in ("inf", "-inf", "nan") else value
