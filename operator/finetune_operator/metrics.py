"""The operator's own Prometheus metrics, and its /healthz and /readyz endpoints."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from finetune_api.constants import OPERATOR_METRIC_PREFIX, Phase, Reason
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .cache import CHILD_TRIMS

P = OPERATOR_METRIC_PREFIX
NAMES = {
    "jobs": f"{P}jobs",
    "reconcile_duration": f"{P}reconcile_duration_seconds",
    "reconcile_errors": f"{P}reconcile_errors_total",
    "restarts": f"{P}workload_restarts_total",
    "children_recreated": f"{P}children_recreated_total",
}

#: The `reason` values of the restarts counter: the first word of status.lastRestartReason.
RESTART_REASONS = (Reason.PREEMPTED, Reason.STALLED, Reason.FAILED)


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs = Gauge(NAMES["jobs"], "FineTuneJobs by phase.", ["phase"], registry=r)
        self.reconcile_duration = Histogram(
            NAMES["reconcile_duration"], "Time of one reconcile of one FineTuneJob.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        # Counters add `_total` themselves.
        self.reconcile_errors = Counter(
            NAMES["reconcile_errors"].removesuffix("_total"), "Reconciles that raised an error.", ["kind"], registry=r)
        self.restarts = Counter(
            NAMES["restarts"].removesuffix("_total"), "Trainer pods restarted, by reason.", ["reason"], registry=r)
        self.children_recreated = Counter(
            NAMES["children_recreated"].removesuffix("_total"),
            "Children (ConfigMap, Service, Job) found missing and created again, by kind.", ["kind"], registry=r)
        self._phases: dict[str, str] = {}
        self._lock = threading.Lock()
        for phase in Phase.ALL:
            self.jobs.labels(phase=phase).set(0)
        # Every restart reason from 0: Prometheus's increase() cannot see the first restart of a
        # series that appears with value 1 (the chart's restarts alert would need one restart more).
        for reason in RESTART_REASONS:
            self.restarts.labels(reason=reason)
        for kind in CHILD_TRIMS:
            self.children_recreated.labels(kind=kind)

    def set_phase(self, key: str, phase: str | None) -> None:
        """Record the phase of one job (None: it is gone) and refresh the counts."""
        with self._lock:
            if phase is None:
                self._phases.pop(key, None)
            else:
                self._phases[key] = phase
            counts = {p: 0 for p in Phase.ALL}
            for value in self._phases.values():
                counts[value] = counts.get(value, 0) + 1
            for p, n in counts.items():
                self.jobs.labels(phase=p).set(n)

    def known(self) -> set[str]:
        with self._lock:
            return set(self._phases)

    def serve(self, port: int, addr: str = "0.0.0.0") -> Any:
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return server


class Health:
    """Liveness: the resync loop has ticked recently. Readiness: the operator has started."""

    def __init__(self, max_silence: float) -> None:
        self.max_silence = max_silence
        self.ready = threading.Event()
        self.last_tick = time.monotonic()

    def tick(self) -> None:
        self.last_tick = time.monotonic()

    def alive(self) -> bool:
        return time.monotonic() - self.last_tick < self.max_silence

    def serve(self, port: int, addr: str = "0.0.0.0") -> ThreadingHTTPServer:
        health = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/healthz":
                    ok = health.alive()
                elif self.path == "/readyz":
                    ok = health.ready.is_set() and health.alive()
                else:
                    self.send_error(404)
                    return
                body = b"ok\n" if ok else b"not ok\n"
                self.send_response(200 if ok else 503)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer((addr, port), Handler)
        threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
        return server
