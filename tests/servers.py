"""Real servers for tests, on 127.0.0.1, each stopped by its process id: S3 (moto), PostgreSQL, MLflow.

Each helper is a context manager that yields the server's address once it answers, and stops the process
(group) it started on exit, also when the test fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

BIN = Path(sys.executable).parent
PG_BIN = Path("/usr/lib/postgresql")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with suppress(OSError), urllib.request.urlopen(url, timeout=2):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@contextmanager
def background(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """Start ``cmd`` in its own process group; on exit terminate that group (kill after 10 s)."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield proc
    finally:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def s3_server(folder: Path, buckets: tuple[str, ...]) -> Iterator[dict[str, str]]:
    """A moto S3 server with ``buckets``; yields the environment that points boto3/s3fs at it."""
    port = free_port()
    with background([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], folder / "moto.log") as proc:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/moto-api/", proc, 30, folder / "moto.log")
        env = S3_ENV | {"AWS_ENDPOINT_URL": url, "MLFLOW_S3_ENDPOINT_URL": url}
        import boto3

        s3 = boto3.client("s3", endpoint_url=url, aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")
        for bucket in buckets:
            s3.create_bucket(Bucket=bucket)
        yield env


def postgres_bin() -> Path | None:
    """The folder of PostgreSQL's server programs (initdb, pg_ctl), or None when it is not installed."""
    found = sorted(PG_BIN.glob("*/bin/initdb")) if PG_BIN.is_dir() else []
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 with database ``mlflow``; yields its SQLAlchemy URI.

    PostgreSQL refuses to run as root: as root the cluster is made and run by the ``postgres`` user, in a
    folder of its own under the system temp folder (pytest's temp folders are closed to other users).
    """
    pg = postgres_bin()
    if pg is None:
        raise RuntimeError("PostgreSQL's server programs are not installed (Debian: apt-get install postgresql)")
    data, port = Path(tempfile.mkdtemp(prefix="tlora-pg-")), free_port()
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(data, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    ctl = [*as_user, str(pg / "pg_ctl"), "-D", str(data)]
    try:
        _run([*as_user, str(pg / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8"])
        _run([*ctl, "-o", f"-h 127.0.0.1 -p {port} -k {data}", "-l", str(data / "server.log"), "-w", "start"])
        _run([*as_user, str(pg / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow"])
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run([*ctl, "-m", "immediate", "-w", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(data, ignore_errors=True)


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stdout[-2000:]}{proc.stderr[-2000:]}")


@contextmanager
def mlflow_server(folder: Path, backend: str, artifacts: str, env: dict[str, str]) -> Iterator[str]:
    """``mlflow server`` over ``backend`` with proxied artifacts in ``artifacts``; yields its URL."""
    port = free_port()
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", backend, "--artifacts-destination", artifacts]
    full_env = {**os.environ, **env, "MLFLOW_DISABLE_TELEMETRY": "true"}
    with background(cmd, folder / "mlflow-server.log", env=full_env) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health", proc, 120, folder / "mlflow-server.log")
        yield url
