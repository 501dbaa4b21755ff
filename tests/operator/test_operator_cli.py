"""`finetune operator` start-up failures: one line and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from operator_harness import REPO


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port on loopback that something else listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def _start(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    # No cluster: the ports are bound before the operator needs an API server.
    env = {**os.environ, "KUBECONFIG": str(tmp_path / "no-kubeconfig")}
    return subprocess.run(
        [sys.executable, "-m", "finetune_cli.main", "operator", "--standalone", "-n", "team-a",
         "--bind-address", "127.0.0.1", *flags],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize(("flag", "other", "what"), [
    ("--metrics-port", "--health-port", "metrics"),
    ("--health-port", "--metrics-port", "health checks"),
])
def test_a_busy_port_is_one_line_and_exit_1(tmp_path: Path, busy_port: int, flag: str, other: str, what: str) -> None:
    done = _start(tmp_path, flag, str(busy_port), other, "0")
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == [f"finetune operator: cannot serve {what} on 127.0.0.1:{busy_port} ({flag}): "
                     "Address already in use"]
