"""Operator scale on the local test cluster (tests/harness/cluster.py): 1, 100, 1,000 FineTuneJobs.

The API server writes an audit log (policy: Metadata level for every request), so requests are
counted by the server itself and attributed by user agent: the operator's two clients (Kopf's
aiohttp and the kubernetes Python client) vs everything else (controllers, kwok, this bench,
whose client says "finetune-bench"). Per size, in a namespace of its own and with a fresh operator
process:

1. burst: create N FineTuneJobs back to back (CPU-only, gpusPerNode 0, pods held Running by the
   kwok stage annotation); create->Job latency = the bench watch's ADDED time of the Job minus the
   time just before the create call; then the time until all N are Running;
2. probes: with the N jobs live, create jobs one at a time and time each create->Job;
3. finish: release the pods (they succeed), wait until every job is terminal, delete the jobs,
   wait until they are gone; then count the operator's requests over the whole lifecycle.

Each job's metrics URL points at one fake trainer endpoint on 127.0.0.1 (the operator's scraper
never goes off loopback), which reports a constant step, as a trainer between steps would.

Profiles (not for the recorded figures: profilers slow the operator down): BENCH_OPERATOR_PROFILE=cpu
runs the operator under py-spy (collapsed stacks, operator-N.pyspy.txt), =memory under memray
(operator-N.memray.bin; `python -m memray stats` / `summary` on it), both in the work folder.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from finetune_api import constants as c

from .common import REPO

WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection"}
READ_VERBS = {"get", "list", "watch"}
OPERATOR_AGENTS = ("kopf/", "OpenAPI-Generator/")
BENCH_AGENT = "finetune-bench"
TEST_PREFIX = "test.finetune.dev/"
METRICS_URL_ANNOTATION = f"{TEST_PREFIX}metrics-url"
PODS_PER_NODE = 110
#: A probe without its Job after this long counts as this long (and is reported as timed out).
PROBE_TIMEOUT = 180
#: Outside tests' cluster root, whose reaper removes the state of clusters not started by pytest.
STATE_ROOT = REPO / ".tools" / "bench-clusters"
AUDIT_POLICY = """apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: Metadata
"""


def audited_cluster(state_dir: Path, cpu_nodes: int) -> Any:
    """A TestCluster whose API server writes an audit log (kwokctl's kubeAuditPolicy option)."""
    from harness.cluster import TestCluster

    class AuditedCluster(TestCluster):
        @property
        def audit_log(self) -> Path:
            return self.logs_dir / "audit.log"

        def _kwokctl_config(self) -> str:
            docs = super()._kwokctl_config().split("\n---\n")
            conf = json.loads(docs[0])
            policy = self.state_dir / "audit-policy.yaml"
            policy.write_text(AUDIT_POLICY)
            conf["options"]["kubeAuditPolicy"] = str(policy)
            return "\n---\n".join([json.dumps(conf), *docs[1:]])

    return AuditedCluster(state_dir, name="finetune-bench", gpu_nodes=1, cpu_nodes=cpu_nodes)


class FakeTrainerMetrics:
    """One /metrics endpoint every job's scrape URL points at: step 5 of 100, constant."""

    def __init__(self) -> None:
        body = "".join(f"# TYPE {k} gauge\n{k} {v}\n" for k, v in {
            c.TrainerMetric.STEP: 5, c.TrainerMetric.TOTAL_STEPS: 100, c.TrainerMetric.LOSS: 1.5,
            c.TrainerMetric.TOKENS_PER_SECOND: 1000.0}.items()).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def handle(self) -> None:
                try:
                    super().handle()
                except OSError:  # the scraper gave up (timeout): nothing to report
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/metrics"
        # Served by a forked process: the bench's own watch threads must not hold up the operator's
        # scrapes (a slow answer would time out and slow every reconcile of a running job).
        self.process = multiprocessing.get_context("fork").Process(target=self.server.serve_forever, daemon=True)
        self.process.start()

    def close(self) -> None:
        self.process.terminate()
        self.process.join(10)
        self.server.server_close()


def job_manifest(name: str, namespace: str, metrics_url: str) -> dict[str, Any]:
    return {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND,
        "metadata": {"name": name, "namespace": namespace,
                     "annotations": {f"{TEST_PREFIX}hold": "true", METRICS_URL_ANNOTATION: metrics_url}},
        "spec": {
            "model": {"uri": "s3://models/tiny-llama"},
            "dataset": {"train": "s3://data/train.jsonl", "format": "prompt_completion"},
            "method": {"type": "lora"},
            "hyperparameters": {"maxSteps": 100},
            # Tiny pods: the operator's default scratch (200Gi, also the ephemeral-storage request)
            # would fit 5 per fake node and leave most jobs unschedulable.
            "resources": {"gpusPerNode": 0, "cpu": "100m", "memory": "64Mi", "ephemeralStorage": "1Gi"},
            "output": {"uri": f"s3://out/{name}"},
            # The recorded numbers measure the GPU Job's path; the preflight (a pod of its own per
            # job) is off, as in the runs RESULTS.md records.
            "preflight": {"enabled": False},
        },
    }


class Watcher:
    """Client-side arrival times of Jobs (by owning FineTuneJob) and FineTuneJob phases."""

    def __init__(self, api: Any, namespace: str) -> None:
        self.api = api
        self.namespace = namespace
        self.job_added: dict[str, float] = {}
        self.phase: dict[str, str] = {}
        self.phase_at: dict[tuple[str, str], float] = {}
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._jobs, daemon=True),
                        threading.Thread(target=self._ftjs, daemon=True)]
        for t in self.threads:
            t.start()

    def _loop(self, list_fn: Any, on_event: Any, **kwargs: Any) -> None:
        from kubernetes import watch

        rv = None
        while not self.stop.is_set():
            w = watch.Watch()
            try:
                for ev in w.stream(list_fn, self.namespace, timeout_seconds=30, resource_version=rv, **kwargs):
                    obj = ev["object"]
                    obj = obj if isinstance(obj, dict) else self.api.sanitize_for_serialization(obj)
                    rv = obj["metadata"].get("resourceVersion", rv)
                    on_event(ev["type"], obj, time.time())
                    if self.stop.is_set():
                        break
            except Exception:  # an expired or broken watch restarts from a fresh list
                rv = None
                time.sleep(0.2)

    def _jobs(self) -> None:
        from kubernetes import client

        def on_event(kind: str, obj: dict[str, Any], t: float) -> None:
            owner = (obj["metadata"].get("labels") or {}).get(c.LABEL_JOB_NAME)
            if owner and owner not in self.job_added:
                self.job_added[owner] = t

        self._loop(client.BatchV1Api(self.api).list_namespaced_job, on_event)

    def _ftjs(self) -> None:
        from kubernetes import client

        def on_event(kind: str, obj: dict[str, Any], t: float) -> None:
            name = obj["metadata"]["name"]
            if kind == "DELETED":
                self.phase[name] = "Deleted"
            else:
                self.phase[name] = (obj.get("status") or {}).get("phase", "")
            self.phase_at.setdefault((name, self.phase[name]), t)

        api = client.CustomObjectsApi(self.api)

        def list_fn(namespace: str, **kw: Any) -> Any:
            return api.list_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL, **kw)

        self._loop(list_fn, on_event)

    def close(self) -> None:
        self.stop.set()


