"""The chart's alerts and dashboard against a real Prometheus scraping the operator and trainers.

The operator runs as a process against the test cluster; trainer pods are either kwok pods whose
metrics endpoint is a stand-in the test steers (a step that moves, or one that stays frozen), or a
real `finetune train` process run by the fake kubelet. Prometheus (tests/monitoring/conftest.py)
evaluates the rules of the rendered chart with a STALL_TIMEOUT-second stall timeout, every second.
"""

from __future__ import annotations

import json
import math
import re
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from finetune_api import constants as c
from finetune_trainer import storage
from harness.cluster import (
    STAGE_DELAY,
    STAGE_EXIT_CODE,
    STAGE_HOLD,
    STAGE_KWOK_SKIP,
    TestCluster,
    free_port,
    wait_until,
)
from harness.kubelet import FakeKubelet
from harness.prometheus import PrometheusServer

from .chart_rules import dashboard, panels
from .conftest import INTERVAL, OPERATOR_JOB, STALL_TIMEOUT, TRAINER_JOB, PodTargets, operator_target
from .test_exposition import OPERATOR_IDLE_SERIES, TRAINER_SERIES

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))
from operator_harness import (
    METRICS_URL_ANNOTATION,
    FakeMetrics,
    OperatorProcess,
    children,
    condition,
    ftj_status,
    wait_phase,
)
from operator_specs import job_manifest

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
FTJ = f"{c.PLURAL}.{c.GROUP}"


@pytest.fixture
def operator(cluster: TestCluster, namespace: str, tmp_path: Path, prometheus: PrometheusServer,
             request: pytest.FixtureRequest) -> Iterator[OperatorProcess]:
    """The operator, scraped by Prometheus; its stall timeout is STALL_TIMEOUT unless parametrized."""
    stall = getattr(request, "param", STALL_TIMEOUT)
    op = OperatorProcess(cluster, namespace, tmp_path, "--stall-timeout", str(stall)).start()
    prometheus.set_targets(OPERATOR_JOB, [operator_target(op.metrics_port)])
    try:
        yield op
    finally:
        prometheus.set_targets(OPERATOR_JOB, [])
        op.stop()


def manifest(name: str, namespace: str, annotations: dict[str, str], labels: dict[str, str] | None = None,
             **spec: Any) -> dict[str, Any]:
    m: dict[str, Any] = job_manifest(name, namespace, **spec)
    m["metadata"]["annotations"] = annotations
    if labels:
        m["metadata"]["labels"] = labels
    return m


def seconds(rfc3339: str) -> float:
    """Unix time of Prometheus's RFC 3339 timestamps (nanoseconds cut to microseconds)."""
    head, _, frac = rfc3339.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{(frac or '0')[:6]}+00:00").timestamp()


def stalled_jobs(cluster: TestCluster, namespace: str, names: list[str]) -> set[str]:
    return {n for n in names
            if (condition(ftj_status(cluster, namespace, n), c.ConditionType.STALLED) or {}).get("status") == "True"}


