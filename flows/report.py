"""A self-contained HTML report comparing the methods and budgets of one or more pipeline invocations.

Read entirely through ``MlflowClient`` (DESIGN §4): each invocation is a parent run; each of its evaluate runs is
one branch (method, budget), and :func:`flows.lineage.walk` from it gives the stage runs behind it. Per branch:
the quality metrics (the evaluate stage's ``metrics.json``, else its logged metrics), the trainable parameters,
the time of every stage (of the run that computed it, marked when this invocation reused it), links to each
stage's MLflow run, and the plots the stages logged under ``plots/``. The page has inline CSS and base64 images
and loads nothing from the network.
"""

from __future__ import annotations

import base64
import html
import json
import tempfile
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Run
from pydantic import BaseModel, ConfigDict

from flows.lineage import TAG_PARENT, TAG_REUSED, TAG_STAGE, TAG_UPSTREAM, children, walk
from flows.plots import PLOTS, loss_comparison_figure, png_bytes
from tlora.methods import Method

STAGES = ("model", "calibration", "covariance", "spectrum", "sensitivity", "allocation", "init", "train",
          "evaluate", "merge")
METRICS = ("loss", "perplexity", "token_accuracy", "exact_match")
PLOT_STAGES = ("spectrum", "allocation", "train")
MLFLOW_UI = "http://127.0.0.1:5000"
"""Where ``mlflow ui`` serves by default: the links' base for a local (SQLite) tracking store."""


class StageTime(BaseModel):
    """One stage behind a branch: the run that computed it, how long that took, whether this invocation reused it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stage: str
    run_id: str
    seconds: float | None
    reused: bool


class Plot(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    stage: str
    run_id: str
    name: str
    png: bytes


class BranchReport(BaseModel):
    """One (method, budget) of one invocation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    parent_run_id: str
    parent_name: str
    method: str
    budget: str
    metrics: dict[str, float | None]
    trainable_params: int | None
    training: str
    """What else sets branches apart: the train stage's learning rate and steps."""
    train_loss: list[tuple[int, float]]
    """The train stage's logged loss per step."""
    stages: list[StageTime]
    plots: list[Plot]


