"""Rich progress bars shared by every long-running loop."""

from __future__ import annotations

import contextlib
import os
import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


class _Bar:
    def __init__(self, progress: Progress, task):
        self.progress, self.task = progress, task

    def advance(self, n: int = 1, **fields):
        self.progress.update(self.task, advance=n, **fields)

    def set(self, completed: int, **fields):
        self.progress.update(self.task, completed=completed, **fields)


def progress_enabled() -> bool:
    return os.environ.get("DITC_NO_PROGRESS", "") == "" and sys.stderr.isatty()


@contextlib.contextmanager
def make_progress(desc: str, total: int, completed: int = 0, status: str = ""):
    """A bar with elapsed/remaining time and a free-text status field (loss, it/s, ...)."""
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
        console=console, disable=not progress_enabled(), transient=False,
    )
    with progress:
        task = progress.add_task(desc, total=total, completed=completed, status=status)
        yield _Bar(progress, task)


def note(message: str) -> None:
    """One line on stderr about something skipped or recomputed (a damaged cache entry, a work
    shard made again), whatever the progress setting."""
    console.print(f"note: {message}", markup=False, highlight=False, soft_wrap=True)