def _rss_mib(pid: int) -> float:
    """Peak RSS so far (VmHWM) of a live process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return 0.0


def _wait(pred: Any, timeout: float, what: str, interval: float = 0.2) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - t0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (p99 of 20 values is the largest)."""
    vals = sorted(values)
    return vals[max(0, math.ceil(q / 100 * len(vals)) - 1)]


def latency_summary(values: list[float]) -> dict[str, float]:
    return {"p50": percentile(values, 50), "p99": percentile(values, 99), "max": max(values), "n": len(values)}


def count_requests(audit_log: Path, offset: int) -> dict[str, Counter[str]]:
    """Requests since `offset` of the audit log, by agent class -> 'verb resource[/sub]'."""
    seen: set[str] = set()
    out: dict[str, Counter[str]] = {"operator": Counter(), "other": Counter(), "bench": Counter()}
    with open(audit_log, "rb") as f:
        f.seek(offset)
        for raw in f:
            try:
                ev = json.loads(raw)
            except ValueError:
                continue
            if ev.get("auditID") in seen:
                continue
            seen.add(ev.get("auditID"))
            agent = ev.get("userAgent", "")
            ref = ev.get("objectRef") or {}
            res = ref.get("resource", ev.get("requestURI", "?").split("?")[0])
            if ref.get("subresource"):
                res += "/" + ref["subresource"]
            who = "operator" if agent.startswith(OPERATOR_AGENTS) else "bench" if agent.startswith(BENCH_AGENT) \
                else "other"
            out[who][f"{ev.get('verb')} {res}"] += 1
    return out


def _split(counts: Counter[str]) -> tuple[int, int]:
    writes = sum(n for k, n in counts.items() if k.split()[0] in WRITE_VERBS)
    reads = sum(n for k, n in counts.items() if k.split()[0] in READ_VERBS)
    return writes, reads


