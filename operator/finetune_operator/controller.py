"""Reconcile one FineTuneJob: get, build, apply, observe, compute status, patch only when changed.

Every trigger (a FineTuneJob created, resumed or updated; an owned Job changed; the periodic
resync) ends in `Controller.reconcile(namespace, name)`, which is idempotent: it can run twice, or
after the operator died half-way, and converges on the same children and the same status.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from finetune_api import constants as c
from finetune_api.resource import ManifestError, parse_spec
from finetune_api.spec import FineTuneJobSpec
from finetune_api.status import FineTuneJobStatus
from prometheus_client.parser import text_string_to_metric_families

from . import builders, status
from .k8s import Kube
from .metrics import OperatorMetrics
from .settings import Settings

log = logging.getLogger(__name__)

#: Annotation on the FineTuneJob: how many times the stall watchdog restarted its workload.
STALL_RESTARTS_ANNOTATION = f"{c.GROUP}/stall-restarts"
MAX_STALL_RESTARTS = 1


def scrape(url: str, timeout: float) -> dict[str, float] | None:
    """The trainer's metrics (name -> value, unlabelled samples), or None when it cannot be read."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            text = resp.read().decode()
    except (OSError, ValueError) as exc:
        log.debug("scrape %s failed: %s", url, exc)
        return None
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(c.TRAINER_METRIC_PREFIX) and not sample.labels:
                out[sample.name] = float(sample.value)
    return out


@dataclass
class _Watch:
    step: int
    since: float


