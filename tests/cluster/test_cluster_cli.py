"""`make cluster` / `make cluster-down` (python -m harness.cluster up|down): a second cluster beside
the session's, left running by `up`, and nothing left behind by `down`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from harness.cluster import REPO_ROOT, _proc_exe, _processes_of, run_kubectl

pytestmark = pytest.mark.cluster

COMPONENTS = {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "minio"}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "tests")}
    return subprocess.run([sys.executable, "-m", "harness.cluster", *args], capture_output=True,
                          text=True, timeout=300, env=env, cwd=REPO_ROOT, check=False)


def test_up_leaves_a_cluster_running_and_down_stops_every_process(tmp_path: Path) -> None:
    state = tmp_path / "cluster"
    try:
        up = cli("up", "--state-dir", str(state), "--gpu-nodes", "1")
        assert up.returncode == 0, up.stderr
        assert f"export KUBECONFIG={state}/kubeconfig\n" in up.stdout
        assert "export AWS_ENDPOINT_URL=http://127.0.0.1:" in up.stdout
        assert "export AWS_ACCESS_KEY_ID=" in up.stdout

        # `up` has exited; its processes have not.
        running = {Path(_proc_exe(pid)).name for pid in _processes_of(str(state))}
        assert running == COMPONENTS
        nodes = run_kubectl(state / "kubeconfig", "get", "nodes", "-o", "name").stdout.split()
        assert sorted(nodes) == ["node/cpu-node-0", "node/gpu-node-0"]

        again = cli("up", "--state-dir", str(state))
        assert again.returncode == 0 and "already running" in again.stdout, again.stderr
        status = cli("status", "--state-dir", str(state))
        assert status.returncode == 0 and f"export KUBECONFIG={state}/kubeconfig" in status.stdout
    finally:
        down = cli("down", "--state-dir", str(state))
    assert down.returncode == 0, down.stderr
    assert _processes_of(str(state)) == []
    assert not state.exists()
    assert cli("status", "--state-dir", str(state)).returncode == 1
