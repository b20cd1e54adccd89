"""A local Prefect server for a benchmark: ``prefect server start`` on a free 127.0.0.1 port in its own
PREFECT_HOME, waited for on /api/health, and stopped by its pid (its own process group)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def start_prefect_server(home: Path, env: dict[str, str], timeout: float = 180) -> dict:
    """``prefect server start`` on a free 127.0.0.1 port in its own PREFECT_HOME; waits for /api/health."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home.mkdir(parents=True)
    prefect = Path(sys.executable).parent / "prefect"
    start = time.perf_counter()
    proc = subprocess.Popen([str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env={**env, "PREFECT_HOME": str(home)}, stdout=(home / "server.log").open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited: {(home / 'server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return {"proc": proc, "url": url, "start_s": time.perf_counter() - start}
        except OSError:
            time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"prefect server did not answer within {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    """Stop the server we started (its own process group, by its pid)."""
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