class Report(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tracking_uri: str
    experiment_id: str
    ui_url: str
    branches: list[BranchReport]


def latest_parent(client: MlflowClient, experiment: str) -> str:
    """The newest parent run (one ``tlora run`` or ``tlora sweep`` invocation) of the experiment."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"no MLflow experiment {experiment!r} at {client.tracking_uri}")
    runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"], max_results=200)
    for run in runs:
        if TAG_STAGE not in run.data.tags and TAG_PARENT not in run.data.tags:
            return run.info.run_id
    raise ValueError(f"experiment {experiment!r} has no pipeline run yet")


def collect(client: MlflowClient, parent_run_ids: list[str], ui_url: str | None = None) -> Report:
    """Read every branch of the given parent runs from MLflow."""
    if not parent_run_ids:
        raise ValueError("give at least one parent run id (or 'latest')")
    cache: dict[str, Run] = {}
    branches: list[BranchReport] = []
    experiment_id = ""
    for parent_id in parent_run_ids:
        parent = _get(client, cache, parent_id)
        if TAG_STAGE in parent.data.tags:
            raise ValueError(f"run {parent_id} is a {parent.data.tags[TAG_STAGE]} stage run, not a pipeline "
                             "(parent) run: give the run id that `tlora run`/`tlora sweep` printed")
        experiment_id = parent.info.experiment_id
        stage_runs = children(client, parent)
        for child in stage_runs:
            cache[child.info.run_id] = child
        evaluations = [c for c in stage_runs if c.data.tags.get(TAG_STAGE) == "evaluate"]
        if not evaluations:
            raise ValueError(f"parent run {parent_id} has no evaluate stage run (did it fail?)")
        for evaluation in evaluations:
            branches.append(_branch(client, cache, parent, stage_runs, evaluation))
    uri = client.tracking_uri
    if ui_url is None:
        ui_url = uri if uri.startswith(("http://", "https://")) else MLFLOW_UI
    return Report(tracking_uri=uri, experiment_id=experiment_id, ui_url=ui_url.rstrip("/"), branches=branches)


def run_url(report: Report, run_id: str) -> str:
    return f"{report.ui_url}/#/experiments/{report.experiment_id}/runs/{run_id}"


def render(report: Report) -> str:
    """The report as one HTML page: quality table, stage times with run links, then the plots."""
    e = html.escape
    rows = []
    for b in report.branches:
        m = b.metrics
        cells = [b.method, b.budget, b.training, *(_fmt(m.get(k)) for k in METRICS),
                 f"{b.trainable_params:,}" if b.trainable_params is not None else "–"]
        rows.append("<tr class='branch'>" + "".join(f"<td>{e(c)}</td>" for c in cells)
                    + f"<td><a href='{e(run_url(report, b.parent_run_id))}'>{e(b.parent_name)}</a></td></tr>")
    quality = ("<table id='quality'><thead><tr><th>method</th><th>budget</th><th>training</th>"
               + "".join(f"<th>{e(k)}</th>" for k in METRICS)
               + "<th>trainable params</th><th>invocation</th></tr></thead><tbody>" + "".join(rows)
               + "</tbody></table>")
    times = []
    for b in report.branches:
        by_stage = {s.stage: s for s in b.stages}
        cells = []
        for stage in STAGES:
            s = by_stage.get(stage)
            if s is None:
                cells.append("<td class='none'>–</td>")
                continue
            label = ("–" if s.seconds is None else f"{s.seconds:.1f} s") + (" ↺" if s.reused else "")
            title = f"run {s.run_id}" + (" (computed by an earlier invocation)" if s.reused else "")
            cells.append(f"<td class='{'reused' if s.reused else 'computed'}'><a href='{e(run_url(report, s.run_id))}'"
                         f" title='{e(title)}'>{e(label)}</a></td>")
        times.append(f"<tr class='times'><td>{e(b.method)}</td><td>{e(b.budget)}</td>{''.join(cells)}</tr>")
    timing = ("<table id='times'><thead><tr><th>method</th><th>budget</th>"
              + "".join(f"<th>{s}</th>" for s in STAGES) + "</tr></thead><tbody>" + "".join(times)
              + "</tbody></table>")
    figures, seen = [], set()
    curves = {f"{b.method}, {b.budget}, {b.training} ({b.parent_name})": b.train_loss
              for b in report.branches if b.train_loss}
    if curves:
        data = base64.b64encode(png_bytes(loss_comparison_figure(curves))).decode()
        figures.append(f"<figure><img alt='training loss' src='data:image/png;base64,{data}'>"
                       "<figcaption>training loss of every branch</figcaption></figure>")
    for b in report.branches:
        for p in b.plots:
            if (p.run_id, p.name) in seen:  # the spectrum is shared by every branch of an invocation
                continue
            seen.add((p.run_id, p.name))
            caption = f"{p.stage}: {p.name}" + ("" if p.stage == "spectrum" else f" — {b.method}, {b.budget}")
            data = base64.b64encode(p.png).decode()
            figures.append(f"<figure><img alt='{e(caption)}' src='data:image/png;base64,{data}'>"
                           f"<figcaption><a href='{e(run_url(report, p.run_id))}'>{e(caption)}</a></figcaption>"
                           "</figure>")
    return _PAGE.format(n=len(report.branches), uri=e(report.tracking_uri), quality=quality, timing=timing,
                        figures="".join(figures) or "<p>No stage logged a plot.</p>")


def _branch(client: MlflowClient, cache: dict[str, Run], parent: Run, stage_runs: list[Run],
            evaluation: Run) -> BranchReport:
    nodes = {n.stage: n for n in reversed(walk(client, evaluation.info.run_id))}  # the first producer per stage
    reused_keys = {c.data.tags.get("tlora.key") for c in stage_runs if TAG_REUSED in c.data.tags}
    train = nodes.get("train")
    merge = next((c for c in stage_runs if c.data.tags.get(TAG_STAGE) == "merge" and train is not None
                  and _producer(client, cache, c).data.tags.get(TAG_UPSTREAM + "adapter") == train.run_id), None)
    stages = []
    for stage in STAGES:
        if stage == "merge":
            run = _producer(client, cache, merge) if merge is not None else None
        else:
            run = _get(client, cache, nodes[stage].run_id) if stage in nodes else None
        if run is not None:
            stages.append(StageTime(stage=stage, run_id=run.info.run_id, seconds=_seconds(run),
                                    reused=run.data.tags.get("tlora.key") in reused_keys))
    allocation = _get(client, cache, nodes["allocation"].run_id)
    method, budget = _method_and_budget(allocation.data.params)
    producer = _producer(client, cache, evaluation)
    metrics = _metrics(producer)
    trainable = _get(client, cache, train.run_id).data.metrics.get("trainable_params") if train else None
    train_params = _get(client, cache, train.run_id).data.params if train else {}
    training = f"lr {train_params.get('learning_rate', '?')}, {train_params.get('max_steps', '?')} steps"
    history = client.get_metric_history(train.run_id, "loss") if train else []
    train_loss = [(int(m.step), float(m.value)) for m in sorted(history, key=lambda m: m.step)]
    plots = [p for stage in PLOT_STAGES if stage in nodes for p in _plots(client, stage, nodes[stage].run_id)]
    return BranchReport(parent_run_id=parent.info.run_id, parent_name=parent.info.run_name or parent.info.run_id,
                        method=method, budget=budget, metrics=metrics,
                        trainable_params=int(trainable) if trainable is not None else None,
                        training=training, train_loss=train_loss, stages=stages,
                        plots=plots)


def _method_and_budget(params: dict[str, str]) -> tuple[str, str]:
    """The method label and budget from an allocation run's params (its flattened key config)."""
    fields = {k.removeprefix("method."): v for k, v in params.items() if k.startswith("method.")}
    method = Method.model_validate({k: v == "True" if v in ("True", "False") else v for k, v in fields.items()})
    budget = [f"{kind}={params[f'budget.{kind}']}" for kind in ("rank", "params")
              if params.get(f"budget.{kind}", "None") != "None"]
    return method.label, ", ".join(budget) or ("default" if method.name == "tlora" and method.rank else "uniform r")


def _metrics(evaluation: Run) -> dict[str, float | None]:
    """``metrics.json`` of the evaluate artifact where it is readable here, else the run's logged metrics."""
    uri = evaluation.data.tags.get("tlora.uri", "")
    try:
        data = json.loads((Path(uri) / "metrics.json").read_text()) if uri and "://" not in uri else None
    except (OSError, ValueError):
        data = None
    source = data if isinstance(data, dict) else evaluation.data.metrics
    return {k: (float(source[k]) if source.get(k) is not None else None) for k in METRICS}


def _plots(client: MlflowClient, stage: str, run_id: str) -> list[Plot]:
    out = []
    with tempfile.TemporaryDirectory(prefix="tlora-report-") as tmp:
        for item in client.list_artifacts(run_id, PLOTS):
            if item.path.endswith(".png"):
                local = client.download_artifacts(run_id, item.path, tmp)
                out.append(Plot(stage=stage, run_id=run_id, name=Path(item.path).stem, png=Path(local).read_bytes()))
    return out


def _producer(client: MlflowClient, cache: dict[str, Run], run: Run) -> Run:
    """The run that computed a stage: ``run`` itself, or the run a reuse run points at."""
    producer = run.data.tags.get(TAG_REUSED)
    return _get(client, cache, producer) if producer and producer != "unknown" else run


def _get(client: MlflowClient, cache: dict[str, Run], run_id: str) -> Run:
    if run_id not in cache:
        cache[run_id] = client.get_run(run_id)
    return cache[run_id]


def _seconds(run: Run) -> float | None:
    start, end = run.info.start_time, run.info.end_time
    return (end - start) / 1000 if start and end else None


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>TLoRA report</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0 2em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child, td:nth-child(2), #quality td:nth-child(3) {{ text-align: left; }}
td.reused {{ background: #eef7ee; }} td.none {{ color: #aaa; }}
a {{ color: #1a5fb4; text-decoration: none; }}
.plots {{ display: flex; flex-wrap: wrap; gap: 1em; }}
figure {{ margin: 0; border: 1px solid #ddd; padding: .5em; max-width: 100%; box-sizing: border-box; }}
figure img {{ max-width: 100%; height: auto; display: block; }}
figcaption {{ font-size: 12px; color: #555; }}
</style></head>
<body data-images="pending">
<h1>TLoRA report</h1>
<p>{n} branches from MLflow at <code>{uri}</code>. Stage times are those of the run that computed the stage;
↺ marks a stage this invocation reused. Links open the stage's MLflow run (<code>mlflow ui</code>).</p>
<h2>Quality</h2>{quality}
<h2>Time per stage</h2>{timing}
<h2>Plots</h2><div class="plots">{figures}</div>
<script>
window.addEventListener("load", function () {{
  var images = Array.from(document.images);
  var ok = images.filter(function (i) {{ return i.complete && i.naturalWidth > 0; }}).length;
  document.body.dataset.images = ok === images.length ? "decoded" : "failed";
  document.body.dataset.decoded = String(ok);
}});
</script>
</body></html>
"""
