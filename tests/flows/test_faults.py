"""Faults with nothing lost: SIGKILL in covariance, training and merge, then reruns; a full disk, an unwritable
store, an unreachable MLflow server and a Prefect API that goes away, each told in one line.

The kill tests build on each other in file order (one chain of ``tlora run`` subprocesses on one store): killed in
covariance, rerun killed in training (after its first checkpoint), rerun killed in merge, rerun to the end (in this
process, to spare one more process start).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
import zarr
from mlflow import MlflowClient
from typer.testing import CliRunner

from flows.cli import app
from flows.config import PipelineConfig
from flows.failures import explain
from flows.store import verify_folder
from tests.flows.conftest import cli_env, context, tiny_config, write_yaml

# Runs the CLI with one stage stopping, after writing part of its output, until the test acts (kills it).
HANG = '''
import os, pathlib, sys, time
import flows
STAGE, MARK = os.environ.get("FAULT_HANG", ""), pathlib.Path(os.environ.get("FAULT_MARK", "mark"))
def hang():
    MARK.write_text(STAGE)
    time.sleep(float(os.environ.get("FAULT_SLEEP", "600")))
def after(module, name):
    original = getattr(module, name)
    def patched(*args, **kwargs):
        out = original(*args, **kwargs)
        hang()
        return out
    setattr(module, name, patched)
if STAGE == "covariance-end":  # stop once the whole covariance is computed, before it is published
    import flows.prepare
    after(flows.prepare, "stream_covariance")
elif STAGE == "covariance":  # stop once the first decoder layer's statistics are in the work folder
    import flows.prepare
    streamed = flows.prepare.stream_covariance
    def stop_after_a_layer(*args, **kwargs):
        return streamed(*args, on_layer=lambda i, what: hang(), **kwargs)
    flows.prepare.stream_covariance = stop_after_a_layer
elif STAGE == "merge":
    import flows.adapt
    after(flows.adapt, "merge_adapters")
elif STAGE == "train":  # stop right after the first checkpoint
    from transformers import Trainer
    original = Trainer._save_checkpoint
    def save(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.state.global_step < self.args.max_steps:
            hang()
    Trainer._save_checkpoint = save
from flows.cli import app
app(prog_name="tlora")
'''
STAGES = ("model", "calibration", "covariance", "spectrum", "sensitivity", "allocation", "init", "train", "evaluate",
          "merge")


def start(home: Path, api_url: str, hang: str, *, sleep: float = 600, extra_env: dict | None = None):
    env = cli_env(api_url) | {"FAULT_HANG": hang, "FAULT_MARK": str(home / "mark"), "FAULT_SLEEP": str(sleep),
                              "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} | (extra_env or {})
    (home / "mark").unlink(missing_ok=True)
    return subprocess.Popen([sys.executable, str(home / "hang.py"), "run", str(home / "tiny.yaml"), "--no-progress"],
                            cwd=home, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_for_mark(proc: subprocess.Popen, home: Path, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while not (home / "mark").exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended ({proc.returncode}) before it hung:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("the run never reached the stage to kill")
        time.sleep(0.2)


def kill_in(home: Path, api_url: str, stage: str) -> dict[str, tuple[int, int]]:
    """Run until ``stage`` hangs, SIGKILL the whole process group; (inode, mtime) of every published manifest."""
    proc = start(home, api_url, stage)
    try:
        wait_for_mark(proc, home)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    return published(home)


def published(home: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for stage in STAGES:
        for folder in (home / "artifacts" / "stages" / stage).glob("[0-9a-f]*"):
            st = (folder / "manifest.json").stat()
            out[stage] = (st.st_ino, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def chain(prefect_server, tiny_sources, mlflow_template, tmp_path_factory):
    home = tmp_path_factory.mktemp("faults")
    (home / "artifacts" / "mlflow").mkdir(parents=True)
    (home / "artifacts" / "mlflow" / "mlflow.db").write_bytes(mlflow_template.read_bytes())
    (home / "hang.py").write_text(HANG)
    cfg = PipelineConfig.model_validate(tiny_config(tiny_sources, home / "artifacts",
                                                    train={"max_steps": 4, "save_steps": 2}))
    write_yaml(home / "tiny.yaml", cfg)
    stages = home / "artifacts" / "stages"
    after_cov = kill_in(home, prefect_server, "covariance")
    cov_tmp = sorted(p.name for p in (stages / "covariance").iterdir())
    cov_work = [zarr.open_group(str(p), mode="r").attrs.asdict()
                for p in (home / "artifacts" / "work" / "covariance").glob("*/covariance.zarr")]
    after_train = kill_in(home, prefect_server, "train")
    checkpoints = sorted(p.name for p in (home / "artifacts" / "work" / "train").glob("*/checkpoint-*"))
    after_merge = kill_in(home, prefect_server, "merge")
    merge_tmp = sorted(p.name for p in (stages / "merge").iterdir())
    last = CliRunner().invoke(app, ["run", str(home / "tiny.yaml"), "--no-progress"], env={"COLUMNS": "200"})
    return SimpleNamespace(home=home, cfg=cfg, stages=stages, after_cov=after_cov, cov_tmp=cov_tmp, cov_work=cov_work,
                           after_train=after_train, checkpoints=checkpoints, after_merge=after_merge,
                           merge_tmp=merge_tmp, final=published(home), rc=last.exit_code, output=last.output,
                           client=MlflowClient(context(cfg).tracking_uri),
                           experiment=context(cfg).tracker().experiment_id)


def test_a_kill_in_covariance_leaves_only_an_untrusted_temp_folder(chain):
    assert set(chain.after_cov) == {"model", "calibration"}  # finished before the kill, published
    assert len(chain.cov_tmp) == 1 and chain.cov_tmp[0].startswith(".tmp-")  # the partial covariance, unpublished
    assert any((chain.stages / ".locks").glob("covariance-*.lock"))  # the killed process held its lock
    # the first decoder layer's sums, kept in the stage's work folder for the rerun to resume from
    assert [(a["complete"], a["partial"]["layers_done"]) for a in chain.cov_work] == [(False, 1)]


def test_reruns_reuse_every_finished_stage_untouched(chain):
    assert chain.rc == 0, chain.output[-3000:]
    for before in (chain.after_cov, chain.after_train, chain.after_merge):
        for stage, stamp in before.items():
            assert chain.final[stage] == stamp, stage  # same inode and mtime: never rewritten
    assert set(chain.after_train) == set(STAGES[:7])  # killed in training: covariance..init done by then
    assert set(chain.after_merge) == set(STAGES[:9])


def test_training_resumes_from_its_last_checkpoint(chain):
    assert chain.checkpoints == ["checkpoint-2"]  # the killed run checkpointed once, at step 2 of 4
    train = next((chain.stages / "train").glob("[0-9a-f]*"))
    result = yaml.safe_load((train / "train_result.json").read_text())
    assert result["resumed_from"] is not None and result["resumed_from"].endswith("checkpoint-2")
    assert result["steps"] == 4
    assert yaml.safe_load((train / "trainer_state.json").read_text())["global_step"] == 4


def test_after_the_last_rerun_every_artifact_verifies_and_no_temp_is_left(chain):
    assert len(chain.merge_tmp) == 1 and chain.merge_tmp[0].startswith(".tmp-")
    assert set(chain.final) == set(STAGES)
    for stage in STAGES:
        entries = [p.name for p in (chain.stages / stage).iterdir()]
        assert len(entries) == 1 and not entries[0].startswith("."), (stage, entries)
        assert verify_folder(chain.stages / stage / entries[0], stage=stage) is not None, stage
    assert not list((chain.home / "artifacts" / "work" / "covariance").iterdir())  # resumed, published, cleared


def test_runs_left_running_by_killed_processes_are_marked_killed(chain):
    runs = chain.client.search_runs([chain.experiment], max_results=1000)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    parents = [r for r in runs if "tlora.stage" not in r.data.tags]
    assert sorted(r.info.status for r in parents) == ["FINISHED", "KILLED", "KILLED", "KILLED"]
    killed = {r.data.tags["tlora.stage"] for r in runs if r.info.status == "KILLED" and "tlora.stage" in r.data.tags}
    assert killed == {"covariance", "train", "merge"}
    last_parent = next(r for r in parents if r.info.status == "FINISHED").info.run_id
    mine = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == last_parent]
    reused = {r.data.tags["tlora.stage"] for r in mine if "tlora.reused_from" in r.data.tags}
    assert reused == set(STAGES) - {"merge"}


def test_flow_runs_left_running_by_killed_processes_are_marked_crashed(chain):
    from prefect.client.orchestration import get_client

    from flows.failures import PROCESS_TAG
    from flows.lineage import process_alive

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(limit=200)
    owners = {run.id: next((t[len(PROCESS_TAG):] for t in run.tags if t.startswith(PROCESS_TAG)), None)
              for run in runs}
    ours = [r for r in runs if owners[r.id] and str(chain.home) in str(r.parameters)]  # this chain's pipelines
    dead = [r for r in ours if not process_alive(owners[r.id])]
    assert len({owners[r.id] for r in dead}) == 3  # the three killed processes' runs carry their tag ...
    assert {r.state_type.value for r in dead} == {"CRASHED"}  # ... and were marked Crashed by the next run
    assert [r.state_type.value for r in ours if r not in dead] == ["COMPLETED"]  # the last run, in this process


# --- failures of the machine around the pipeline: one line, exit 1/2, finished artifacts still valid ---

def invoke(cfg: PipelineConfig, path: Path):
    write_yaml(path, cfg)
    return CliRunner().invoke(app, ["run", str(path), "--no-progress"], env={"COLUMNS": "200"})


def one_error_line(output: str) -> str:
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output[-3000:]
    return errors[0]


def test_an_unwritable_store_exits_2_before_any_compute(tmp_path, tiny_sources):
    (tmp_path / "a-file").write_text("not a folder")
    cfg = PipelineConfig.model_validate(tiny_config(tiny_sources, tmp_path / "a-file" / "artifacts"))
    result = invoke(cfg, tmp_path / "tiny.yaml")
    assert result.exit_code == 2
    assert "a-file/artifacts is not writable" in one_error_line(result.output)


def test_a_full_disk_mid_run_exits_1_and_keeps_finished_stages(workspace, prefect_server, monkeypatch, tmp_path):
    import flows.prepare

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(flows.prepare, "stream_covariance", full)
    cfg = workspace()
    result = invoke(cfg, tmp_path / "tiny.yaml")
    assert result.exit_code == 1, result.output[-3000:]
    assert "no space left on the device writing" in one_error_line(result.output)
    stages = Path(cfg.store.stages_uri)
    for stage in ("model", "calibration"):
        (folder,) = (stages / stage).iterdir()
        assert verify_folder(folder, stage=stage) is not None
    assert list((stages / "covariance").iterdir()) == []  # the staging folder went with the failure
    ctx = context(cfg)
    runs = MlflowClient(ctx.tracking_uri).search_runs([ctx.tracker().experiment_id])
    assert {r.data.tags.get("tlora.stage", "parent"): r.info.status for r in runs} == {
        "parent": "FAILED", "model": "FINISHED", "calibration": "FINISHED", "covariance": "FAILED"}


def test_an_unreachable_mlflow_server_exits_1_with_what_to_do(workspace, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    uri = f"http://127.0.0.1:{closed_port()}"
    result = invoke(workspace(tracking={"uri": uri}), tmp_path / "tiny.yaml")
    assert result.exit_code == 1
    line = one_error_line(result.output)
    assert uri in line and "unreachable" in line and "tracking.uri" in line
    lineage = CliRunner().invoke(app, ["lineage", "0123abcd", "--tracking-uri", uri], env={"COLUMNS": "200"})
    assert lineage.exit_code == 1 and uri in one_error_line(lineage.output)
    from flows.lineage import Tracker

    with pytest.raises(Exception) as raised:  # the same failure met mid-run is told the same way
        Tracker(uri, "tlora")
    assert explain(raised.value).kind == "mlflow"


def test_a_prefect_api_that_goes_away_mid_run_exits_1_and_keeps_artifacts(prefect_server, workspace, tmp_path):
    cfg = workspace()
    write_yaml(tmp_path / "tiny.yaml", cfg)
    (tmp_path / "hang.py").write_text(HANG)
    host, port = prefect_server.split("//", 1)[1].split("/", 1)[0].split(":")
    with Proxy(host, int(port)) as proxy:
        api = prefect_server.replace(f"{host}:{port}", f"127.0.0.1:{proxy.port}")
        proc = start(tmp_path, api, "covariance-end", sleep=1, extra_env={"PREFECT_CLIENT_MAX_RETRIES": "0"})
        try:
            wait_for_mark(proc, tmp_path)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        proxy.stop()  # the server goes away while covariance is being written
        output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 1, output[-3000:]
    assert "Prefect API" in one_error_line(output)
    stages = Path(cfg.store.stages_uri)
    done = [folder for stage in STAGES for folder in (stages / stage).glob("[0-9a-f]*")]
    assert len(done) >= 3  # model, calibration, covariance at least
    for folder in done:
        assert verify_folder(folder) is not None, folder
    assert not list(stages.glob("*/.tmp-*"))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proxy:
    """A TCP forwarder on 127.0.0.1 to a server; :meth:`stop` makes the server unreachable through it."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.stopped = False

    def __enter__(self) -> Proxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self.stopped = True
        for s in [self.listener, *self.sockets]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _accept(self) -> None:
        while not self.stopped:
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
