"""The ``tlora`` command: run the pipeline, sweep budgets and methods, and walk an adapter's lineage.

    tlora run configs/demo.yaml --set train.max_steps=50
    tlora sweep configs/demo.yaml --budget 840 --budget 1680 --method tlora --method lora
    tlora lineage artifacts/stages/train/<key>
    tlora report latest --out report.html

Configs are validated before anything is imported or run; an invalid one exits with status 2 and one line per
field at fault, as does an artifacts folder that takes no files. A full disk, an unreachable MLflow server or a
Prefect API that goes away exits with status 1 and one line saying what to do (``flows.failures``); the stages
finished by then stay valid and the next run reuses them.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table
from rich.tree import Tree

import flows  # noqa: F401  (offline and quiet defaults, before Prefect and MLflow load)
from flows.config import ConfigError, PipelineConfig, load_config
from tlora.allocation import Budget
from tlora.methods import ABLATIONS, Method

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="TLoRA: task-aware LoRA adapters, as a cached Prefect pipeline with lineage in MLflow.")
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160)

ConfigPath = Annotated[Path, typer.Argument(help="A YAML config (see configs/).", show_default=False)]
Overrides = Annotated[list[str] | None, typer.Option("--set", help="Override a field: --set train.max_steps=50.")]
T = TypeVar("T")
Progress = Annotated[bool, typer.Option(help="Show the library's progress bars.")]
GpuDeployment = Annotated[str | None, typer.Option(
    help="Run train, evaluate and merge as runs of this deployment (tlora-train/gpu, deploy/prefect.yaml) on the "
         "gpu work pool; the store must be shared with its workers.")]


@app.command()
def run(config: ConfigPath, set_: Overrides = None, progress: Progress = True,
        gpu_deployment: GpuDeployment = None) -> None:
    """Run the whole pipeline for the config's budget and method."""
    cfg = _load(config, set_)
    _logging()
    from flows.pipeline import pipeline

    start = time.perf_counter()
    result = _guarded(cfg, lambda: pipeline(cfg, progress=progress, gpu_deployment=gpu_deployment))
    _report(result)
    console.print(f"done in {time.perf_counter() - start:.0f} s")


@app.command()
def sweep(
    config: ConfigPath,
    budget: Annotated[list[str] | None, typer.Option(
        help="Total rank (840), rank=840, params=120000 or default (N·r); repeat for several.")] = None,
    method: Annotated[list[str] | None, typer.Option(
        help=f"One of {', '.join(ABLATIONS)}; repeat for several.")] = None,
    set_: Overrides = None,
    progress: Progress = True,
    gpu_deployment: GpuDeployment = None,
) -> None:
    """Run several budgets and methods in one flow run, sharing the task-side stages."""
    cfg = _load(config, set_)
    try:
        budgets = [parse_budget(b) for b in budget] if budget else [cfg.allocation.budget]
        methods = [parse_method(m) for m in method] if method else [cfg.method]
        for b in budgets:
            for m in methods:
                cfg.with_branch(budget=b, method=m)  # validate every branch before running any
    except (ValueError, ConfigError) as err:
        _fail(str(err))
    _logging()
    from flows.pipeline import sweep as sweep_flow

    start = time.perf_counter()
    _report(_guarded(cfg, lambda: sweep_flow(cfg, budgets, methods, progress=progress,
                                             gpu_deployment=gpu_deployment)))
    console.print(f"done in {time.perf_counter() - start:.0f} s")


