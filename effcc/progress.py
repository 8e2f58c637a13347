"""Progress bars for the long parts of a run (calibration, passes, float64 checks), one display at a time.

Steps started while a bar is shown become one more line of the same display, so a pass that
calibrates inside the pipeline's bar does not open a second live display (older rich refuses that)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

_shown: Progress | None = None


@contextlib.contextmanager
def steps(description: str, total: int | None) -> Iterator[Callable[..., None]]:
    """A bar of `total` steps; yields `advance(description=None, by=1)`, which moves it (and may rename it)."""
    global _shown
    owner = _shown is None
    if owner:
        _shown = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True
        )
        _shown.start()
    progress = _shown
    task = progress.add_task(description, total=total)

    def advance(description: str | None = None, by: int = 1) -> None:
        progress.update(task, advance=by, **({"description": description} if description else {}))

    try:
        yield advance
    finally:
        progress.remove_task(task)
        if owner:
            progress.stop()
            _shown = None


def each(items, description: str):
    """`items`, one after another, with a bar: for the layers of a long pass."""
    items = list(items)
    with steps(description, total=len(items)) as advance:
        for item in items:
            yield item
            advance()