class Controller:
    def __init__(self, kube: Kube, settings: Settings, metrics: OperatorMetrics) -> None:
        self.kube = kube
        self.settings = settings
        self.metrics = metrics
        self.options = builders.BuildOptions(settings.trainer_image, settings.propagate_prefixes)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._watch: dict[str, _Watch] = {}

    def _lock(self, key: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    # --- entry points ------------------------------------------------------------------------

    def reconcile(self, namespace: str, name: str) -> None:
        key = f"{namespace}/{name}"
        start = time.monotonic()
        try:
            with self._lock(key):
                self._reconcile(namespace, name, key)
        except Exception as exc:
            self.metrics.reconcile_errors.labels(kind=type(exc).__name__).inc()
            raise
        finally:
            self.metrics.reconcile_duration.observe(time.monotonic() - start)

    def forget(self, namespace: str, name: str) -> None:
        key = f"{namespace}/{name}"
        self.metrics.set_phase(key, None)
        self._watch.pop(key, None)

    def resync(self, namespaces: Iterable[str | None]) -> None:
        """Reconcile every live job (progress, watchdog) and drop the ones that are gone."""
        seen: set[str] = set()
        for ns in namespaces:
            for body in self.kube.list_ftjs(ns):
                meta = body["metadata"]
                key = f"{meta['namespace']}/{meta['name']}"
                seen.add(key)
                phase = (body.get("status") or {}).get("phase")
                if phase in c.Phase.TERMINAL:
                    self.metrics.set_phase(key, phase)
                    continue
                try:
                    self.reconcile(meta["namespace"], meta["name"])
                except Exception:
                    log.exception("resync of %s failed", key)
        for key in self.metrics.known() - seen:
            ns, name = key.split("/", 1)
            self.forget(ns, name)

    # --- the reconcile -------------------------------------------------------------------------

    def _reconcile(self, namespace: str, name: str, key: str) -> None:
        body = self.kube.get_ftj(namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            self.forget(namespace, name)
            return
        generation = body["metadata"].get("generation")
        prev = FineTuneJobStatus.model_validate(body.get("status") or {}) if body.get("status") else None
        if prev is not None and prev.phase in c.Phase.TERMINAL:
            # Finished jobs are history: their Job may be gone (ttlSecondsAfterFinished); never rebuild it.
            self.metrics.set_phase(key, prev.phase)
            return
        try:
            spec = parse_spec(body.get("spec"))
        except ManifestError as exc:
            new = status.invalid_spec_status(prev, exc.lines, generation)
            self._write(body, prev, new, key)
            return

        owner = builders.Owner.from_body(body)
        children = builders.build_children(owner, spec, self.options)
        self.kube.ensure(children.config_map)
        self.kube.ensure(children.service)
        job, _created = self.kube.ensure(children.job)
        job = self._sync_suspend(namespace, job, spec)

        pods = self.kube.list_pods(namespace, builders.selector_labels(owner))
        running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"
                   and not p["metadata"].get("deletionTimestamp")]
        scraped = self._scrape(running)
        stalled = self._watchdog(key, spec, running, scraped)
        seen = status.Observed(generation=generation, job=job, pods=tuple(pods), metrics=scraped, stalled=stalled)
        new = status.compute_status(name, spec, prev, seen)

        if stalled is not None and new.phase == c.Phase.RUNNING:
            done = int((body["metadata"].get("annotations") or {}).get(STALL_RESTARTS_ANNOTATION, "0") or 0)
            if done < MAX_STALL_RESTARTS:
                reason = f"{c.Reason.STALLED}: {stalled}"
                self.kube.annotate_ftj(namespace, name, {STALL_RESTARTS_ANNOTATION: str(done + 1)})
                for pod in running:
                    self.kube.restart_pod(namespace, pod["metadata"]["name"], reason)
                # Evicted pods may vanish before they are seen failed: count the restart here.
                new.restarts += 1
                new.last_restart_reason = reason
                self._watch.pop(key, None)
        self._write(body, prev, new, key)

    def _sync_suspend(self, namespace: str, job: dict[str, Any], spec: FineTuneJobSpec) -> dict[str, Any]:
        want = builders.desired_suspend(spec, creating=False)
        have = bool((job.get("spec") or {}).get("suspend"))
        if want is None or want == have:
            return job
        return self.kube.set_job_suspend(namespace, job["metadata"]["name"], want)

    def _scrape(self, running: list[dict[str, Any]]) -> dict[str, float] | None:
        # Rank 0 reports for the whole job.
        rank0 = [p for p in running if (p["metadata"].get("annotations") or {})
                 .get(builders.COMPLETION_INDEX_ANNOTATION, "0") == "0"]
        for pod in rank0:
            url = None
            if self.settings.scrape_url_annotation:
                url = (pod["metadata"].get("annotations") or {}).get(self.settings.scrape_url_annotation)
            if url is None:
                ip = (pod.get("status") or {}).get("podIP")
                if not ip:
                    continue
                url = f"http://{ip}:{c.TRAINER_METRICS_PORT}/metrics"
            got = scrape(url, self.settings.scrape_timeout)
            if got:
                return got
        return None

    def _watchdog(
        self, key: str, spec: FineTuneJobSpec, running: list[dict[str, Any]], scraped: dict[str, float] | None
    ) -> str | None:
        """A message when the step has not moved for the stall timeout, else None."""
        if not running:
            self._watch.pop(key, None)
            return None
        if not scraped or c.TrainerMetric.STEP not in scraped:
            # No reading is no evidence either way; the clock starts at the first reading.
            watch = self._watch.get(key)
        else:
            step = int(scraped[c.TrainerMetric.STEP])
            watch = self._watch.get(key)
            if watch is None or watch.step != step:
                self._watch[key] = _Watch(step, time.monotonic())
                return None
        if watch is None:
            return None
        limit = spec.run_policy.stall_timeout_seconds or self.settings.stall_timeout
        idle = time.monotonic() - watch.since
        if idle < limit:
            return None
        return f"step {watch.step} has not moved for {int(idle)}s (limit {int(limit)}s)"

    def _write(
        self, body: dict[str, Any], prev: FineTuneJobStatus | None, new: FineTuneJobStatus, key: str
    ) -> None:
        meta = body["metadata"]
        if status.changed(prev, new):
            # Events before the status: an operator killed in between tells a milestone twice, never
            # zero times (the next reconcile still sees the old status and posts it again).
            for m in status.milestones(prev, new):
                self.kube.event(body, m.type, m.reason, m.message)
            self.kube.patch_ftj_status(meta["namespace"], meta["name"], new.wire())
            gained = new.restarts - (prev.restarts if prev else 0)
            if gained > 0:
                reason = (new.last_restart_reason or c.Reason.FAILED).split(":", 1)[0]
                self.metrics.restarts.labels(reason=reason).inc(gained)
        self.metrics.set_phase(key, new.phase)
