"""Start and stop `steerserve serve` as a subprocess for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(args: list[str], log: Path, timeout: float = 300, env: dict | None = None):
    """`steerserve serve --port <free> *args` until healthy; yields the base URL; stops it after."""
    with running_server_proc(args, log, timeout, env) as (base, _):
        yield base


@contextlib.contextmanager
def running_server_proc(args: list[str], log: Path, timeout: float = 300, env: dict | None = None):
    """As `running_server`, yielding (base URL, the server's Popen)."""
    port = free_port()
    cmd = [sys.executable, "-m", "steerserve.clients.cli", "serve", "--port", str(port), *args]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                pytest.fail(f"server did not become healthy:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield base, proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
