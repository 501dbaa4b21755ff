"""A real Prometheus on 127.0.0.1 (built by `make tools`) for the monitoring tests, and promtool.

    prom = PrometheusServer(state_dir, rule_groups=[...], interval="1s")
    prom.start(); prom.wait_ready()
    prom.set_targets("operator", [Target("127.0.0.1:8080", {"namespace": "x"})])
    prom.query('up == 1')          # instant query -> list of {"metric": {...}, "value": [t, "v"]}
    prom.alerts()                  # active alerts -> list of {"labels", "annotations", "state", ...}
    prom.stop()

Targets come from file service discovery: one JSON file per scrape job under `state_dir/targets/`,
rewritten atomically, so a test adds and removes trainer pods while Prometheus runs (it watches the
directory). Each scrape job's name is its `job` label. Scrape and rule evaluation run every
`interval`, short for tests.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.cluster import _tail, free_port, tool, wait_until

PROMETHEUS_TOOLS = ("prometheus", "promtool")


@dataclass(frozen=True)
class Target:
    """One scrape target: host:port, the labels its series get, and its metrics path."""

    address: str
    labels: Mapping[str, str] = field(default_factory=dict)
    path: str = "/metrics"


class PrometheusError(RuntimeError):
    pass


class PrometheusServer:
    def __init__(self, state_dir: Path, rule_groups: Sequence[Mapping[str, Any]] = (),
                 jobs: Iterable[str] = (), interval: str = "1s", port: int = 0) -> None:
        self.state_dir = Path(state_dir)
        self.rule_groups = list(rule_groups)
        self.jobs = list(jobs)
        self.interval = interval
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "prometheus.log"

    @property
    def targets_dir(self) -> Path:
        return self.state_dir / "targets"

    def config(self) -> dict[str, Any]:
        scrape = [{
            "job_name": job,
            # Every address, path and label comes from the target file.
            "file_sd_configs": [{"files": [str(self.targets_file(job))], "refresh_interval": "1s"}],
        } for job in self.jobs]
        return {
            "global": {"scrape_interval": self.interval, "scrape_timeout": self.interval,
                       "evaluation_interval": self.interval},
            "rule_files": [str(self.state_dir / "rules.yaml")],
            "scrape_configs": scrape,
        }

    def start(self) -> PrometheusServer:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.targets_dir.mkdir(exist_ok=True)
        (self.state_dir / "rules.yaml").write_text(yaml.safe_dump({"groups": self.rule_groups}, sort_keys=False))
        (self.state_dir / "prometheus.yaml").write_text(yaml.safe_dump(self.config(), sort_keys=False))
        for job in self.jobs:
            self.set_targets(job, [])
        argv = [str(tool("prometheus")), f"--config.file={self.state_dir / 'prometheus.yaml'}",
                f"--storage.tsdb.path={self.state_dir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1d", "--log.level=warn"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise PrometheusError(f"prometheus exited with {self.proc.returncode}:\n{_tail(self.log_path)}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    return bool(resp.status == 200)
            except OSError:
                return False

        wait_until(ready, timeout, f"prometheus on {self.url} to be ready (log {self.log_path})")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    # --- targets -------------------------------------------------------------------------------

    def targets_file(self, job: str) -> Path:
        return self.targets_dir / (re.sub(r"[^A-Za-z0-9_.-]", "_", job) + ".json")

    def set_targets(self, job: str, targets: Iterable[Target]) -> None:
        """Replace the scrape targets of `job` (written to a temp file and renamed: never half-read)."""
        if job not in self.jobs:
            raise ValueError(f"unknown scrape job {job!r}; known: {self.jobs}")
        groups = [{"targets": [t.address], "labels": {**t.labels, "__metrics_path__": t.path}} for t in targets]
        path = self.targets_file(job)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(groups))
        os.replace(tmp, path)

    def active_targets(self) -> list[dict[str, Any]]:
        return list(self._get("/api/v1/targets", state="active")["activeTargets"])

    # --- API -----------------------------------------------------------------------------------

    def _get(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
            raise PrometheusError(f"GET {url}: {exc.code} {body.get('error', '')}") from None
        if body.get("status") != "success":
            raise PrometheusError(f"GET {url}: {body}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query (now, or at Unix time `at`); the result vector or matrix (a scalar as one sample)."""
        data = self._get("/api/v1/query", query=expr, **({} if at is None else {"time": f"{at:.3f}"}))
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def series(self, match: str) -> list[dict[str, str]]:
        """Label sets of the series matching `match` over the last five minutes."""
        now = time.time()
        return list(self._get("/api/v1/series", **{"match[]": match, "start": str(now - 300), "end": str(now)}))

    def alerts(self, name: str | None = None, state: str | None = None) -> list[dict[str, Any]]:
        """Active alerts (pending and firing), optionally only those named `name` in `state`."""
        found = self._get("/api/v1/alerts")["alerts"]
        return [a for a in found if (name is None or a["labels"].get("alertname") == name)
                and (state is None or a["state"] == state)]

    def rule_health(self) -> list[tuple[str, str, str]]:
        """(rule name, health, last error) of every loaded rule."""
        out = []
        for group in self._get("/api/v1/rules")["groups"]:
            for rule in group["rules"]:
                out.append((rule["name"], rule.get("health", ""), rule.get("lastError", "")))
        return out


def promtool(*args: str, input: str | None = None, cwd: Path | None = None,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Runs promtool (built by `make tools`); returns the completed process whatever its exit code."""
    return subprocess.run([str(tool("promtool")), *args], input=input, capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)
