"""Soak: back-to-back tiny pipelines with random budgets, each SIGKILLed at a random moment and run again.

Every pipeline is ``tlora run`` in its own process group on one shared store (a tiny Llama, seconds per stage),
with a random total-rank budget and training seed, and now and then a new calibration seed so the task side is
recomputed too. A random kill time is drawn per pipeline over the last uninterrupted flow's duration, counted
from the moment its flow starts (after imports); if the run is still going then, the whole process group gets
SIGKILL and the same command runs again once, to the end. Counted: runs that completed, reruns that reused
finished stages or resumed training from a checkpoint, and, at the end, artifacts that fail verification,
temporary folders left behind and MLflow runs still marked RUNNING (target: all completed, none corrupt).
Results go to ``benchmarks/results/soak.json`` and the section "## Soak" of ``benchmarks/RESULTS.md``.

    python benchmarks/soak.py               # 20 pipelines, none started after 15 minutes
    python benchmarks/soak.py --pipelines 3 --no-write   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))
from _prefect_server import start_prefect_server, stop  # noqa: E402
from _results import machine_line, update_section  # noqa: E402

STAGES = ("model", "calibration", "covariance", "spectrum", "sensitivity", "allocation", "init", "train", "evaluate",
          "merge")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipelines", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-kill-s", type=float, default=30.0,
                        help="kill times are uniform over [0, the last uninterrupted flow's duration, at most this] "
                             "seconds after the flow starts")
    parser.add_argument("--max-minutes", type=float, default=15.0, help="start no pipeline after this")
    parser.add_argument("--write", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="tlora-soak-"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1", "PREFECT_HOME": str(work / "prefect-home"), "COLUMNS": "200",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_ENABLED": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    start = time.perf_counter()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally below: stop the server
    server = start_prefect_server(work / "prefect-home", env, timeout=300)
    env["PREFECT_API_URL"] = server["url"]  # every pipeline on this server: no temporary server per process
    records: list[dict] = []
    try:
        config = write_sources(work)
        flow_s = args.max_kill_s  # kills are drawn over the flow's duration, learnt from runs that ran through
        for i in range(args.pipelines):
            if time.perf_counter() - start > args.max_minutes * 60:
                print(f"stopping after {i} pipelines: the {args.max_minutes:.0f}-minute limit is spent", flush=True)
                break
            records.append(soak_one(i, config, work, env, rng, flow_s))
            if not records[-1]["killed"] and records[-1].get("flow_s"):
                flow_s = min(args.max_kill_s, records[-1]["flow_s"])
    finally:
        stop(server["proc"])
    summary = audit(work / "artifacts", records, time.perf_counter() - start) | {
        "max_kill_s": args.max_kill_s, "planned": args.pipelines, "max_minutes": args.max_minutes}
    print(json.dumps(summary, indent=2))
    if args.write:
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / "soak.json").write_text(json.dumps({"summary": summary, "pipelines": records}, indent=2))
        update_section("## Soak", report(summary))
    shutil.rmtree(work, ignore_errors=True)


def soak_one(i: int, config: Path, work: Path, env: dict, rng: random.Random, max_kill_s: float) -> dict:
    """One pipeline: run, SIGKILL at a random time if still running, then run the same command again."""
    overrides = [f"allocation.budget.rank={rng.randint(7, 60)}", f"train.seed={rng.randint(0, 10**6)}"]
    if rng.random() < 0.25:
        overrides.append(f"calibration.seed={rng.randint(1, 10**6)}")
    command = [sys.executable, "-m", "flows.cli", "run", str(config), "--no-progress"]
    for o in overrides:
        command += ["--set", o]
    kill_at = rng.uniform(0.0, max_kill_s)
    record = {"pipeline": i, "overrides": overrides, "kill_at_s": round(kill_at, 1)}
    first = subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    lines: list[str] = []
    flow_started = threading.Event()

    def read() -> None:
        for line in first.stdout:
            lines.append(line)
            if "parent run" in line:
                flow_started.set()
        flow_started.set()  # ended (or failed) before its flow started

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    flow_started.wait(timeout=300)  # the clock starts with the flow, not with the imports
    try:
        t0 = time.perf_counter()
        first.wait(timeout=kill_at)
        reader.join()
        output = "".join(lines)
        record.update(killed=False, rc=first.returncode, stage_at_kill=None, reused=len(stage_lines(output, "reused")),
                      flow_s=round(time.perf_counter() - t0, 1))
    except subprocess.TimeoutExpired:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        reader.join()
        record.update(killed=True, stage_at_kill=last_stage("".join(lines)))
        t0 = time.perf_counter()
        again = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=900)
        trained = stage_lines(again.stdout, "computed").get("train")
        resumed = None
        if trained is not None and (Path(trained) / "train_result.json").is_file():
            resumed = json.loads((Path(trained) / "train_result.json").read_text())["resumed_from"]
        record.update(rc=again.returncode, rerun_s=round(time.perf_counter() - t0, 1),
                      reused=len(stage_lines(again.stdout, "reused")), resumed_training=resumed is not None)
        if again.returncode != 0:
            record["error"] = (again.stdout + again.stderr)[-2000:]
    what = f"killed at {kill_at:.0f} s in {record['stage_at_kill']}" if record["killed"] else "ran through"
    print(f"pipeline {i}: {what}, rc {record['rc']}, reused {record['reused']}", flush=True)
    return record


def stage_lines(output: str, status: str) -> dict[str, str]:
    """Stage -> artifact URI of the stages a run logged with ``status`` (``computed`` or ``reused``)."""
    out = {}
    for line in output.splitlines():
        words = line.split()
        if len(words) >= 5 and words[0] == "INFO" and words[1] in STAGES and words[2] == status:
            out[words[1]] = words[4]
    return out


def last_stage(output: str) -> str:
    """The stage a killed run was in: the one after the last stage it logged as done."""
    done = [s for line in output.splitlines() for s in STAGES if line.startswith(f"INFO     {s} ")]
    if not done:
        return "startup"
    index = STAGES.index(done[-1]) + 1
    return STAGES[index] if index < len(STAGES) else "report"


def audit(root: Path, records: list[dict], wall_s: float) -> dict:
    """Every artifact verified, temporary folders and unfinished MLflow runs counted."""
    from mlflow import MlflowClient

    from flows.store import verify_folder

    folders = [f for s in STAGES for f in (root / "stages" / s).glob("[0-9a-f]*")]
    corrupt = [str(f) for f in folders if verify_folder(f, stage=f.parent.name) is None]
    temps = [str(p) for p in (root / "stages").glob("*/.tmp-*")]
    client = MlflowClient(f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tlora")
    runs = client.search_runs([exp.experiment_id], max_results=5000) if exp else []
    status = {s: sum(r.info.status == s for r in runs) for s in ("FINISHED", "KILLED", "FAILED", "RUNNING")}
    killed = [r for r in records if r["killed"]]
    return {
        "pipelines": len(records), "completed": sum(r["rc"] == 0 for r in records), "killed": len(killed),
        "killed_in": {s: sum(r["stage_at_kill"] == s for r in killed) for s in {r["stage_at_kill"] for r in killed}},
        "reruns_reusing_stages": sum(r["reused"] > 0 for r in killed),
        "reruns_resuming_training": sum(bool(r.get("resumed_training")) for r in killed),
        "artifacts": len(folders), "artifacts_failing_verification": len(corrupt), "corrupt": corrupt,
        "temp_folders_left": len(temps), "mlflow_runs": status, "wall_s": round(wall_s),
    }


def report(s: dict) -> str:
    where = ", ".join(f"{k} {v}" for k, v in sorted(s["killed_in"].items()))
    return "\n".join([
        "## Soak", "",
        f"`python benchmarks/soak.py`: {s['pipelines']} of {s['planned']} planned back-to-back tiny pipelines "
        f"(no new one after {s['max_minutes']:.0f} min) (tiny Llama, random budgets "
        "and training seeds, some new calibration seeds) on one store; each still running at a random moment "
        f"over its flow's duration (at most {s['max_kill_s']:.0f} s after its flow started) was SIGKILLed "
        "(whole process group) and run once more.", machine_line(), "",
        "| pipelines | completed | killed | reruns reusing stages | reruns resuming training | artifacts | "
        "failing verification | temp folders left | MLflow runs left RUNNING | wall |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {s['pipelines']} | {s['completed']} | {s['killed']} | {s['reruns_reusing_stages']} | "
        f"{s['reruns_resuming_training']} | {s['artifacts']} | {s['artifacts_failing_verification']} | "
        f"{s['temp_folders_left']} | {s['mlflow_runs']['RUNNING']} | {s['wall_s'] / 60:.1f} min |", "",
        f"Killed in: {where or 'none'} (\"report\": after the last stage, while the CLI closed its runs; "
        "\"startup\": before the first stage). MLflow runs by status: " + ", ".join(
            f"{k} {v}" for k, v in s["mlflow_runs"].items()) + " (KILLED: runs of killed processes, closed by the "
        "next run). Raw figures: `benchmarks/results/soak.json`.",
    ])


def write_sources(work: Path) -> Path:
    """A tiny Llama, a word task and a config whose store is under ``work``."""
    import torch
    import yaml

    from tests.conftest import build_tiny, build_tiny_tokenizer
    from tests.flows.conftest import tiny_config, write_task

    torch.set_num_threads(1)
    sources = work / "sources"
    build_tiny("llama", seed=0).save_pretrained(sources / "model")
    build_tiny_tokenizer().save_pretrained(sources / "model")
    write_task(sources / "task", seed=0)
    cfg = tiny_config(sources, work / "artifacts", train={"max_steps": 40, "save_steps": 5, "logging_steps": 10})
    path = work / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


if __name__ == "__main__":
    main()
