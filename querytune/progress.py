"""Progress bars (rich) for long work; silent when disabled or not on rank 0."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from . import distributed


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """Yields ``advance(n=1, **fields)``; ``fields`` (e.g. loss=0.3) are shown after the bar."""
    if not enabled or not distributed.is_main():
        yield lambda n=1, **fields: None
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    )
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(description, total=total, status="")

        def advance(n: int = 1, **fields: float) -> None:
            status = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
            if fields:
                progress.update(task, advance=n, status=status)
            else:
                progress.update(task, advance=n)

        yield advance


_stderr = Console(stderr=True)


def note(message: str, enabled: bool = True) -> None:
    """One line of information on stderr (rank 0 only), e.g. a choice the run made for the user."""
    if enabled and distributed.is_main():
        _stderr.print(message, highlight=False)
