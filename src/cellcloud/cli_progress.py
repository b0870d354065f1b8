"""Progress for CLI commands that wait (deploy, image push, migrate, rollout), with
``rich.progress``, on stderr.

Only on a terminal: when stderr is not one (a pipe, a log file, a test), nothing is drawn and
the command's output stays exactly as plain as before. A transfer shows bytes sent against
the total (when known); a wait with no measure shows a spinner and the time elapsed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

Advance = Callable[[int, int], None]  # (bytes just sent, bytes in all: 0 if not known)


def _console(console: Console | None) -> Console:
    return console if console is not None else Console(stderr=True)


def _ignore(n: int, total: int = 0) -> None:
    pass


@contextlib.contextmanager
def transfer(description: str, total: int | None,
             console: Console | None = None) -> Iterator[Advance]:
    """A bar of bytes sent; yields ``advance(n, total)`` (total 0: the one given here)."""
    con = _console(console)
    if not con.is_terminal:
        yield _ignore
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                  DownloadColumn(), TransferSpeedColumn(), TimeElapsedColumn(),
                  console=con, transient=True) as progress:
        task = progress.add_task(description, total=total)

        def advance(n: int, total: int = 0) -> None:
            if total:
                progress.update(task, total=total)
            progress.advance(task, n)

        yield advance


@contextlib.contextmanager
def waiting(description: str, console: Console | None = None) -> Iterator[None]:
    """A spinner and the time elapsed while something with no measure of its own runs."""
    con = _console(console)
    if not con.is_terminal:
        yield
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=con, transient=True) as progress:
        progress.add_task(description, total=None)
        yield


BlobProgress = Callable[[str, int, int], None]  # (digest, bytes just sent, blob size)


@contextlib.contextmanager
def blobs(description: str, console: Console | None = None) -> Iterator[BlobProgress]:
    """One bar per blob (an image push), as ``docker push`` shows its layers."""
    con = _console(console)
    if not con.is_terminal:
        yield lambda digest, n, size: None
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                  DownloadColumn(), TransferSpeedColumn(), console=con,
                  transient=True) as progress:
        tasks: dict[str, TaskID] = {}

        def advance(digest: str, n: int, size: int) -> None:
            task = tasks.get(digest)
            if task is None:
                task = tasks[digest] = progress.add_task(
                    f"{description} {digest.removeprefix('sha256:')[:12]}", total=size)
            progress.advance(task, n)

        yield advance
