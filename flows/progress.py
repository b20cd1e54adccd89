"""Progress of a long stage loop, shown twice: a rich bar in the terminal and a Prefect progress artifact in the UI.

The library reports progress through a plain ``on_progress(done, total)`` callback (``tlora`` imports no Prefect);
:func:`stage_progress` makes that callback for a stage, and :class:`ProgressCallback` adapts it to the
transformers ``Trainer`` (one call per optimizer step). The Prefect artifact exists only inside a flow or task
run; the terminal bar only when the invocation asked for progress (``tlora run --progress``, the default).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from uuid import UUID

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import TrainerCallback

log = logging.getLogger(__name__)

OnProgress = Callable[[int, int], None]
MIN_STEP = 0.01
"""Update the Prefect artifact at most once per this fraction of the total (each update is an API call)."""


class _PrefectBar:
    """A Prefect progress artifact for the current task or flow run, updated at most every ``MIN_STEP``."""

    def __init__(self, key: str, description: str) -> None:
        from prefect.artifacts import create_progress_artifact
        from prefect.context import FlowRunContext, TaskRunContext

        self.artifact_id: UUID | None = None
        self.shown = -1.0
        if TaskRunContext.get() is None and FlowRunContext.get() is None:
            return
        self.artifact_id = create_progress_artifact(progress=0.0, key=key, description=description)

    def update(self, done: int, total: int) -> None:
        if self.artifact_id is None or total <= 0:
            return
        fraction = min(done / total, 1.0)
        if fraction - self.shown < MIN_STEP and fraction < 1.0:
            return
        from prefect.artifacts import update_progress_artifact

        update_progress_artifact(self.artifact_id, progress=100.0 * fraction)
        self.shown = fraction


@contextmanager
def stage_progress(stage: str, description: str, *, terminal: bool,
                   console: Console | None = None) -> Iterator[OnProgress]:
    """Yield an ``on_progress(done, total)`` for ``stage`` that drives a rich bar and a Prefect progress artifact.

    Args:
        stage: names the Prefect artifact (key ``<stage>-progress``).
        terminal: show the rich bar (off in tests and with ``--no-progress``).
        console: where the bar goes (rich's global console by default).
    """
    prefect = _PrefectBar(f"{stage}-progress", description)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), disable=not terminal, console=console)
    task = bar.add_task(description, total=None)

    def on_progress(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)
        prefect.update(done, total)

    with bar:
        yield on_progress


class ProgressCallback(TrainerCallback):
    """Calls ``on_progress(global_step, max_steps)`` after every optimizer step of a ``Trainer``."""

    def __init__(self, on_progress: OnProgress) -> None:
        self.on_progress = on_progress

    def on_step_end(self, args, state, control, **kwargs):
        self.on_progress(state.global_step, state.max_steps)
        return control