def test_stalled_and_failed_jobs_raise_the_chart_alerts_and_deleting_them_clears_them(
    cluster: TestCluster, namespace: str, prometheus: PrometheusServer, operator: OperatorProcess
) -> None:
    steady, frozen = FakeMetrics(), FakeMetrics()
    stop = threading.Event()

    def step() -> None:  # the healthy trainer: a step every half second
        n = 0
        while not stop.wait(0.5):
            n += 1
            steady.set(step=n, total=100000, loss=1.0)

    steady.set(step=0, total=100000, loss=1.0)
    frozen.set(step=5, total=20, loss=2.0)
    stepper = threading.Thread(target=step, daemon=True)
    stepper.start()
    try:
        with PodTargets(prometheus, cluster, namespace, METRICS_URL_ANNOTATION) as targets:
            cluster.apply(manifest("steady", namespace, {STAGE_HOLD: "true", METRICS_URL_ANNOTATION: steady.url}))
            cluster.apply(manifest("frozen", namespace, {STAGE_HOLD: "true", METRICS_URL_ANNOTATION: frozen.url}))
            # (Its metrics URL is a closed loopback port: nothing is scraped off the machine.)
            cluster.apply(manifest("broken", namespace, {STAGE_EXIT_CODE: str(c.ExitCode.PERMANENT), STAGE_DELAY: "1s",
                                                         METRICS_URL_ANNOTATION: "http://127.0.0.1:9/metrics"},
                                   runPolicy={"backoffLimit": 3}))

            # A failed job: the failure alert, at once (no history before this Prometheus started).
            wait_phase(cluster, namespace, "broken", c.Phase.FAILED, op=operator)
            (failed,) = wait_until(lambda: prometheus.alerts("FineTuneJobFailed", "firing"), 30,
                                   "FineTuneJobFailed to fire")
            assert failed["labels"]["severity"] == "warning" and float(failed["value"]) == 1

            # The frozen job: the operator's watchdog marks it Stalled and restarts its pod once;
            # play the kubelet for the evicted pod (the trainer checkpoints and exits PREEMPTED).
            def evicted() -> dict[str, Any] | None:
                return next((p for p in children(cluster, namespace, "frozen", "pods")
                             if p["metadata"].get("deletionTimestamp")), None)

            first = wait_until(evicted, 60, "the watchdog to evict the frozen pod", interval=0.3)
            cluster.kubectl("patch", "pod", first["metadata"]["name"], "-n", namespace, "--subresource=status",
                            "--type=merge", "-p", json.dumps({"status": {"phase": "Failed", "containerStatuses": [{
                                "name": "trainer", "ready": False, "restartCount": 0, "image": "x", "imageID": "",
                                "state": {"terminated": {"exitCode": c.ExitCode.PREEMPTED, "reason": "Error",
                                                         "finishedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                     time.gmtime())}}}]}}),
                            check=False)

            # The replacement is frozen too: no second restart, and the operator and Prometheus agree.
            def agreed() -> tuple[set[str], set[str]] | None:
                firing = {a["labels"]["finetune_job"] for a in prometheus.alerts("FineTuneJobStalled", "firing")}
                stalled = stalled_jobs(cluster, namespace, ["steady", "frozen"])
                return (firing, stalled) if firing and stalled else None

            firing, stalled = wait_until(agreed, 90, "FineTuneJobStalled and the Stalled condition", interval=0.5)
            assert firing == stalled == {"frozen"}, (firing, stalled)
            (alert,) = prometheus.alerts("FineTuneJobStalled", "firing")
            assert alert["labels"] == {"alertname": "FineTuneJobStalled", "severity": "warning",
                                       "namespace": namespace, "finetune_job": "frozen"}
            assert alert["annotations"]["summary"] == f"FineTuneJob {namespace}/frozen makes no progress"
            assert "at step 5." in alert["annotations"]["description"]
            # When it fired: the replacement pod's series never moved, so its last step is its first
            # sample; the alert must wait the stall timeout, and not more than two intervals longer.
            second = next(t for t in targets.current if t.labels.get("finetune_job") == "frozen")
            samples = prometheus.query(f'finetune_trainer_step{{pod="{second.labels["pod"]}"}}[5m]')
            first_sample = float(samples[0]["values"][0][0])
            delay = seconds(alert["activeAt"]) - first_sample
            print(f"FineTuneJobStalled fired {delay:.1f} s after the frozen pod's first sample "
                  f"(stall timeout {STALL_TIMEOUT} s, interval {INTERVAL} s)")
            assert STALL_TIMEOUT <= delay <= STALL_TIMEOUT + 2 * INTERVAL + 0.5, delay
            assert not prometheus.alerts("FineTuneOperatorDown"), "the operator is scraped: its up series is 1"
            time.sleep(2 * INTERVAL)  # the healthy job stays quiet
            assert stalled_jobs(cluster, namespace, ["steady", "frozen"]) == {"frozen"}
            assert {a["labels"].get("finetune_job") for a in prometheus.alerts("FineTuneJobStalled")} == {"frozen"}

            # Deleting the stalled and the failed job clears both alerts.
            cluster.kubectl("delete", FTJ, "frozen", "broken", "-n", namespace, "--wait=false")
            wait_until(lambda: not prometheus.alerts("FineTuneJobStalled") and not prometheus.alerts("FineTuneJobFailed"),
                       60, "both alerts to clear after the jobs were deleted", interval=0.5)
            assert prometheus.query(f'finetune_trainer_step{{finetune_job="steady", namespace="{namespace}"}}')
    finally:
        stop.set()
        steady.close()
        frozen.close()
    bad = [r for r in prometheus.rule_health() if r[1] != "ok"]
    assert not bad, bad


# ---- a real training run: every dashboard panel, and the series it costs ----------------------

def fill(expr: str, namespace: str, job: str) -> str:
    return expr.replace("$namespace", namespace).replace("$job", job)


@pytest.fixture
def training_inputs(minio_env: dict[str, str], tiny_model_dir: Path, toy_data_dir: Path,
                    monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for k, v in minio_env.items():
        monkeypatch.setenv(k, v)
    fs, _ = storage.resolve("s3://monitoring")
    if not fs.exists("monitoring"):
        fs.mkdir("monitoring")
    model, data = "s3://monitoring/models/tiny", "s3://monitoring/data/train.jsonl"
    storage.publish(tiny_model_dir, model, kind="artifact")
    fs.put_file(str(toy_data_dir / "prompt_completion.jsonl"), data.removeprefix("s3://"))
    return {"model": model, "data": data}


# A real trainer loads for longer than STALL_TIMEOUT before its first step: no stall restarts here.
@pytest.mark.parametrize("operator", [600], indirect=True)
def test_every_dashboard_panel_shows_data_from_a_real_training_run(
    cluster: TestCluster, namespace: str, k8s_client: Any, prometheus: PrometheusServer, operator: OperatorProcess,
    training_inputs: dict[str, str], minio_env: dict[str, str], tmp_path: Path
) -> None:
    cluster.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds"}, "stringData": minio_env},
                  namespace=namespace)
    port = free_port()
    job = manifest("dash", namespace, {METRICS_URL_ANNOTATION: f"http://127.0.0.1:{port}/metrics"},
                   labels={STAGE_KWOK_SKIP: "true"},
                   model={"uri": training_inputs["model"]},
                   dataset={"train": training_inputs["data"], "format": "prompt_completion", "maxSeqLength": 64,
                            "validationSplit": 0.25},
                   hyperparameters={"maxSteps": 5000, "batchSize": 4, "learningRate": 1e-3},
                   resources={"gpusPerNode": 1},
                   output={"uri": f"s3://monitoring/out/{namespace}", "credentialsSecret": {"name": "s3-creds"}})
    with PodTargets(prometheus, cluster, namespace, METRICS_URL_ANNOTATION), FakeKubelet(
            k8s_client, namespace, tmp_path / "kubelet", path=[str(Path(sys.executable).parent)],
            extra_env={"FINETUNE_METRICS_PORT": str(port), "OMP_NUM_THREADS": "1"}) as kubelet:
        cluster.apply(job)
        sel = f'finetune_job="dash", namespace="{namespace}"'

        def training() -> float | None:
            if kubelet.errors:
                raise AssertionError(kubelet.errors)
            # Several scrapes have seen the step move, tokens flow and a loss: the run is under way.
            got = prometheus.query(f"changes(finetune_trainer_step{{{sel}}}[1m]) >= 3 "
                                   f"and on () (finetune_trainer_loss{{{sel}}} > 0)")
            return time.time() if got else None

        def logs() -> str:
            return "\n".join(p.read_text(errors="replace")[-3000:] for p in kubelet.logs.values())

        try:
            at = wait_until(training, 600, "the trainer's steps in Prometheus", interval=1.0)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{logs()}\n{operator.log_tail()}") from None

        def at_time(expr: str) -> list[dict[str, Any]]:
            return prometheus.query(expr, at=at)

        board = dashboard()
        empty, results = [], {}
        for panel in panels(board["panels"]):
            for target in panel.get("targets", []):
                expr = fill(target["expr"], namespace, "dash")
                got = at_time(expr)
                results[f"{panel['title']} {target['refId']}"] = [float(r["value"][1]) for r in got]
                if not got:
                    empty.append(f"{panel['title']!r} ({target['refId']}): {expr}")
        assert not empty, "dashboard queries without data during the run:\n" + "\n".join(empty)
        # The variables' label_values() queries offer this namespace and job.
        for var in board["templating"]["list"]:
            if var["type"] == "query":
                parsed = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", var["query"]["query"])
                assert parsed is not None, var["query"]
                selector, label = parsed.groups()
                offered = {r["metric"].get(label) for r in at_time(fill(selector, namespace, "dash"))}
                assert (namespace if label == "namespace" else "dash") in offered, (var["name"], offered)
        print("dashboard panel values during the run:", json.dumps(results))
        # What a user reads off the trainer panels is the run's, not placeholders.
        for key in ("Training loss A", "Tokens per second A", "Tokens per second B", "Progress A", "ETA A"):
            assert results[key] and all(v > 0 and math.isfinite(v) for v in results[key]), (key, results[key])

        # Cardinality while it runs: the trainer pod's scrape and the operator's, in samples.
        trainer_samples = at_time(f'scrape_samples_scraped{{job="{TRAINER_JOB}", {sel}}}')
        operator_samples = at_time(f'scrape_samples_scraped{{job="{OPERATOR_JOB}"}}')
        assert [float(s["value"][1]) for s in trainer_samples] == [TRAINER_SERIES], trainer_samples
        # What Prometheus stores per trainer pod: those, plus its 5 per-target series (up, scrape_*).
        stored = at_time(f'count({{job="{TRAINER_JOB}", {sel}}})')
        assert [float(s["value"][1]) for s in stored] == [TRAINER_SERIES + 5], stored
        # One job adds nothing to the operator's series but at most a reconcile error kind (2 samples).
        (op_n,) = [float(s["value"][1]) for s in operator_samples]
        assert OPERATOR_IDLE_SERIES <= op_n <= OPERATOR_IDLE_SERIES + 2, op_n
        print(f"series: trainer pod {TRAINER_SERIES} (+5 per target in Prometheus), operator {op_n:.0f} "
              f"(idle {OPERATOR_IDLE_SERIES})")
        cluster.kubectl("delete", FTJ, "dash", "-n", namespace, "--wait=false")
