"""Reconcile one FineTuneJob: get, build and apply the children, observe, decide the status, patch only
when it changed.

Every trigger (a FineTuneJob created, resumed or updated; an owned Job or pod changed; the periodic
resync) ends in `Controller.reconcile(namespace, name)`, which is idempotent: it can run twice, or
after the operator died half-way, and converges on the same children and the same status.

Reads come from the watch cache (`cache.WatchCache`, fed by Kopf's event handlers), not from the
API server. The API is read only where the cache cannot be trusted: a created or resumed
FineTuneJob not cached yet, and, before children are re-created for a job that had them, whether
the job still exists.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
import weakref
from typing import Any

from finetune_api import constants as c
from finetune_api.resource import ManifestError, parse_spec
from finetune_api.spec import FineTuneJobSpec
from finetune_api.status import FineTuneJobStatus
from kubernetes.client.exceptions import ApiException
from prometheus_client.parser import text_string_to_metric_families

from . import builders, kueue, policy, preflight, spec_edits
from . import status_rules as status
from .cache import WatchCache, key_of
from .k8s import ChildConflict, Kube, api_error_text
from .metrics import OperatorMetrics
from .settings import Settings
from .workqueue import WorkQueue

log = logging.getLogger(__name__)

#: Threads that reconcile queued jobs. Reconciles mostly wait on the API server; a few in flight
#: keep one slow call from holding up every other job.
WORKERS = 4

#: The children of a FineTuneJob, in the order they are created (see Controller._create_children).
CHILD_KINDS = ("ConfigMap", "Job", "Service")

#: Annotation on the FineTuneJob: how many times the stall watchdog restarted its workload.
STALL_RESTARTS_ANNOTATION = f"{c.GROUP}/stall-restarts"


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


def _owned_by(child: dict[str, Any], uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in child["metadata"].get("ownerReferences") or [])


def _status_of(body: dict[str, Any]) -> FineTuneJobStatus | None:
    return FineTuneJobStatus.model_validate(body["status"]) if body.get("status") else None


def _generation(body: dict[str, Any]) -> int | None:
    generation = body["metadata"].get("generation")
    return int(generation) if generation is not None else None


class Controller:
    def __init__(self, kube: Kube, settings: Settings, metrics: OperatorMetrics) -> None:
        self.kube = kube
        self.settings = settings
        self.metrics = metrics
        self.options = builders.BuildOptions(settings.trainer_image, settings.propagate_prefixes, settings.pod_defaults,
                                             settings.preflight)
        self.policy = settings.policy()
        # Weak: a lock lives while someone holds or waits on it, so deleted jobs leave nothing behind
        # and no reconcile can lose its lock to a clean-up while it runs.
        self._locks: weakref.WeakValueDictionary[str, threading.Lock] = weakref.WeakValueDictionary()
        self._locks_guard = threading.Lock()
        self._watch: dict[str, status.StallClock] = {}
        self.cache = WatchCache()
        self.queue = WorkQueue()
        # Parsed spec per job, by (uid, generation): validation is the costliest step of a reconcile.
        self._specs: dict[str, tuple[tuple[str, int | None], FineTuneJobSpec | ManifestError]] = {}
        # Digest of the spec JSON per job, by (uid, generation), and the spec edits told but not
        # written to the ConfigMap yet: (digest, "deferred" or "refused").
        self._digests: dict[str, tuple[tuple[str, int | None], str]] = {}
        self._edits: dict[str, tuple[str, str]] = {}
        # Last scraped metrics per job: an unchanged scrape in a resync needs no status computation.
        self._scraped: dict[str, dict[str, float] | None] = {}

    def _lock(self, key: str) -> threading.Lock:
        with self._locks_guard:
            lock = self._locks.get(key)
            if lock is None:
                lock = self._locks[key] = threading.Lock()
            return lock

    # --- entry points ------------------------------------------------------------------------

    def reconcile(self, namespace: str, name: str, full: bool = False, periodic: bool = False) -> None:
        """Converge one job. `full` also makes sure every child exists (create, resume, spec update);
        otherwise children are created only when the cache shows no Job. `periodic` (the resync):
        only a running job's scraped metrics and the stall clock can have changed without an event,
        so stop early when neither did."""
        key = key_of(namespace, name)
        start = time.monotonic()
        try:
            with self._lock(key):
                self._reconcile(namespace, name, key, full, periodic)
        except Exception as exc:
            self.metrics.reconcile_errors.labels(kind=type(exc).__name__).inc()
            raise
        finally:
            self.metrics.reconcile_duration.observe(time.monotonic() - start)

    def forget(self, namespace: str, name: str) -> None:
        key = key_of(namespace, name)
        self.metrics.set_phase(key, None)
        self._watch.pop(key, None)
        self._specs.pop(key, None)
        self._digests.pop(key, None)
        self._edits.pop(key, None)
        self._scraped.pop(key, None)
        self.cache.drop_ftj(key)

    # --- the work queue -------------------------------------------------------------------------

    def enqueue(self, key: str | None, full: bool = False) -> None:
        if key:
            self.queue.add(key, full)

    def start_workers(self, count: int = WORKERS) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._work, name=f"reconcile-{i}", daemon=True) for i in range(count)]
        for t in threads:
            t.start()
        return threads

    def stop(self) -> None:
        self.queue.close()

    def _work(self) -> None:
        while (item := self.queue.get()) is not None:
            key, full = item
            try:
                self.reconcile_logged(key, full)
            finally:
                self.queue.done(key)

    def reconcile_logged(self, key: str, full: bool = False, periodic: bool = False) -> None:
        """Reconcile; a failure is logged and retried by the next resync."""
        namespace, name = key.split("/", 1)
        try:
            self.reconcile(namespace, name, full=full, periodic=periodic)
        except ChildConflict as exc:
            log.warning("%s: %s", key, exc)
        except ApiException as exc:
            log.warning("reconcile of %s failed, retried at the next resync: API error %s", key, api_error_text(exc))
        except Exception:
            log.exception("reconcile of %s failed, retried at the next resync", key)

    # --- what the watches deliver -------------------------------------------------------------

    def seen_ftj(self, event: str | None, body: dict[str, Any]) -> str | None:
        """Record a FineTuneJob; returns its key when it needs a full reconcile: first seen
        (created, or listed at start-up), or a new generation (its spec changed)."""
        meta = body["metadata"]
        if event == "DELETED":
            self.forget(meta["namespace"], meta["name"])
            return None
        key = key_of(meta["namespace"], meta["name"])
        held = self.cache.ftj(key)
        self.cache.put_ftj(body, event)
        if meta.get("deletionTimestamp"):
            return None  # the garbage collector removes the children
        if held is None or any(held["metadata"].get(k) != meta.get(k) for k in ("uid", "generation")):
            return key
        return None

    def seen_job(self, event: str | None, body: dict[str, Any]) -> str | None:
        """Record a Job; returns the key of the FineTuneJob to reconcile."""
        return self.cache.put_job(body, event)

    def seen_child(self, kind: str, event: str | None, body: dict[str, Any]) -> str | None:
        """Record a ConfigMap or Service; returns the key of the FineTuneJob to reconcile when
        someone else changed it (deleted: made again; edited: put back), None for its creation."""
        key = self.cache.put_child(kind, body, event)
        return key if event in ("MODIFIED", "DELETED") else None

    def seen_pod(self, event: str | None, body: dict[str, Any]) -> str | None:
        return self.cache.put_pod(body, event)

    def seen_workload(self, event: str | None, body: dict[str, Any]) -> str | None:
        """Record a Kueue Workload; returns the key of the FineTuneJob whose Job it is for."""
        key = kueue.owner_key(body)
        if key is None or self.cache.ftj(key) is None:
            return None
        self.cache.put_workload(key, kueue.trim(body), event)
        return key

    def resync(self, spread_over: float = 0.0) -> None:
        """Reconcile every live job from the cache (progress scraping, the stall watchdog).

        Needs no API reads: children and pods change only through events, which the cache has.
        `spread_over` seconds: pace the pass instead of holding the GIL in one burst, which would
        delay the handlers of new jobs (bench: p99 create latency at 1,000 live jobs).
        """
        keys = self.cache.ftj_keys()
        pause = spread_over / len(keys) if keys and spread_over > 0 else 0.0
        for key in keys:
            if pause:
                time.sleep(pause)
            body = self.cache.ftj(key)
            if body is None:
                continue
            phase = (body.get("status") or {}).get("phase")
            if phase in c.Phase.TERMINAL:
                self.metrics.set_phase(key, phase)
                continue
            self.reconcile_logged(key, periodic=True)
        # Jobs the gauge counts but the cache no longer has were deleted. Read the gauge first and
        # the cache second: a job created during this pass is in the cache before it is counted.
        known = self.metrics.known()
        for key in known - set(self.cache.ftj_keys()):
            ns, name = key.split("/", 1)
            self.forget(ns, name)

    # --- the reconcile: get -> build and apply -> observe -> decide -> write ---------------------

    def _reconcile(self, namespace: str, name: str, key: str, full: bool, periodic: bool = False) -> None:
        body = self._get(namespace, name, key, full)
        if body is None:
            return
        prev = _status_of(body)
        if prev is not None and prev.phase in c.Phase.TERMINAL:
            # Finished jobs are history: their Job may be gone (ttlSecondsAfterFinished); never rebuild it.
            self.metrics.set_phase(key, prev.phase)
            self._edit_of_finished(body, prev, key)
            return
        spec = self._spec(key, body)
        if isinstance(spec, ManifestError):
            self._write(body, prev, status.invalid_spec_status(prev, spec.lines, _generation(body)), key)
            return
        base = prev
        # Also with a GPU Job but a status that does not say so yet (an operator stopped between
        # creating it and writing the status): the passed preflight's summary still lands in status.
        has_gpu_job = self._child("Job", key, body) is not None
        if preflight.needed(builders.wants_preflight(spec), prev, has_gpu_job=False):
            checked = self._preflight(body, key, spec, prev, create=not has_gpu_job)
            if status.is_true(checked, c.ConditionType.DATA_CHECKED):
                base = checked  # passed: the GPU Job now, and the status says both
            elif not has_gpu_job:
                self._write(body, prev, checked, key)  # running (Unknown), or failed (False): no GPU Job
                return
        applied = self._apply(body, key, spec, prev, full)
        if applied is None:
            return  # the FineTuneJob is gone
        body, job = applied
        # A preflight that passed in this pass changes the status even when no trainer runs yet.
        seen = self._observe(body, key, spec, job, prev, periodic and base is prev)
        if seen is None:
            return  # a quiet resync pass: nothing moved
        decision = status.decide(name, spec, base, seen)
        if decision.restart is not None:
            self._restart(body, key, seen, decision.restart)
        self._write(body, prev, decision.status, key)

    def _edit_of_finished(self, body: dict[str, Any], prev: FineTuneJobStatus, key: str) -> None:
        """An edit of a finished job changes nothing (the CRD refuses one; a CRD without its rules
        lets it through): say so once, and mark the generation seen."""
        generation = _generation(body)
        if generation is None or prev.observed_generation is None or generation <= prev.observed_generation:
            return
        self.kube.event(body, "Warning", c.Reason.SPEC_NOT_APPLIED,
                        f"spec generation {generation}: the job has finished ({prev.phase}); edits have no effect")
        new = prev.model_copy(deep=True)
        new.observed_generation = generation
        self._write(body, prev, new, key)

    # --- get ---

    def _get(self, namespace: str, name: str, key: str, full: bool) -> dict[str, Any] | None:
        """The FineTuneJob from the cache (from the API only for a full reconcile of one not cached
        yet); None when it is gone or going."""
        body = self.cache.ftj(key)
        if body is None and not full:
            # An event of a child whose FineTuneJob is gone (a deletion storm would otherwise cost
            # a GET per child event), or one the FineTuneJob watch has not shown yet, whose own
            # first event asks for a full reconcile.
            return None
        if body is None:
            body = self._fetch(namespace, name, key)
        if body is None or body["metadata"].get("deletionTimestamp"):
            self.forget(namespace, name)
            return None
        return body

    def _fetch(self, namespace: str, name: str, key: str) -> dict[str, Any] | None:
        body = self.kube.get_ftj(namespace, name)
        if body is not None:
            self.cache.put_ftj(body)
            body = self.cache.ftj(key)
        return body

    def _spec(self, key: str, body: dict[str, Any]) -> FineTuneJobSpec | ManifestError:
        version = (str(body["metadata"].get("uid")), body["metadata"].get("generation"))
        held = self._specs.get(key)
        if held is not None and held[0] == version:
            return held[1]
        try:
            parsed = parse_spec(body.get("spec"))
            # The platform's policy (image, priority, placement) refuses like a schema error: before
            # any child exists, with the InvalidSpec condition and event. It admits jobs: one that
            # got its Job (status.jobName) under an older policy runs on (the fields are immutable).
            admitted = bool((body.get("status") or {}).get("jobName"))
            refused = [] if admitted else policy.violations(parsed, self.policy)
            spec: FineTuneJobSpec | ManifestError = ManifestError(refused) if refused else parsed
        except ManifestError as exc:
            spec = exc
        self._specs[key] = (version, spec)
        return spec

    # --- build and apply ---

    def _child(self, kind: str, key: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """The cached child of that kind if this FineTuneJob owns it (not one of an older namesake)."""
        child = self.cache.child(kind, key)
        return child if child is not None and _owned_by(child, body["metadata"]["uid"]) else None

    def _apply(
        self, body: dict[str, Any], key: str, spec: FineTuneJobSpec, prev: FineTuneJobStatus | None, full: bool
    ) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """Make the children exist (a new job, a resumed one, or one whose child was deleted) and
        match what may change in place. Returns the FineTuneJob and its Job; None if the job is gone.

        The whole children are built only when one is to be created: every resync pass comes here
        for each live job, and only the fields that may change are compared (from the cache)."""
        missing = [kind for kind in CHILD_KINDS if self._child(kind, key, body) is None]
        # A status without jobName was written while the preflight ran: its Job is new, not missing.
        had_job = prev is not None and prev.job_name is not None
        if full or missing:
            if prev is not None and not full:
                # A job that had children lost one, or the cache trails a deletion: ask the API
                # before re-creating anything (children of a deleted owner would be garbage).
                namespace, name = key.split("/", 1)
                fetched = self._fetch(namespace, name, key)
                if fetched is None or fetched["metadata"].get("deletionTimestamp"):
                    self.forget(namespace, name)
                    return None
                body = fetched
            wanted = builders.build_children(builders.Owner.from_body(body), spec, self.options)
            self._create_children(body, key, wanted, created_before=had_job)
        job = self._child("Job", key, body)
        assert job is not None  # _create_children cached it
        job = self._sync(key, job, spec_edits.job_patch(job, spec, builders.desired_suspend(spec, creating=False)))
        service = self._child("Service", key, body)
        if service is not None:
            # The Service follows the Job's uid: a re-created Job has a new one.
            want = builders.service_selector(builders.Owner.from_body(body), job["metadata"]["uid"])
            if (service.get("spec") or {}).get("selector") != want:
                self._sync(key, service, {"spec": {"selector": want}})
        self._apply_spec_edit(body, key, spec, job)
        return body, job

    def _preflight(self, body: dict[str, Any], key: str, spec: FineTuneJobSpec,
                   prev: FineTuneJobStatus | None, create: bool = True) -> FineTuneJobStatus:
        """Before the GPU Job: make the spec ConfigMap and the preflight Job exist, and read its
        verdict (preflight.outcome) into the status. `create` False: only read a preflight Job
        that exists (prev when there is none)."""
        owner = builders.Owner.from_body(body)
        if not create:
            held = self.cache.preflight_job(key)
            if held is None or not _owned_by(held, owner.uid):
                return prev or FineTuneJobStatus()
            return preflight.apply(prev, preflight.outcome(held, self.cache.pods(key)), owner.name,
                                   status.now_utc(), _generation(body))
        read_first = prev is not None  # a job seen before probably has them
        if self._child("ConfigMap", key, body) is None:
            config_map, _ = self.kube.ensure(builders.build_config_map(owner, spec), read_first=read_first)
            self.cache.put_child("ConfigMap", config_map)
        job = self.cache.preflight_job(key)
        if job is None or not _owned_by(job, owner.uid):
            job, _ = self.kube.ensure(builders.build_preflight_job(owner, spec, self.options), read_first=read_first)
            self.cache.put_child("Job", job)
        pods = self.cache.pods(key)
        return preflight.apply(prev, preflight.outcome(job, pods), owner.name, status.now_utc(), _generation(body))

    def _spec_digest(self, key: str, body: dict[str, Any], spec: FineTuneJobSpec) -> str:
        version = (str(body["metadata"].get("uid")), body["metadata"].get("generation"))
        held = self._digests.get(key)
        if held is None or held[0] != version:
            held = self._digests[key] = (version, builders.spec_digest(builders.spec_json(spec)))
        return held[1]

    def _apply_spec_edit(self, body: dict[str, Any], key: str, spec: FineTuneJobSpec, job: dict[str, Any]) -> None:
        """Bring the spec ConfigMap to an edited spec and say how each change takes effect
        (spec_edits). The trainer reads checkpointing and evaluation from it when a pod starts, so
        an edit of those waits until no trainer pod runs: every rank of a run reads the same spec."""
        config_map = self._child("ConfigMap", key, body)
        wanted = self._spec_digest(key, body, spec)
        if config_map is None or (config_map["metadata"].get("annotations") or {}).get(
                builders.SPEC_DIGEST_ANNOTATION) == wanted:
            return
        running = len(status.running(status.pods_of(job, self.cache.pods(key))))
        told = self._edits.get(key)
        if told == (wanted, "refused") or (told == (wanted, "deferred") and running):
            return
        # Read only after an edit: the cache does not keep the spec the ConfigMap holds.
        meta = config_map["metadata"]
        current = self.kube.get_child("ConfigMap", meta["namespace"], meta["name"])
        if current is None:
            return  # deleted meanwhile: its watch event brings the next reconcile, which makes it again
        held = json.loads((current.get("data") or {}).get(c.SPEC_FILE_NAME) or "{}")
        text = builders.spec_json(spec)
        paths = [p for p in spec_edits.changes(held, json.loads(text)) if p not in spec_edits.OWN_EVENTS]
        generation = _generation(body)
        if spec_edits.refused(paths):
            self._edits[key] = (wanted, "refused")
            self.kube.event(body, "Warning", c.Reason.SPEC_NOT_APPLIED, spec_edits.describe(paths, generation) or "")
            return
        if spec_edits.for_trainer(paths) and running:
            self._edits[key] = (wanted, "deferred")
            self.kube.event(body, "Normal", c.Reason.SPEC_DEFERRED,
                            spec_edits.describe(paths, generation, running, written=False) or "")
            return
        self._sync(key, config_map, {"metadata": {"annotations": {builders.SPEC_DIGEST_ANNOTATION: wanted}},
                                     "data": {c.SPEC_FILE_NAME: text}})
        if told is not None and told[1] == "deferred":
            paths = spec_edits.for_trainer(paths)  # the rest was told (and applied) before
        self._edits.pop(key, None)
        message = spec_edits.describe(paths, generation)
        if message:
            self.kube.event(body, "Normal", c.Reason.SPEC_APPLIED, message)

    def _create_children(self, body: dict[str, Any], key: str, wanted: builders.Children,
                         created_before: bool) -> None:
        """Create (or adopt) the ConfigMap, the Job, then the Service, whose selector names the
        Job's uid. A child created again for a job that had it (someone deleted it) is told in an
        event and counted."""
        # A new job has no children yet: creating first saves a read each.
        read_first = created_before
        config_map, made_cm = self.kube.ensure(wanted.config_map, read_first=read_first)
        version = (str(body["metadata"].get("uid")), body["metadata"].get("generation"))
        # The digest of the spec just built: _spec_digest need not serialise it again.
        self._digests[key] = (version, wanted.config_map["metadata"]["annotations"][builders.SPEC_DIGEST_ANNOTATION])
        job, made_job = self.kube.ensure(wanted.job, read_first=read_first)
        service_body = builders.build_service(builders.Owner.from_body(body), job["metadata"]["uid"])
        service, made_svc = self.kube.ensure(service_body, read_first=read_first)
        if self.options.pod_defaults.network_policy:
            self.kube.ensure(builders.build_network_policy(builders.Owner.from_body(body), job["metadata"]["uid"]),
                             read_first=read_first)
        for kind, child, made in (("ConfigMap", config_map, made_cm), ("Job", job, made_job),
                                  ("Service", service, made_svc)):
            self.cache.put_child(kind, child)
            if made and created_before:
                self.metrics.children_recreated.labels(kind=kind).inc()
                self.kube.event(body, "Warning", c.Reason.RECREATED,
                                f"{kind} {child['metadata']['name']} was missing (deleted?); created it again")
        if created_before:
            # Resumed after a restart, or healing: the pod watch may not have caught up yet,
            # and a status computed without the pods would step back (Running -> Pending).
            namespace = body["metadata"]["namespace"]
            for pod in self.kube.list_pods(namespace, builders.selector_labels(builders.Owner.from_body(body))):
                self.cache.put_pod(pod)

    def _sync(self, key: str, child: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
        """Patch a child in place (the fields that may change after creation); the object to go on with."""
        if not patch:
            return child
        kind = child["kind"]
        meta = child["metadata"]
        self.cache.put_child(kind, self.kube.patch(kind, meta["namespace"], meta["name"], patch))
        return self.cache.child(kind, key) or child

    # --- observe ---

    def _observe(
        self, body: dict[str, Any], key: str, spec: FineTuneJobSpec, job: dict[str, Any],
        prev: FineTuneJobStatus | None, periodic: bool,
    ) -> status.Observed | None:
        """The Job's pods (only those it owns), the trainer's metrics and the stall clock. None on a
        periodic pass over a job with a status when nothing can have changed without an event: no
        trainer runs, or the scrape is the same and the step is not stuck."""
        pods = status.pods_of(job, self.cache.pods(key))
        running = status.running(pods)
        quiet = prev.phase if periodic and prev is not None else None
        if quiet and not running:
            self.metrics.set_phase(key, quiet)
            return None
        scraped = self._scrape(running)
        stalled = self._watchdog(key, spec, running, scraped)
        if quiet and stalled is None and scraped == self._scraped.get(key):
            self.metrics.set_phase(key, quiet)
            return None
        self._scraped[key] = scraped
        done = (body["metadata"].get("annotations") or {}).get(STALL_RESTARTS_ANNOTATION, "0") or "0"
        return status.Observed(generation=_generation(body), job=job, pods=tuple(pods), metrics=scraped,
                               stalled=stalled, stall_restarts=int(done), workload=self.cache.workload(key))

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
        """Advance the job's stall clock; a message when the step has not moved for the stall timeout."""
        now = time.monotonic()
        clock = status.stall_clock(self._watch.get(key), scraped, bool(running), now)
        if clock is None:
            self._watch.pop(key, None)
        else:
            self._watch[key] = clock
        return status.stall_message(clock, now, spec.run_policy.stall_timeout_seconds or self.settings.stall_timeout)

    # --- act on the decision, write the status ---

    def _restart(self, body: dict[str, Any], key: str, seen: status.Observed, reason: str) -> None:
        """The watchdog's restart: counted on the FineTuneJob first (so an operator restart does
        not repeat it), then every running pod of the Job evicted."""
        meta = body["metadata"]
        self.cache.put_ftj(self.kube.annotate_ftj(
            meta["namespace"], meta["name"], {STALL_RESTARTS_ANNOTATION: str(seen.stall_restarts + 1)}))
        for pod in status.running(list(seen.pods)):
            self.kube.restart_pod(meta["namespace"], pod["metadata"]["name"], reason)
        self._watch.pop(key, None)

    def _write(
        self, body: dict[str, Any], prev: FineTuneJobStatus | None, new: FineTuneJobStatus, key: str
    ) -> None:
        meta = body["metadata"]
        if status.changed(prev, new):
            before, after = (prev.wire() if prev is not None else {}), new.wire()
            log.info("status of %s: %s (changed: %s)", key, new.phase,
                     ", ".join(sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))))
            # Events before the status: an operator killed in between tells a milestone twice, never
            # zero times (the next reconcile still sees the old status and posts it again).
            for m in status.milestones(prev, new):
                self.kube.event(body, m.type, m.reason, m.message)
            # The patched object goes into the cache at once: the next reconcile must not start
            # from the old status (it would post the same milestones again) while the watch trails.
            self.cache.put_ftj(self.kube.patch_ftj_status(meta["namespace"], meta["name"], new.wire()))
            gained = new.restarts - (prev.restarts if prev else 0)
            if gained > 0:
                reason = (new.last_restart_reason or c.Reason.FAILED).split(":", 1)[0]
                self.metrics.restarts.labels(reason=reason).inc(gained)
        self.metrics.set_phase(key, new.phase)
