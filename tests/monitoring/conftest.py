"""A real Prometheus for the monitoring tests: the chart's rules, scraping the operator and trainers.

The session's Prometheus loads the alerting rules of the rendered chart (PrometheusRule spec.groups)
with values for a test: a short stall timeout and a 1 s trainer scrape interval, which is also its
scrape and evaluation interval. It scrapes two jobs named as prometheus-operator would name them
from the chart's monitors: the operator's metrics Service (`<release>-finetune-operator-metrics`,
the job the FineTuneOperatorDown alert watches) and the trainer PodMonitor. Targets are written by
the tests: `PodTargets` lists the cluster's trainer pods with the PodMonitor's selector and labels
them with its relabelling, as prometheus-operator's Kubernetes discovery would.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from chart.helm import helm_binary, one
from harness.cluster import TestCluster
from harness.prometheus import PrometheusServer, Target

from .chart_rules import NAMESPACE, RELEASE, rendered, rule_groups

#: Seconds without a step before the operator marks a job Stalled, and the chart's alert fires.
STALL_TIMEOUT = 6
#: Prometheus's scrape and rule evaluation interval in the live tests (seconds).
INTERVAL = 1
LIVE_VALUES: dict[str, Any] = {
    "operator": {"stallTimeoutSeconds": STALL_TIMEOUT},
    "metrics": {"trainerPodMonitor": {"enabled": True, "interval": f"{INTERVAL}s"},
                "serviceMonitor": {"enabled": True}},
}
OPERATOR_JOB = f"{RELEASE}-finetune-operator-metrics"
TRAINER_JOB = f"{NAMESPACE}/{RELEASE}-finetune-operator-trainers"


@pytest.fixture(scope="session")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    if helm_binary() is None:
        pytest.fail("helm is not built: run `make tools`")
    server = PrometheusServer(tmp_path_factory.mktemp("prometheus"), rule_groups=rule_groups(LIVE_VALUES),
                              jobs=[OPERATOR_JOB, TRAINER_JOB], interval=f"{INTERVAL}s")
    try:
        server.start()
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _sanitize(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


class PodTargets:
    """Keeps the trainer scrape job's targets equal to the running trainer pods of a namespace.

    Selector and labels come from the chart's trainer PodMonitor: its matchLabels pick the pods, its
    relabelings (from __meta_kubernetes_pod_label_*, _annotation_* and _node_name) name the series.
    Pods run on loopback in the tests, so the address is the pod's metrics-URL test annotation.
    """

    def __init__(self, prom: PrometheusServer, cluster: TestCluster, namespace: str, url_annotation: str) -> None:
        monitor = one(rendered(LIVE_VALUES), "PodMonitor")
        self.selector: dict[str, str] = monitor["spec"]["selector"]["matchLabels"]
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        self.relabelings: list[dict[str, Any]] = endpoint["relabelings"]
        self.prom, self.cluster, self.namespace, self.url_annotation = prom, cluster, namespace, url_annotation
        self.current: list[Target] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pod-targets", daemon=True)

    def __enter__(self) -> PodTargets:
        self.sync()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.prom.set_targets(TRAINER_JOB, [])

    def _loop(self) -> None:
        while not self._stop.wait(0.3):
            try:
                self.sync()
            except Exception:  # the API server may blink; the next pass catches up
                continue

    def meta(self, pod: dict[str, Any]) -> dict[str, str]:
        """The __meta_kubernetes_pod_* labels Prometheus's Kubernetes discovery gives a pod."""
        md = pod["metadata"]
        out = {"__meta_kubernetes_pod_node_name": pod["spec"].get("nodeName", ""),
               "__meta_kubernetes_namespace": md["namespace"], "__meta_kubernetes_pod_name": md["name"]}
        out.update({f"__meta_kubernetes_pod_label_{_sanitize(k)}": v for k, v in (md.get("labels") or {}).items()})
        out.update({f"__meta_kubernetes_pod_annotation_{_sanitize(k)}": v
                    for k, v in (md.get("annotations") or {}).items()})
        return out

    def target(self, pod: dict[str, Any]) -> Target | None:
        url = (pod["metadata"].get("annotations") or {}).get(self.url_annotation)
        if not url:
            return None
        meta = self.meta(pod)
        # prometheus-operator's own labels for a PodMonitor target, then the chart's relabelings.
        labels = {"namespace": pod["metadata"]["namespace"], "pod": pod["metadata"]["name"],
                  "container": pod["spec"]["containers"][0]["name"]}
        for r in self.relabelings:
            value = ";".join(meta.get(s, "") for s in r["sourceLabels"])
            if value:
                labels[r["targetLabel"]] = value
        address = url.split("//", 1)[1].split("/", 1)[0]
        return Target(address, labels, "/" + url.split("//", 1)[1].split("/", 1)[1])

    def sync(self) -> list[Target]:
        selector = ",".join(f"{k}={v}" for k, v in self.selector.items())
        pods = self.cluster.get_json("pods", "-n", self.namespace, "-l", selector)["items"]
        targets = [t for p in pods if (p.get("status") or {}).get("phase") == "Running"
                   and not p["metadata"].get("deletionTimestamp") and (t := self.target(p)) is not None]
        if targets != self.current:
            self.prom.set_targets(TRAINER_JOB, targets)
            self.current = targets
        return targets


def operator_target(metrics_port: int) -> Target:
    """The operator as its metrics Service's ServiceMonitor target: the release namespace's label."""
    return Target(f"127.0.0.1:{metrics_port}", {"namespace": NAMESPACE})

