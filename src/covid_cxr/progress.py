"""The one progress bar: label, bar, done/total, optional rate, time left; on stderr, so stdout stays data.

Every long loop over images (decoding a cache, evaluating, predicting) shows the same bar::

    with progress_bar("[bold]evaluate[/] test", total=len(rows), rate_unit="img") as advance:
        for batch in batches:
            ...
            advance(len(batch))

A disabled bar (``enabled=False``: no terminal, a quiet run, one batch) costs nothing and
prints nothing. Training prints its own epoch lines (:mod:`covid_cxr.train.progress`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)


@contextmanager
def progress_bar(label: str, total: int, *, enabled: bool = True, transient: bool = False,
                 rate_unit: str | None = None) -> Iterator[Callable[[int], None]]:
    """A bar of ``total`` steps; yields ``advance(n)`` to call as work is done.

    ``label`` may hold rich markup. ``rate_unit`` (e.g. ``"img"``) adds the running rate
    (``41.3 img/s``); ``transient`` erases the bar when the loop ends.
    """
    columns: list[ProgressColumn] = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    if rate_unit:
        columns.append(TextColumn("{task.fields[rate]}"))
    columns.append(TimeRemainingColumn())
    started = time.perf_counter()
    with Progress(*columns, console=Console(stderr=True), disable=not enabled, transient=transient) as bar:
        task = bar.add_task(label, total=total, rate="")

        def advance(n: int = 1) -> None:
            if not rate_unit:
                bar.advance(task, n)
                return
            done = bar.tasks[0].completed + n
            rate = done / max(time.perf_counter() - started, 1e-9)
            bar.update(task, advance=n, rate=f"{rate:.1f} {rate_unit}/s")

        yield advance