class Operator:
    def __init__(self, cluster: Any, namespace: str, log: Path) -> None:
        from harness.cluster import free_port

        self.health_port = free_port()
        argv = [sys.executable, "-m", "finetune_cli.main", "operator", "--standalone", "--namespace", namespace,
                "--trainer-image", "registry.invalid/trainer:bench", "--metrics-port", str(free_port()),
                "--health-port", str(self.health_port), "--bind-address", "127.0.0.1",
                "--propagate-prefix", TEST_PREFIX, "--scrape-url-annotation", METRICS_URL_ANNOTATION]
        env = {**os.environ, **cluster.env, "PYTHONUNBUFFERED": "1"}
        profile = os.environ.get("BENCH_OPERATOR_PROFILE", "")
        stem = log.with_suffix("")
        if profile == "cpu":
            argv = [str(Path(sys.executable).parent / "py-spy"), "record", "--format", "raw", "--rate", "50", "--nonblocking",
                    "-o", f"{stem}.pyspy.txt", "--", *argv]
        elif profile == "memory":
            argv = [sys.executable, "-m", "memray", "run", "--force", "-o", f"{stem}.memray.bin", *argv[1:]]
        elif profile:
            raise ValueError(f"BENCH_OPERATOR_PROFILE={profile!r}: choose cpu or memory")
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=REPO)

    def ready(self) -> bool:
        import urllib.request

        if self.proc.poll() is not None:
            raise RuntimeError(f"operator exited with {self.proc.returncode}; log {self.log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/readyz", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def stop(self) -> float:
        """SIGTERM, wait; returns the peak RSS (MiB) of the whole process life (rusage)."""
        self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while True:
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                self.proc.kill()
                pid, status, usage = os.wait4(self.proc.pid, 0)
                break
            time.sleep(0.1)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        return float(usage.ru_maxrss) / 1024.0


def one_size(cluster: Any, api: Any, n: int, probes: int, workdir: Path, metrics_url: str) -> dict[str, Any]:
    from kubernetes import client

    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    ns = f"bench-{n}-{int(time.time()) % 100000}"
    core.create_namespace({"metadata": {"name": ns}})
    _wait(lambda: bool(core.list_namespaced_service_account(ns).items), 60, "the default service account")
    op = Operator(cluster, ns, workdir / f"operator-{n}.log")
    try:
        return _measure(cluster, api, core, custom, ns, op, n, probes, metrics_url)
    finally:
        if op.proc.returncode is None and op.proc.poll() is None:
            op.stop()


def _measure(cluster: Any, api: Any, core: Any, custom: Any, ns: str, op: Operator, n: int, probes: int,
             metrics_url: str) -> dict[str, Any]:
    from kubernetes import client

    _wait(op.ready, 120, f"the operator to be ready (log {op.log})")
    watcher = Watcher(api, ns)
    time.sleep(1.0)  # both watches established
    offset = cluster.audit_log.stat().st_size
    sent: dict[str, float] = {}
    t0 = time.time()
    names = [f"ftj-{i:04d}" for i in range(n)]
    for name in names:
        sent[name] = time.time()
        custom.create_namespaced_custom_object(c.GROUP, c.VERSION, ns, c.PLURAL, job_manifest(name, ns, metrics_url))
    created_s = time.time() - t0
    timeout = 120 + 2.0 * n
    _wait(lambda: all(x in watcher.job_added for x in names), timeout, f"{n} Jobs")
    _wait(lambda: all(watcher.phase.get(x) == c.Phase.RUNNING for x in names), timeout, f"{n} FineTuneJobs Running")
    running = [watcher.phase_at[(x, c.Phase.RUNNING)] for x in names]
    burst = [watcher.job_added[x] - sent[x] for x in names]
    probe_lat: list[float] = []
    probes_timed_out = 0
    for i in range(probes):
        name = f"probe-{i:03d}"
        names.append(name)
        sent[name] = time.time()
        custom.create_namespaced_custom_object(c.GROUP, c.VERSION, ns, c.PLURAL, job_manifest(name, ns, metrics_url))
        try:
            _wait(lambda name=name: name in watcher.job_added, PROBE_TIMEOUT, f"the Job of {name}", interval=0.01)
            probe_lat.append(watcher.job_added[name] - sent[name])
        except TimeoutError:
            # Censored: no Job within the limit; counted as the limit (the true latency is larger).
            probe_lat.append(float(PROBE_TIMEOUT))
            probes_timed_out += 1
    early = {"jobs": len(names), "burst_latency_s": latency_summary(burst), "all_running_s": max(running) - t0,
             "probe_latency_s": latency_summary(probe_lat) if probe_lat else None,
             "probes_timed_out": probes_timed_out, "operator_rss_mib_live": _rss_mib(op.proc.pid)}
    # Kept even if the finish below fails (a 1,000-job delete can time out on a loaded API server).
    (op.log.parent / f"operator-{n}-live.json").write_text(json.dumps(early, indent=1))
    # Finish: the pods succeed, every job ends, then the jobs are deleted. A probe's pod may not
    # exist yet when its Job is seen: wait until every job runs, so that every pod gets released.
    _wait(lambda: all(watcher.phase.get(x) == c.Phase.RUNNING for x in names), timeout, "the probes to run")
    pods = core.list_namespaced_pod(ns).items
    for pod in pods:
        core.patch_namespaced_pod(pod.metadata.name, ns, {"metadata": {"annotations": {f"{TEST_PREFIX}hold": "false"}}})
    terminal = {c.Phase.SUCCEEDED, c.Phase.FAILED}
    _wait(lambda: all(watcher.phase.get(x) in terminal for x in names), timeout, "every FineTuneJob to finish")
    phases = Counter(watcher.phase.get(x) for x in names)
    def delete_rest() -> None:
        try:
            custom.delete_collection_namespaced_custom_object(c.GROUP, c.VERSION, ns, c.PLURAL)
        except client.ApiException as exc:
            if exc.status != 504:  # the server goes on deleting after its request timeout...
                raise

    # ...but not always to the end (seen: 742 of 1,020 deleted, then nothing): ask again.
    deadline = time.monotonic() + timeout
    while True:
        delete_rest()
        try:
            _wait(lambda: all(watcher.phase.get(x) == "Deleted" for x in names), 120, "every FineTuneJob to be deleted")
            break
        except TimeoutError:
            if time.monotonic() > deadline:
                raise
    time.sleep(2.0)  # requests still in flight reach the log
    rss = op.stop()
    watcher.close()
    counts = count_requests(cluster.audit_log, offset)
    jobs = len(names)
    ow, orr = _split(counts["operator"])
    aw, _ = _split(counts["operator"] + counts["other"])
    core.delete_namespace(ns)
    return {
        "jobs": jobs,
        "create_calls_s": round(created_s, 2),
        "burst_latency_s": latency_summary(burst),
        "all_running_s": max(running) - t0,
        "probe_latency_s": latency_summary(probe_lat) if probe_lat else None,
        "probes_timed_out": probes_timed_out,
        "final_phases": dict(phases),
        "operator_peak_rss_mib": rss,
        "operator_writes_per_job": ow / jobs,
        "operator_reads_per_job": orr / jobs,
        "all_writes_per_job": aw / jobs,
        "operator_writes_by_verb": {k: v for k, v in counts["operator"].items() if k.split()[0] in WRITE_VERBS},
        "operator_reads_by_verb": {k: v for k, v in counts["operator"].items() if k.split()[0] in READ_VERBS},
    }


def scale(sizes: list[int], workdir: Path, probes: int = 20) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    biggest = max(sizes) + probes
    cluster = audited_cluster(STATE_ROOT / str(os.getpid()), cpu_nodes=math.ceil(biggest / PODS_PER_NODE) + 1)
    fake = FakeTrainerMetrics()
    # SIGTERM (a stopped `make bench`) unwinds through the finally below: no cluster left behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cluster.start(timeout=300)
    try:
        api = cluster.api_client()
        api.user_agent = BENCH_AGENT
        out: dict[str, Any] = {"sizes": {}}
        for n in sizes:
            print(f"bench: operator at {n} FineTuneJobs ...", file=sys.stderr, flush=True)
            out["sizes"][str(n)] = one_size(cluster, api, n, probes, workdir, fake.url)
            # Partial results survive a later size that fails or is interrupted.
            (workdir / "operator-partial.json").write_text(json.dumps(out, indent=1))
        out["largest"] = out["sizes"][str(max(sizes))]
        out["method"] = (
            f"Fresh operator per size (production settings: resync every 10 s; {probes} probes). Latencies are "
            "client-side (create call sent -> the bench watch sees the Job). Requests are counted from the API "
            "server's audit log over the whole lifecycle (create, Running, pods released, Succeeded/Failed, "
            "deleted) and divided by the number of jobs; 'all clients' adds the controllers and kwok.")
        return out
    finally:
        fake.close()
        cluster.stop()
