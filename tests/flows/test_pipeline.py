"""End to end on the session's Prefect test server: a flow run, a new budget in a new process, lineage, damage.

The module's runs build on each other (first run, second run with a new budget, then a damaged cache), so the
tests read their shared state in file order and the last one damages it.
"""

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file
from typer.testing import CliRunner

from flows.cli import app
from flows.config import PipelineConfig
from flows.lineage import walk
from flows.pipeline import pipeline
from flows.store import read_manifest, verify_folder
from tests.flows.conftest import cli_env, context, tiny_config, write_yaml
from tlora.covariance import load_covariance
from tlora.data import load_calibration

TASK_SIDE = ("model", "calibration", "covariance", "spectrum", "sensitivity")
PER_BUDGET = ("allocation", "init", "train", "evaluate", "merge")
NEW_BUDGET = 20  # the tiny Llama has 14 target modules; the default budget is 14 · r = 28


@pytest.fixture(scope="module")
def runs(prefect_server, tiny_sources, mlflow_template, tmp_path_factory):
    """The first run in this process, then the same config with a new budget through the CLI in a new process."""
    home = tmp_path_factory.mktemp("pipeline")
    (home / "artifacts" / "mlflow").mkdir(parents=True)
    shutil.copy(mlflow_template, home / "artifacts" / "mlflow" / "mlflow.db")
    cfg = PipelineConfig.model_validate(tiny_config(tiny_sources, home / "artifacts"))
    first = pipeline(cfg)
    stamps = {s.stage: _stamps(Path(s.uri)) for s in first.stages()}
    path = write_yaml(home / "tiny.yaml", cfg)
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(path), "--no-progress", "--set",
                           f"allocation.budget.rank={NEW_BUDGET}"], cwd=home, env=cli_env(prefect_server),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(context(cfg).tracking_uri)
    parents = [r for r in client.search_runs([context(cfg).tracker().experiment_id], order_by=["start_time DESC"])
               if "tlora.stage" not in r.data.tags]
    second = {r.data.tags["tlora.stage"]: r for r in client.search_runs(
        [parents[0].info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")}
    return SimpleNamespace(cfg=cfg, first=first, stamps=stamps, second=second, client=client, home=home,
                           output=proc.stdout, api_url=prefect_server)


def test_a_run_writes_each_stage_artifact_with_its_documented_files(runs):
    stages = {s.stage: s for s in runs.first.stages()}
    assert list(stages) == [*TASK_SIDE, *PER_BUDGET] and not any(s.reused for s in stages.values())
    cov = load_covariance(Path(stages["covariance"].uri) / "covariance.zarr")
    groups, modules = sorted(cov.sums), sorted(cov.modules)
    hf = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    adapter = {"README.md", "adapter_config.json", "adapter_model.safetensors", "tlora.json"}
    checkpoint = {f"checkpoints/checkpoint-2/{f}" for f in (
        "README.md", "adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "rng_state.pth",
        "scheduler.pt", "tokenizer.json", "tokenizer_config.json", "trainer_state.json", "training_args.bin")}
    expected = {
        "model": hf | {"fingerprint.json"},
        "calibration": {"calibration.safetensors", "meta.json"},
        "covariance": {"covariance.zarr/zarr.json"} | {f"covariance.zarr/{g}/{f}" for g in groups
                                                       for f in ("zarr.json", "c/0/0")},
        "spectrum": {"spectrum.zarr/zarr.json"} | {f"spectrum.zarr/{m}/{f}" for m in modules for f in (
            "zarr.json", "vectors/zarr.json", "vectors/c/0/0", "values/zarr.json", "values/c/0")}
        | {"plots/spectrum.png"},
        "sensitivity": {"scores.json"},
        "allocation": {"allocation.json", "plots/allocation.png"},
        "init": adapter,
        "train": adapter | {"trainer_state.json", "train_result.json", "plots/loss.png"} | checkpoint,
        "evaluate": {"metrics.json"},
        "merge": hf,
    }
    for stage, files in expected.items():
        folder = Path(stages[stage].uri)
        found = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        assert found == files | {"manifest.json"}, stage
        assert verify_folder(folder).run_id == stages[stage].run_id
    assert len(groups) < len(modules)  # q/k/v and gate/up share one matrix each


def test_a_new_budget_in_a_new_process_reuses_the_task_side(runs):
    first = {s.stage: s for s in runs.first.stages()}
    assert "reused" in runs.output  # the CLI's stage table says so too
    for stage in TASK_SIDE:
        tags = runs.second[stage].data.tags
        assert tags["tlora.reused_from"] == first[stage].run_id, stage
        assert tags["tlora.key"] == first[stage].key and tags["tlora.uri"] == first[stage].uri
        assert _stamps(Path(first[stage].uri)) == runs.stamps[stage], f"{stage} was rewritten"
    for stage in PER_BUDGET:
        tags = runs.second[stage].data.tags
        assert "tlora.reused_from" not in tags and tags["tlora.key"] != first[stage].key, stage
    producers = runs.client.search_runs([runs.second["model"].info.experiment_id],
                                        filter_string="tags.`tlora.stage` = 'covariance'")
    assert len([r for r in producers if "tlora.reused_from" not in r.data.tags]) == 1  # computed once, ever


def test_the_new_adapter_differs_only_where_the_budget_says(runs):
    first = Path(next(s for s in runs.first.stages() if s.stage == "init").uri)
    second = Path(runs.second["init"].data.tags["tlora.uri"])
    ranks = [json.loads((Path(p).parent.parent / "allocation" / read_manifest(p).inputs["allocation"]
                         / "allocation.json").read_text())["modules"] for p in (first, second)]
    assert sum(m["rank"] for m in ranks[0].values()) == 28 and sum(m["rank"] for m in ranks[1].values()) == NEW_BUDGET
    changed = [n for n in ranks[0] if ranks[0][n]["rank"] != ranks[1][n]["rank"]]
    assert changed and len(changed) < len(ranks[0])  # sanity: the budget moved some ranks, not all
    weights = [load_file(p / "adapter_model.safetensors") for p in (first, second)]
    for name in weights[0]:
        a, b = weights[0][name], weights[1].get(name)
        module = name.removeprefix("base_model.model.").removesuffix(".lora_A.weight").removesuffix(".lora_B.weight")
        r0, r1 = ranks[0][module]["rank"], ranks[1][module]["rank"]
        if b is None:
            assert r1 == 0  # the module was dropped by the smaller budget
        elif "lora_A" in name:  # the same spectral vectors, sliced to each budget's rank
            assert (a.shape[0], b.shape[0]) == (r0, r1)
            torch.testing.assert_close(a[: min(r0, r1)], b[: min(r0, r1)], rtol=0, atol=0)
        else:
            assert not a.any() and not b.any()  # B = 0 in both
    config = json.loads((second / "adapter_config.json").read_text())
    assert {k.replace("\\", ""): v for k, v in config["rank_pattern"].items()} == {
        n: m["rank"] for n, m in ranks[1].items() if m["rank"] > 0}


def test_lineage_walks_from_the_adapter_back_to_the_calibration_samples(runs):
    adapter = runs.second["train"].data.tags["tlora.uri"]
    nodes = walk(runs.client, read_manifest(adapter).run_id)
    assert [n.stage for n in nodes][:1] == ["train"]
    assert {n.stage for n in nodes} == {"train", "init", "allocation", "sensitivity", "calibration", "model",
                                        "spectrum", "covariance"}
    calib = next(n for n in nodes if n.stage == "calibration")
    first_calib = next(s for s in runs.first.stages() if s.stage == "calibration")
    assert calib.run_id == first_calib.run_id and calib.datasets  # the producing run, with its logged samples
    ids = load_calibration(calib.uri).meta.ids
    result = CliRunner().invoke(app, ["lineage", adapter, "--root", str(runs.home / "artifacts")],
                                env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    for needle in ("train", "init", "calibration", "model", *ids[:5], str(runs.cfg.model.source)):
        assert needle in result.output
    by_parent = CliRunner().invoke(app, ["lineage", runs.second["train"].data.tags["mlflow.parentRunId"],
                                         "--root", str(runs.home / "artifacts")], env={"COLUMNS": "250"})
    assert by_parent.exit_code == 0 and "merge" in by_parent.output and "calibration" in by_parent.output


def test_each_trained_adapter_is_a_registered_model_version(runs):
    versions = runs.client.search_model_versions("name = 'tlora-tiny-tlora'")
    trained = {s.uri for s in runs.first.stages() if s.stage == "train"} | {runs.second["train"].data.tags["tlora.uri"]}
    assert {v.source for v in versions} == trained and len(versions) == 2


def test_a_damaged_or_deleted_artifact_is_recomputed_by_the_next_run(runs):
    first = {s.stage: s for s in runs.first.stages()}
    chunk = next(p for p in (Path(first["covariance"].uri) / "covariance.zarr").rglob("c/0/0"))
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    shutil.rmtree(first["spectrum"].uri)
    again = {s.stage: s for s in pipeline(runs.cfg).stages()}
    for stage in ("covariance", "spectrum"):
        assert not again[stage].reused and again[stage].run_id != first[stage].run_id, stage
        assert verify_folder(Path(again[stage].uri)) is not None
    for stage in ("model", "calibration", "sensitivity", *PER_BUDGET):  # same keys: nothing else recomputed
        assert again[stage].reused and again[stage].run_id == first[stage].run_id, stage


def test_a_sweep_shares_the_task_side_across_budgets_and_methods(prefect_server, workspace, tmp_path):
    cfg = workspace()
    args = ["sweep", str(write_yaml(tmp_path / "tiny.yaml", cfg)), "--budget", "default", "--budget", str(NEW_BUDGET),
            "--method", "tlora", "--method", "lora", "--no-progress"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert result.output.count("  adapter ") == 4  # one report per (budget, method)
    tracker = context(cfg).tracker()
    (parent,) = [r for r in tracker.client.search_runs([tracker.experiment_id]) if "tlora.stage" not in r.data.tags]
    children = tracker.client.search_runs([tracker.experiment_id],
                                          filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    counts = Counter(r.data.tags["tlora.stage"] for r in children)
    assert [counts[s] for s in TASK_SIDE] == [1, 1, 1, 1, 1]  # computed once for all four branches
    # TLoRA's two budgets are two adapters; LoRA's uniform ranks ignore the budget, so its two are one.
    assert [counts[s] for s in PER_BUDGET] == [3, 3, 3, 3, 3]
    allocations = [r for r in children if r.data.tags["tlora.stage"] == "allocation"]
    lora = [r for r in allocations if r.data.params["method.name"] == "lora"]
    assert len(lora) == 1 and "tlora.upstream.sensitivity" not in lora[0].data.tags  # LoRA allocates without scores


def _stamps(folder: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every file: unchanged means the artifact was not rewritten."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}
