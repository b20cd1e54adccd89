"""Failures of the machine around the pipeline, told in one line that says what to do.

A full disk, an unwritable artifacts folder, an unreachable MLflow server or a Prefect API that goes away are
not bugs of the pipeline: the CLI checks what it can before any compute (:func:`preflight`) and turns the same
failures met during a run into one line (:func:`explain`) instead of a wall of tracebacks. Nothing here
deletes anything: artifacts are published atomically (``flows.store``), so whatever a failed run finished
stays valid and the next run reuses it. A killed ``tlora`` process leaves its Prefect flow and task runs
Running; the next run on the same machine marks them Crashed (:func:`crash_orphans`).
"""

from __future__ import annotations

import errno
import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

log = logging.getLogger(__name__)

Kind = Literal["disk_full", "unwritable", "mlflow", "prefect"]
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.EISDIR}
_KEEP = "finished stages stay valid and are reused when you rerun"
_TIMEOUT_S = 5.0


class Failure(BaseModel):
    """What went wrong around the pipeline, as one line, and the exit status to leave with."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Kind
    message: str
    exit_code: int = 1


def explain(err: BaseException, *, tracking_uri: str = "", prefect_api: str = "") -> Failure | None:
    """The environment failure behind ``err`` (looking through its causes), or None for anything else."""
    for exc in _chain(err):
        if isinstance(exc, OSError) and exc.errno in _FULL:
            where = f" writing {exc.filename}" if exc.filename else ""
            return Failure(kind="disk_full", message=f"no space left on the device{where}: free space or point "
                                                     f"store.root / store.stages at a larger disk; {_KEEP}")
        if isinstance(exc, OSError) and exc.errno in _DENIED and exc.filename:
            return Failure(kind="unwritable", message=f"cannot write {exc.filename} ({exc.strerror}): make the "
                                                      f"folder writable or set store.root to one that is; {_KEEP}")
    for exc in _chain(err):
        if _is_mlflow_unreachable(exc):
            return Failure(kind="mlflow", message=f"the MLflow tracking server {tracking_uri or ''} is unreachable "
                                                  "(" + _first_line(exc) + "): start it, or set tracking.uri / "
                                                  f"MLFLOW_TRACKING_URI to a reachable one; {_KEEP}")
        if _is_prefect_unreachable(exc):
            return Failure(kind="prefect", message=f"the Prefect API {prefect_api} went away during the run "
                                                   f"({_first_line(exc)}): restart it (prefect server start) or "
                                                   f"unset PREFECT_API_URL; {_KEEP}")
    return None


def preflight(root: str | Path, stages: str, tracking_uri: str, prefect_api: str | None) -> Failure | None:
    """Check, before any compute, that the artifacts folder takes files and the servers answer."""
    folders = [Path(root)] + ([] if "://" in stages else [Path(stages)])
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".write-test-{uuid.uuid4().hex[:8]}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as err:
            return Failure(kind="unwritable", exit_code=2, message=f"the artifacts folder {folder} is not writable "
                                                                   f"({err.strerror}): set store.root to a writable "
                                                                   "folder")
    if tracking_uri.startswith(("http://", "https://")):
        import requests

        try:
            requests.get(tracking_uri.rstrip("/") + "/health", timeout=_timeout("MLFLOW_HTTP_REQUEST_TIMEOUT"))
        except requests.RequestException as err:
            return Failure(kind="mlflow", message=f"the MLflow tracking server {tracking_uri} is unreachable "
                                                  f"({type(err).__name__}): start it, or set tracking.uri / "
                                                  "MLFLOW_TRACKING_URI to a reachable one")
    if prefect_api:
        import httpx

        try:
            httpx.get(prefect_api.rstrip("/") + "/health", timeout=_TIMEOUT_S).raise_for_status()
        except httpx.HTTPError as err:
            return Failure(kind="prefect", message=f"the Prefect API {prefect_api} is unreachable "
                                                   f"({type(err).__name__}): start it (prefect server start) or "
                                                   "unset PREFECT_API_URL to run with a temporary local server")
    return None


PROCESS_TAG = "tlora.process:"
"""Prefect tag prefix on the flow and task runs of a ``tlora`` process: ``tlora.process:<lineage.process_id()>``."""


def process_tag() -> str:
    """The tag this process puts on its flow runs (inherited by their task runs and subflows)."""
    from flows.lineage import process_id

    return PROCESS_TAG + process_id()


def crash_orphans(limit: int = 200) -> int:
    """Mark Crashed the flow runs, and their unfinished task runs, that a killed ``tlora`` process of this machine
    left Running or Pending; return how many flow runs. Runs of other machines, of live processes and runs
    without the tag (workers report their own crashes) are left alone; a failure here only logs a warning."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterState,
        FlowRunFilterStateType,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    from flows.lineage import orphaned

    unfinished = [StateType.RUNNING, StateType.PENDING]
    try:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=unfinished))), limit=limit)
            owners = {run.id: next((t[len(PROCESS_TAG):] for t in run.tags if t.startswith(PROCESS_TAG)), "")
                      for run in runs}
            dead = {i: o for i, o in owners.items() if orphaned(o)}
            if not dead:
                return 0
            tasks = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(dead))),
                task_run_filter=TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(any_=unfinished))))
            for task in tasks:
                client.set_task_run_state(task.id, Crashed(message="its process was killed"), force=True)
            for run_id, owner in dead.items():
                client.set_flow_run_state(run_id, Crashed(message=f"its process {owner} was killed"), force=True)
    except Exception as err:  # never worth failing the run that found them
        log.warning("could not mark flow runs of killed processes Crashed: %s", _first_line(err))
        return 0
    log.warning("marked %d Prefect flow run(s) left Running by killed processes as Crashed", len(dead))
    return len(dead)


@contextmanager
def quiet_prefect() -> Iterator[None]:
    """Keep Prefect from logging tracebacks of failures :func:`explain` will tell in one line."""
    quiet = _Quiet()
    names = ("prefect.flow_runs", "prefect.task_runs", "prefect._internal.concurrency", "prefect.events.clients")
    loggers = [logging.getLogger(name) for name in names]
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


class _Quiet(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.warned: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and explain(record.exc_info[1]) is not None:
            return False
        if record.name in ("prefect._internal.concurrency", "prefect.events.clients") and record.levelno >= 30:
            head = record.getMessage()[:40]  # one line per kind of complaint, not one per lost event
            if head in self.warned:
                return False
            self.warned.add(head)
            record.exc_info = record.exc_text = None
        return True


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    stack = [err]
    while stack:
        exc = stack.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        yield exc
        stack.extend([exc.__context__, exc.__cause__])
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(exc.exceptions)


def _is_mlflow_unreachable(exc: BaseException) -> bool:
    module = type(exc).__module__
    if module.startswith("requests") and type(exc).__name__ in ("ConnectionError", "ConnectTimeout", "ReadTimeout"):
        return True
    return module.startswith("mlflow") and "API request to" in str(exc) and "failed with exception" in str(exc)


def _is_prefect_unreachable(exc: BaseException) -> bool:
    module = type(exc).__module__
    return module.startswith(("httpx", "httpcore")) and type(exc).__name__ in (
        "ConnectError", "ConnectTimeout", "ReadTimeout", "RemoteProtocolError", "ReadError")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    reason = text[0] if text else type(exc).__name__
    if "Connection refused" in reason:
        return "connection refused"
    return reason[:120]


def _timeout(variable: str) -> float:
    try:
        return min(float(os.environ.get(variable, _TIMEOUT_S)), _TIMEOUT_S)
    except ValueError:
        return _TIMEOUT_S