@app.command()
def lineage(
    target: Annotated[str, typer.Argument(help="An MLflow run id or an artifact folder (adapter, merged model...).")],
    tracking_uri: Annotated[str | None, typer.Option(
        help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else artifacts/mlflow/mlflow.db).")] = None,
    root: Annotated[Path, typer.Option(help="The store root of the default tracking URI.")] = Path("artifacts"),
) -> None:
    """Print the chain of stage runs behind an adapter, back to the model and the calibration samples."""
    from mlflow import MlflowClient

    from flows.lineage import leaves, walk
    from flows.lineage import tracking_uri as resolve_uri
    from flows.store import read_manifest

    client = MlflowClient(resolve_uri(tracking_uri, root))
    if Path(target).is_dir():
        try:
            run_ids = [read_manifest(target).run_id]
        except ValueError as err:
            _fail(str(err))
    try:
        if not Path(target).is_dir():
            run = client.get_run(target)
            run_ids = [target] if "tlora.stage" in run.data.tags else leaves(client, target)
        trees = [walk(client, run_id) for run_id in run_ids]
    except Exception as err:
        _explain_or_raise(err, tracking_uri=client.tracking_uri)
    for found in trees:
        nodes = {n.run_id: n for n in found}
        console.print(_tree(nodes, next(iter(nodes)), set()))


@app.command()
def report(
    runs: Annotated[list[str] | None, typer.Argument(
        help="MLflow parent run ids (one per `tlora run`/`tlora sweep`), or `latest` (the default).",
        show_default=False)] = None,
    out: Annotated[Path, typer.Option(help="The HTML file to write.")] = Path("report.html"),
    experiment: Annotated[str, typer.Option(help="The MLflow experiment `latest` looks in.")] = "tlora",
    tracking_uri: Annotated[str | None, typer.Option(
        help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else artifacts/mlflow/mlflow.db).")] = None,
    root: Annotated[Path, typer.Option(help="The store root of the default tracking URI.")] = Path("artifacts"),
    ui_url: Annotated[str | None, typer.Option(
        help="Base of the run links (default: the tracking URI if http(s), else mlflow ui's 127.0.0.1:5000).")] = None,
) -> None:
    """Write one self-contained HTML page comparing the methods and budgets of pipeline runs."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from flows.lineage import tracking_uri as resolve_uri
    from flows.report import collect, latest_parent, render

    client = MlflowClient(resolve_uri(tracking_uri, root))
    try:
        ids = [latest_parent(client, experiment) if r == "latest" else r for r in (runs or ["latest"])]
        page = render(collect(client, ids, ui_url))
    except (ValueError, MlflowException) as err:
        _fail(str(err))
    out.write_text(page)
    console.print(f"report of {', '.join(ids)} written to {_short(str(out))} ({len(page) / 1e6:.1f} MB)")


def parse_budget(text: str) -> Budget | None:
    """``840`` or ``rank=840`` (total rank), ``params=120000``, or ``default`` (N·r)."""
    if text == "default":
        return None
    kind, _, value = text.rpartition("=")
    kind = kind or "rank"
    if kind not in ("rank", "params") or not value.isdigit():
        raise ValueError(f"budget {text!r}: give a total rank (840, rank=840), params=<count>, or default")
    return Budget(**{kind: int(value)})


def parse_method(label: str) -> Method:
    if label not in ABLATIONS:
        raise ValueError(f"method {label!r} is not one of {', '.join(ABLATIONS)}")
    return ABLATIONS[label]


def _load(path: Path, overrides: list[str] | None) -> PipelineConfig:
    try:
        return load_config(path, overrides or [])
    except ConfigError as err:
        _fail(str(err))


def _fail(message: str, code: int = 2) -> NoReturn:
    console.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


def _guarded(cfg: PipelineConfig, flow: Callable[[], T]) -> T:
    """Run ``flow`` after :func:`flows.failures.preflight`; a failure of the machine around it exits with one line."""
    from prefect import tags
    from prefect.settings import PREFECT_API_URL

    from flows.failures import crash_orphans, preflight, process_tag, quiet_prefect
    from flows.lineage import tracking_uri

    root, api = Path(cfg.store.root).resolve(), PREFECT_API_URL.value()
    failure = preflight(root, cfg.store.stages_uri, cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI", ""), api)
    if failure is not None:
        _fail(failure.message, failure.exit_code)
    try:
        with quiet_prefect(), tags(process_tag()):
            crash_orphans()
            return flow()
    except Exception as err:
        _explain_or_raise(err, tracking_uri=tracking_uri(cfg.tracking.uri, root), prefect_api=api or "")


def _explain_or_raise(err: Exception, *, tracking_uri: str, prefect_api: str | None = None) -> NoReturn:
    """Exit with the one line of :func:`flows.failures.explain` for ``err``, or re-raise ``err`` if it explains none.

    With ``prefect_api`` given (a flow ran), a Prefect API that went away leaves Prefect's event and log workers
    retrying it for minutes at exit, so that case leaves at once (``os._exit``) once the line is printed: every
    artifact is already published.
    """
    from flows.failures import explain

    failure = explain(err, tracking_uri=tracking_uri, prefect_api=prefect_api or "")
    if failure is None:
        raise err
    if failure.kind == "prefect" and prefect_api is not None:
        console.print(f"[red]error:[/red] {failure.message}", highlight=False)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(failure.exit_code)
    _fail(failure.message, failure.exit_code)


def _logging() -> None:
    """Stage lines through rich; transformers' weight-loading bars and a deprecation warning of its own off."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    logger = logging.getLogger("flows")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if not any(isinstance(h, RichHandler) for h in logger.handlers):
        logger.addHandler(RichHandler(console=console, show_path=False, show_time=False, markup=False))


def _report(result) -> None:
    table = Table(title="stages", title_justify="left")
    for column in ("stage", "status", "key", "artifact"):
        table.add_column(column)
    for s in result.stages():
        table.add_row(s.stage, "[green]reused[/]" if s.reused else "computed", s.key[:12], _short(s.uri))
    console.print(table)
    for b in result.branches:
        m = b.metrics
        console.print(f"\n[bold]{b.method}[/bold]" + (f"  budget {b.budget.model_dump(exclude_none=True)}"
                                                      if b.budget else ""))
        console.print(f"  adapter       {_short(b.train.uri)}")
        if b.merge is not None:
            console.print(f"  merged model  {_short(b.merge.uri)}")
        em = f", exact_match {m['exact_match']:.3f}" if m.get("exact_match") is not None else ""
        console.print(f"  metrics       {_short(b.evaluate.uri)}/metrics.json  (loss {m['loss']:.4f}, "
                      f"perplexity {m['perplexity']:.2f}{em})")
        console.print(f"  lineage       tlora lineage {_short(b.train.uri)}")
    mlflow = Path(sys.executable).parent / "mlflow"
    mlflow_cmd = _short(str(mlflow)) if mlflow.exists() else "mlflow"
    console.print(f"\nMLflow UI: {mlflow_cmd} ui --backend-store-uri {_short_uri(result.tracking_uri)}"
                  f"   (parent run {result.parent_run_id})")


def _tree(nodes: dict, run_id: str, seen: set[str], role: str | None = None) -> Tree:
    node = nodes[run_id]
    label = f"[bold]{node.stage}[/bold]" + (f" ({role})" if role and role != node.stage else "")
    if run_id in seen:
        return Tree(f"{label}  key {node.key[:12]}  [dim](shown above)[/dim]")
    seen.add(run_id)
    tree = Tree(f"{label}  key {node.key[:12]}  run {node.run_id}")
    for line in [f"artifact {_short(node.uri)}", *_details(node)]:
        tree.add(f"[dim]{line}[/dim]")
    for child_role, child in sorted(node.inputs.items(), key=lambda kv: kv[0] == "model"):  # the model last
        if child in nodes:
            tree.add(_tree(nodes, child, seen, child_role))
    return tree


def _details(node) -> list[str]:
    """What a reader wants to see at the ends of the chain: the calibration samples and the model."""
    import json

    folder = Path(node.uri)
    lines = [f"dataset {d}" for d in node.datasets]
    try:
        if node.stage == "calibration":
            meta = json.loads((folder / "meta.json").read_text())
            ids = meta["ids"]
            lines.append(f"task {meta['task']}, n_calib {meta['n_calib']}, seed {meta['seed']}, "
                         f"data {meta['data_fingerprint'][:12]}")
            lines.append("samples " + ", ".join(ids[:5]) + (f", ... ({len(ids)} in all)" if len(ids) > 5 else ""))
        elif node.stage == "model":
            info = json.loads((folder / "fingerprint.json").read_text())
            lines.append(f"source {info['source']}, fingerprint {info['fingerprint'][:12]}, {info['dtype']}")
    except OSError:
        lines.append("(artifact not readable here)")
    return lines


def _short(uri: str) -> str:
    try:
        return os.path.relpath(uri) if "://" not in uri and not os.path.relpath(uri).startswith("..") else uri
    except ValueError:
        return uri


def _short_uri(uri: str) -> str:
    prefix = "sqlite:///"
    return prefix + _short(uri[len(prefix):]) if uri.startswith(prefix) else uri


if __name__ == "__main__":
    app()
