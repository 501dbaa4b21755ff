"""The operator as a subprocess against the test cluster, and a fake trainer metrics endpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from finetune_api import constants as c
from harness.cluster import TestCluster, free_port, wait_until

TEST_PREFIX = "test.finetune.dev/"
#: FineTuneJob annotation (copied to the pods) that points the operator's scraper at FakeMetrics.
METRICS_URL_ANNOTATION = f"{TEST_PREFIX}metrics-url"
REPO = Path(__file__).resolve().parents[2]


class OperatorProcess:
    """`finetune operator --standalone -n NS` with test hooks; logs go to a file for failures."""

    def __init__(self, cluster: TestCluster, namespace: str, log_dir: Path, *extra: str, tag: str = "0") -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.log_path = log_dir / f"operator-{namespace}-{tag}.log"
        self.extra = list(extra)
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        return [
            sys.executable, "-m", "finetune_cli.main", "operator", "--namespace", self.namespace,
            *([] if "--leader-elect" in self.extra else ["--standalone"]),
            "--trainer-image", "registry.invalid/trainer:test",
            "--metrics-port", str(self.metrics_port), "--health-port", str(self.health_port),
            "--bind-address", "127.0.0.1", "--resync-interval", "0.5",
            "--propagate-prefix", TEST_PREFIX, "--scrape-url-annotation", METRICS_URL_ANNOTATION,
            *self.extra,
        ]

    def start(self, wait_ready: bool = True) -> OperatorProcess:
        env = {**os.environ, **self.cluster.env, "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv(), env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=REPO)
        if wait_ready:
            # Generous: on a loaded 2-core machine the imports alone can take half a minute.
            deadline = time.monotonic() + 120
            while not self.ready():  # raises at once if the process exited
                if time.monotonic() > deadline:
                    raise AssertionError(f"the operator was not ready within 120 s:\n{self.log_tail()}")
                time.sleep(0.2)
        return self

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the operator exited with {self.proc.returncode}:\n{self.log_tail()}")
        return http_get(f"http://127.0.0.1:{self.health_port}/readyz", timeout=5)[0] == 200

    def kill(self) -> None:
        """SIGKILL: no clean-up, as when a node dies."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def metrics_text(self) -> str:
        code, body = http_get(f"http://127.0.0.1:{self.metrics_port}/metrics")
        assert code == 200
        return body

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError:
        return 0, ""


class FakeMetrics:
    """What a trainer's /metrics would say; a test sets the numbers."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.scrapes = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake.scrapes += 1
                body = "".join(f"# TYPE {k} gauge\n{k} {v}\n" for k, v in fake.values.items()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/metrics"

    def set(self, step: int, total: int, loss: float) -> None:
        self.values = {c.TrainerMetric.STEP: step, c.TrainerMetric.TOTAL_STEPS: total, c.TrainerMetric.LOSS: loss,
                       c.TrainerMetric.TOKENS_PER_SECOND: 1234.0}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_metrics() -> Iterator[FakeMetrics]:
    fake = FakeMetrics()
    yield fake
    fake.close()


@pytest.fixture
def operator(cluster: TestCluster, namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    op = OperatorProcess(cluster, namespace, tmp_path, "--stall-timeout", "3")
    op.start()
    yield op
    op.stop()


# --- reading the cluster -------------------------------------------------------------------------


def ftj(cluster: TestCluster, namespace: str, name: str) -> dict[str, Any]:
    return dict(cluster.get_json(f"{c.PLURAL}.{c.GROUP}", name, "-n", namespace))


def ftj_status(cluster: TestCluster, namespace: str, name: str) -> dict[str, Any]:
    return dict(ftj(cluster, namespace, name).get("status") or {})


def condition(status: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((x for x in status.get("conditions") or [] if x["type"] == type_), None)


def wait_status(cluster: TestCluster, namespace: str, name: str, predicate: Any, what: str,
                timeout: float = 60, op: OperatorProcess | None = None) -> dict[str, Any]:
    last: dict[str, Any] = {}

    def check() -> bool:
        nonlocal last
        last = ftj_status(cluster, namespace, name)
        return bool(predicate(last))

    try:
        wait_until(check, timeout, what, interval=0.3)
    except Exception as exc:
        log = op.log_tail() if op is not None else ""
        raise AssertionError(f"{exc}\nlast status: {json.dumps(last, indent=1)}\noperator log:\n{log}") from None
    return last


def wait_phase(cluster: TestCluster, namespace: str, name: str, phase: str, timeout: float = 60,
               op: OperatorProcess | None = None) -> dict[str, Any]:
    return wait_status(cluster, namespace, name, lambda s: s.get("phase") == phase,
                       f"FineTuneJob {name} to be {phase}", timeout, op)


def children(cluster: TestCluster, namespace: str, name: str, kind: str) -> list[dict[str, Any]]:
    return list(cluster.get_json(kind, "-n", namespace, "-l", f"{c.LABEL_JOB_NAME}={name}")["items"])


def events(cluster: TestCluster, namespace: str, name: str) -> list[dict[str, Any]]:
    items = cluster.get_json("events", "-n", namespace, "--field-selector",
                             f"involvedObject.name={name},involvedObject.kind={c.KIND}")["items"]
    return sorted(items, key=lambda e: int(e["metadata"]["resourceVersion"]))  # creation order


def wait_gone(cluster: TestCluster, namespace: str, name: str, timeout: float = 60) -> None:
    def gone() -> bool:
        return all(not children(cluster, namespace, name, kind) for kind in ("configmaps", "services", "jobs", "pods"))

    wait_until(gone, timeout, f"every child of {name} to be deleted", interval=0.3)


def now() -> float:
    return time.monotonic()
