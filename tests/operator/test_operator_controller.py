"""The reconcile loop against an in-memory API: idempotent, patches only on change, never rebuilds
history, and reads from the watch cache instead of the API once the watches have delivered."""

from __future__ import annotations

import copy
import json
from typing import Any

from finetune_api import constants as c
from finetune_operator.builders import JOB_CONTROLLER_UID_LABEL as JOB_UID_LABEL
from finetune_operator.controller import Controller
from finetune_operator.metrics import OperatorMetrics
from finetune_operator.settings import Settings
from operator_specs import job_manifest


def merge_patch(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """RFC 7386, as the API server applies a merge patch."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            merge_patch(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


class MemoryKube:
    """Just the calls the Controller makes, on dicts; counts writes."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.ftjs = {(body["metadata"]["namespace"], body["metadata"]["name"]): body}
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.creates: list[str] = []
        self.status_patches = 0
        self.events: list[str] = []
        self.messages: list[str] = []
        self.pods: list[dict[str, Any]] = []
        self.reads: list[str] = []
        self.patches: list[tuple[str, dict[str, Any]]] = []
        self.restarted: list[str] = []
        self._rv = 100

    def _bump(self, obj: dict[str, Any]) -> None:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)

    def get_ftj(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.reads.append("get finetunejob")
        body = self.ftjs.get((namespace, name))
        return copy.deepcopy(body) if body else None

    def patch_ftj_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        self.status_patches += 1
        body = self.ftjs[(namespace, name)]
        body["status"] = copy.deepcopy(status)
        self._bump(body)
        return copy.deepcopy(body)

    def annotate_ftj(self, namespace: str, name: str, annotations: dict[str, str]) -> dict[str, Any]:
        body = self.ftjs[(namespace, name)]
        body["metadata"].setdefault("annotations", {}).update(annotations)
        self._bump(body)
        return copy.deepcopy(body)

    def ensure(self, obj: dict[str, Any], read_first: bool = True) -> tuple[dict[str, Any], bool]:
        key = (obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])
        self.reads.append(f"ensure {obj['kind']} read_first={read_first}")
        if key in self.objects:
            return copy.deepcopy(self.objects[key]), False
        self.creates.append(obj["kind"])
        self.objects[key] = copy.deepcopy(obj)
        self.objects[key]["metadata"]["uid"] = f"{obj['kind'].lower()}-uid-{len(self.creates)}"
        self._bump(self.objects[key])
        return copy.deepcopy(self.objects[key]), True

    def patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.patches.append((kind, copy.deepcopy(patch)))
        obj = self.objects[(kind, namespace, name)]
        merge_patch(obj, patch)
        self._bump(obj)
        return copy.deepcopy(obj)

    def get_child(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        self.reads.append(f"get {kind}")
        obj = self.objects.get((kind, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def list_pods(self, namespace: str, selector: dict[str, str]) -> list[dict[str, Any]]:
        self.reads.append("list pods")
        return copy.deepcopy(self.pods)

    def restart_pod(self, namespace: str, name: str, reason: str) -> None:
        self.restarted.append(name)

    def event(self, body: dict[str, Any], type_: str, reason: str, message: str) -> None:
        self.events.append(reason)
        self.messages.append(message)


def controller(body: dict[str, Any]) -> tuple[Controller, MemoryKube]:
    kube = MemoryKube(body)
    return Controller(kube, Settings(trainer_image="img"), OperatorMetrics()), kube  # type: ignore[arg-type]


def body(**spec: Any) -> dict[str, Any]:
    m = job_manifest("tune", "ns", **spec)
    m["metadata"].update(uid="uid-1", generation=1)
    return m


def test_reconcile_twice_creates_each_child_once_and_patches_status_once() -> None:
    ctl, kube = controller(body())
    ctl.reconcile("ns", "tune", full=True)  # the create handler
    ctl.reconcile("ns", "tune", full=True)  # e.g. resumed after an operator restart
    assert sorted(kube.creates) == ["ConfigMap", "Job", "Service"]
    assert kube.status_patches == 1  # the second pass saw nothing new
    assert kube.ftjs[("ns", "tune")]["status"]["phase"] == c.Phase.PENDING
    assert kube.events == [c.Reason.CREATED]


def test_suspend_is_applied_to_the_existing_job() -> None:
    ctl, kube = controller(body())
    ctl.reconcile("ns", "tune", full=True)
    kube.ftjs[("ns", "tune")]["spec"]["suspend"] = True
    kube.ftjs[("ns", "tune")]["metadata"]["generation"] = 2
    kube._bump(kube.ftjs[("ns", "tune")])
    ctl.seen_ftj("MODIFIED", kube.get_ftj("ns", "tune"))  # what the watch delivers
    ctl.reconcile("ns", "tune", full=True)
    assert kube.objects[("Job", "ns", "tune")]["spec"]["suspend"] is True
    assert kube.ftjs[("ns", "tune")]["status"]["phase"] == c.Phase.SUSPENDED


def test_invalid_spec_fails_without_children() -> None:
    ctl, kube = controller(body(method={"type": "qlora"}))
    ctl.reconcile("ns", "tune", full=True)
    status = kube.ftjs[("ns", "tune")]["status"]
    assert status["phase"] == c.Phase.FAILED
    [failed] = [x for x in status["conditions"] if x["type"] == c.ConditionType.FAILED]
    assert failed["reason"] == c.Reason.INVALID_SPEC
    assert "method.type qlora needs model.quantization" in failed["message"]
    assert kube.creates == []
    ctl.reconcile("ns", "tune")
    assert kube.status_patches == 1


def test_finished_job_is_never_rebuilt() -> None:
    b = body()
    b["status"] = {"phase": c.Phase.SUCCEEDED}
    ctl, kube = controller(b)
    ctl.reconcile("ns", "tune", full=True)  # its Job was cleaned up by ttlSecondsAfterFinished
    assert kube.creates == [] and kube.status_patches == 0


def test_gauge_counts_phases_and_forgets_deleted_jobs() -> None:
    ctl, kube = controller(body())
    ctl.seen_ftj(None, kube.get_ftj("ns", "tune"))  # the watch's initial listing
    ctl.resync()
    assert ctl.metrics.jobs.labels(phase=c.Phase.PENDING)._value.get() == 1
    ctl.seen_ftj("DELETED", kube.get_ftj("ns", "tune"))
    ctl.resync()
    assert ctl.metrics.jobs.labels(phase=c.Phase.PENDING)._value.get() == 0


def running_pod(uid: str = "pod-uid", rv: str = "500", phase: str = "Running", job_uid: str | None = "job-uid-2",
                name: str = "tune-0-abc") -> dict[str, Any]:
    """A trainer pod of the Job (`job_uid`: its owner; the first Job MemoryKube makes), or, with
    job_uid None, a pod that only carries the trainer's labels."""
    owners = [{"apiVersion": "batch/v1", "kind": "Job", "name": "tune", "uid": job_uid, "controller": True}]
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "ns", "uid": uid, "resourceVersion": rv,
                     "ownerReferences": owners if job_uid else [],
                     "labels": {c.LABEL_JOB_NAME: "tune", c.LABEL_MANAGED_BY: c.MANAGED_BY,
                                c.LABEL_COMPONENT: "trainer"},
                     "annotations": {"batch.kubernetes.io/job-completion-index": "0"},
                     "creationTimestamp": "2026-11-29T10:00:00Z"},
        "spec": {"containers": [{"name": "trainer", "image": "img", "env": [{"name": "X", "value": "y" * 500}]}]},
        "status": {"phase": phase, "podIP": "10.0.0.1", "startTime": "2026-11-29T10:00:01Z"},
    }


def test_steady_state_reads_nothing_from_the_api() -> None:
    """Once the watches delivered the job, its Job and its pod, reconciles and resyncs make no API reads."""
    ctl, kube = controller(body())
    ctl.seen_ftj(None, kube.get_ftj("ns", "tune"))
    kube.reads.clear()
    ctl.reconcile("ns", "tune", full=True)  # the create handler: new job, so create without reading
    assert kube.reads == [f"ensure {k} read_first=False" for k in ("ConfigMap", "Job", "Service")]
    job = copy.deepcopy(kube.objects[("Job", "ns", "tune")])
    job["status"] = {"active": 1, "startTime": "2026-11-29T10:00:01Z"}
    assert ctl.seen_job("MODIFIED", job) == "ns/tune"
    assert ctl.seen_pod("ADDED", running_pod()) == "ns/tune"
    kube.reads.clear()
    for _ in range(3):
        ctl.reconcile("ns", "tune")
        ctl.resync()
    assert kube.reads == []
    assert kube.ftjs[("ns", "tune")]["status"]["phase"] == c.Phase.RUNNING
    assert kube.events == [c.Reason.CREATED, c.Reason.RUNNING]  # each milestone told once


def test_a_lost_job_is_recreated_only_after_the_api_confirms_the_owner_exists() -> None:
    ctl, kube = controller(body())
    ctl.reconcile("ns", "tune", full=True)
    job = kube.objects[("Job", "ns", "tune")]
    # Someone deleted the Job while the job was pending; the watch says so.
    ctl.seen_job("DELETED", copy.deepcopy(job))
    del kube.objects[("Job", "ns", "tune")]
    kube.reads.clear()
    ctl.reconcile("ns", "tune")
    assert kube.reads[0] == "get finetunejob"
    assert kube.creates.count("Job") == 2
    # Told and counted; the Service now selects the new Job's pods.
    assert kube.events.count(c.Reason.RECREATED) == 1
    assert ctl.metrics.children_recreated.labels(kind="Job")._value.get() == 1
    new_uid = kube.objects[("Job", "ns", "tune")]["metadata"]["uid"]
    assert kube.objects[("Service", "ns", "tune")]["spec"]["selector"][JOB_UID_LABEL] == new_uid
    # The FineTuneJob itself is gone, but its DELETED event trails the Job's: nothing is re-created.
    ctl.seen_job("DELETED", copy.deepcopy(kube.objects[("Job", "ns", "tune")]))
    del kube.ftjs[("ns", "tune")]
    ctl.reconcile("ns", "tune")
    assert kube.creates.count("Job") == 2
    assert ctl.cache.ftj("ns/tune") is None
    # Further child events of the deleted job cost no API call at all.
    kube.reads.clear()
    ctl.seen_pod("DELETED", running_pod())
    ctl.reconcile("ns", "tune")
    assert kube.reads == []


def test_a_late_event_does_not_roll_the_cached_status_back() -> None:
    ctl, kube = controller(body())
    stale = kube.get_ftj("ns", "tune")
    stale["metadata"]["resourceVersion"] = "1"
    ctl.reconcile("ns", "tune", full=True)  # patches status -> the cache holds the patched object
    ctl.seen_ftj("MODIFIED", stale)  # an older event arrives after our patch
    assert ctl.cache.ftj("ns/tune")["status"]["phase"] == c.Phase.PENDING
    ctl.reconcile("ns", "tune")
    assert kube.events == [c.Reason.CREATED] and kube.status_patches == 1


def test_cache_keeps_only_what_the_controller_reads() -> None:
    from finetune_operator.cache import trim_ftj, trim_pod

    pod = trim_pod(running_pod())
    assert "spec" not in pod and pod["status"]["phase"] == "Running"
    assert pod["metadata"]["annotations"] == {"batch.kubernetes.io/job-completion-index": "0"}
    b = body()
    b["metadata"]["annotations"] = {f"{c.GROUP}/last-handled-configuration": "{...}", f"{c.GROUP}/keep": "1"}
    assert trim_ftj(b)["metadata"]["annotations"] == {f"{c.GROUP}/keep": "1"}
    ctl, _ = controller(body())
    ctl.seen_pod("ADDED", running_pod())
    ctl.seen_pod("DELETED", running_pod())
    assert ctl.cache.sizes() == {"finetunejobs": 0, "jobs": 0, "configmaps": 0, "services": 0, "pods": 0}


def test_a_job_created_during_a_resync_pass_is_not_forgotten() -> None:
    """Regression (bench at 1,000 jobs): the pass's clean-up dropped jobs created while it ran,
    and their later Job events were ignored: 15 jobs stayed Running after their Jobs completed."""
    ctl, kube = controller(body())
    ctl.seen_ftj(None, kube.get_ftj("ns", "tune"))
    ctl.reconcile("ns", "tune", full=True)
    other = body()
    other["metadata"].update(name="late", uid="uid-2")
    kube.ftjs[("ns", "late")] = other
    original = ctl.reconcile

    def reconcile_and_meanwhile_create(namespace: str, name: str, **kw: Any) -> None:
        original(namespace, name, **kw)
        if name == "tune":  # the create handler of a new job runs while the pass goes on
            ctl.seen_ftj("ADDED", kube.get_ftj("ns", "late"))
            original("ns", "late", full=True)

    ctl.reconcile = reconcile_and_meanwhile_create  # type: ignore[method-assign]
    ctl.resync()
    assert ctl.cache.ftj("ns/late") is not None
    assert ctl.metrics.jobs.labels(phase=c.Phase.PENDING)._value.get() == 2


def test_only_a_new_job_or_a_new_generation_asks_for_a_full_reconcile() -> None:
    ctl, kube = controller(body())
    first = kube.get_ftj("ns", "tune")
    first["metadata"]["resourceVersion"] = "1"
    assert ctl.seen_ftj(None, first) == "ns/tune"  # listed at start-up, or just created
    ours = copy.deepcopy(first)
    ours["metadata"]["resourceVersion"] = "2"
    ours["status"] = {"phase": "Running"}
    assert ctl.seen_ftj("MODIFIED", ours) is None  # a status change (ours)
    spec_change = copy.deepcopy(ours)
    spec_change["metadata"].update(resourceVersion="3", generation=2)
    assert ctl.seen_ftj("MODIFIED", spec_change) == "ns/tune"
    recreated = copy.deepcopy(first)
    recreated["metadata"].update(resourceVersion="9", uid="uid-new")
    assert ctl.seen_ftj("ADDED", recreated) == "ns/tune"  # deleted and created again under the same name
    assert ctl.seen_ftj("DELETED", recreated) is None and ctl.cache.ftj("ns/tune") is None


def test_work_queue_collapses_bursts_and_never_runs_a_key_twice_at_once() -> None:
    from finetune_operator.workqueue import WorkQueue

    q = WorkQueue()
    for _ in range(5):
        q.add("ns/a")  # a burst of events for one job
    q.add("ns/b")
    q.add("ns/a", full=True)  # a full request joins the pending one, and goes first
    assert len(q) == 2
    assert q.get(timeout=1) == ("ns/a", True)
    q.add("ns/a")  # changed while being reconciled: not handed to a second worker...
    assert q.get(timeout=1) == ("ns/b", False)
    assert q.get(timeout=0.05) is None
    q.done("ns/a")  # ...but queued again once the first reconcile ends
    assert q.get(timeout=1) == ("ns/a", False)
    q.done("ns/a")
    q.done("ns/b")
    q.close()
    assert q.get() is None


def test_new_jobs_go_before_status_updates() -> None:
    from finetune_operator.workqueue import WorkQueue

    q = WorkQueue()
    for i in range(3):
        q.add(f"ns/running-{i}")  # pod events of jobs created earlier
    q.add("ns/new", full=True)
    assert q.get(timeout=1) == ("ns/new", True)
    assert [q.get(timeout=1) for _ in range(3)] == [(f"ns/running-{i}", False) for i in range(3)]
    assert q.get(timeout=0.05) is None


def test_workers_reconcile_queued_jobs() -> None:
    ctl, kube = controller(body())
    ctl.seen_ftj(None, kube.get_ftj("ns", "tune"))
    threads = ctl.start_workers(2)
    ctl.enqueue("ns/tune", full=True)
    import time

    deadline = time.monotonic() + 10
    while kube.status_patches == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    ctl.stop()
    for t in threads:
        t.join(timeout=5)
    assert sorted(kube.creates) == ["ConfigMap", "Job", "Service"]
    assert kube.ftjs[("ns", "tune")]["status"]["phase"] == c.Phase.PENDING


def test_a_deleted_config_map_or_service_is_made_again_told_and_counted() -> None:
    ctl, kube = controller(body())
    ctl.seen_ftj(None, kube.get_ftj("ns", "tune"))
    ctl.reconcile("ns", "tune", full=True)
    for kind, name in (("ConfigMap", "tune-spec"), ("Service", "tune")):
        gone = kube.objects.pop((kind, "ns", name))
        key = ctl.seen_child(kind, "DELETED", copy.deepcopy(gone))  # what the watch delivers
        assert key == "ns/tune"
        ctl.reconcile("ns", "tune")
        assert (kind, "ns", name) in kube.objects, kind
        assert ctl.metrics.children_recreated.labels(kind=kind)._value.get() == 1
    assert sorted(kube.creates) == ["ConfigMap", "ConfigMap", "Job", "Service", "Service"]
    assert kube.events.count(c.Reason.RECREATED) == 2
    # Our own creations ask for nothing; a resync with every child in place reads and writes nothing.
    assert ctl.seen_child("ConfigMap", "ADDED", copy.deepcopy(kube.objects[("ConfigMap", "ns", "tune-spec")])) is None
    kube.reads.clear()
    ctl.resync()
    assert kube.reads == [] and kube.creates.count("ConfigMap") == 2


def test_only_pods_owned_by_the_job_count_join_the_service_and_can_be_evicted(monkeypatch: Any) -> None:
    import finetune_operator.controller as controller_module

    ctl, kube = controller(body())
    ctl.settings = Settings(trainer_image="img", stall_timeout=0.0)  # any unmoved step is a stall
    ctl.seen_ftj(None, kube.get_ftj("ns", "tune"))
    ctl.reconcile("ns", "tune", full=True)
    job_uid = kube.objects[("Job", "ns", "tune")]["metadata"]["uid"]
    assert kube.objects[("Service", "ns", "tune")]["spec"]["selector"][JOB_UID_LABEL] == job_uid
    # A pod with the trainer's labels that no Job of ours made: not a trainer.
    ctl.seen_pod("ADDED", running_pod(uid="x", job_uid=None, name="lookalike"))
    ctl.reconcile("ns", "tune")
    assert kube.ftjs[("ns", "tune")]["status"]["phase"] == c.Phase.PENDING
    ctl.seen_pod("ADDED", running_pod(job_uid=job_uid))
    monkeypatch.setattr(controller_module, "scrape", lambda url, timeout: {c.TrainerMetric.STEP: 5.0})
    ctl.reconcile("ns", "tune")  # the stall clock starts
    status = kube.ftjs[("ns", "tune")]["status"]
    [running] = [x for x in status["conditions"] if x["type"] == c.ConditionType.RUNNING]
    assert running["message"] == "1/1 trainer pods running"
    ctl.reconcile("ns", "tune")  # stalled: the watchdog restarts the workload
    assert kube.restarted == ["tune-0-abc"]


# --- spec edits (spec_edits.py): applied at once, when the pods start, or refused ------------------


def edit(ctl: Controller, kube: MemoryKube, **spec: Any) -> None:
    """`kubectl apply` of an edited spec: a new generation, then the watch event."""
    body = kube.ftjs[("ns", "tune")]
    for section, values in spec.items():
        if isinstance(values, dict):
            body["spec"].setdefault(section, {}).update(values)
        else:
            body["spec"][section] = values
    body["metadata"]["generation"] += 1
    kube._bump(body)
    key = ctl.seen_ftj("MODIFIED", kube.get_ftj("ns", "tune"))
    assert key == "ns/tune"
    ctl.reconcile("ns", "tune", full=True)


def spec_in_config_map(kube: MemoryKube) -> dict[str, Any]:
    return dict(json.loads(kube.objects[("ConfigMap", "ns", "tune-spec")]["data"][c.SPEC_FILE_NAME]))


def started() -> tuple[Controller, MemoryKube]:
    ctl, kube = controller(body())
    ctl.seen_ftj(None, kube.get_ftj("ns", "tune"))
    ctl.reconcile("ns", "tune", full=True)
    kube.events.clear()
    return ctl, kube


def test_a_run_policy_edit_reaches_the_job_at_once_and_is_told() -> None:
    ctl, kube = started()
    edit(ctl, kube, runPolicy={"backoffLimit": 5, "activeDeadlineSeconds": 3600})
    job = kube.objects[("Job", "ns", "tune")]["spec"]
    assert (job["backoffLimit"], job["activeDeadlineSeconds"]) == (5, 3600)
    assert spec_in_config_map(kube)["runPolicy"]["backoffLimit"] == 5
    assert kube.events == [c.Reason.SPEC_APPLIED]
    assert "runPolicy.activeDeadlineSeconds, runPolicy.backoffLimit: applied to the Job" in kube.messages[-1]
    edit(ctl, kube, runPolicy={"backoffLimit": 5, "activeDeadlineSeconds": None})  # removed again
    assert "activeDeadlineSeconds" not in kube.objects[("Job", "ns", "tune")]["spec"]
    ctl.resync()
    assert kube.events == [c.Reason.SPEC_APPLIED, c.Reason.SPEC_APPLIED]  # told once per edit


def test_a_checkpointing_edit_waits_until_no_trainer_pod_runs() -> None:
    ctl, kube = started()
    job_uid = kube.objects[("Job", "ns", "tune")]["metadata"]["uid"]
    ctl.seen_pod("ADDED", running_pod(job_uid=job_uid))
    ctl.reconcile("ns", "tune")
    edit(ctl, kube, checkpointing={"everySteps": 7})
    # Running ranks read the spec when they started: a pod started now would read another one.
    assert spec_in_config_map(kube)["checkpointing"]["everySteps"] == 100
    assert kube.events[-1] == c.Reason.SPEC_DEFERRED
    assert "checkpointing.everySteps: waits until no trainer pod runs (1 running now)" in kube.messages[-1]
    for _ in range(2):
        ctl.reconcile("ns", "tune")
    assert kube.events.count(c.Reason.SPEC_DEFERRED) == 1
    ctl.seen_pod("DELETED", running_pod(job_uid=job_uid))  # e.g. suspended, or between attempts
    ctl.reconcile("ns", "tune")
    assert spec_in_config_map(kube)["checkpointing"]["everySteps"] == 7
    assert kube.events[-1] == c.Reason.SPEC_APPLIED
    assert kube.messages[-1] == ("spec generation 2: checkpointing.everySteps: written to the spec ConfigMap; "
                                 "trainer pods that start from now on read it")


def test_an_immutable_field_that_got_past_the_crd_is_refused_not_applied() -> None:
    ctl, kube = started()
    edit(ctl, kube, model={"uri": "s3://models/other"})
    assert spec_in_config_map(kube)["model"]["uri"] == "s3://models/tiny-llama"
    assert kube.events == [c.Reason.SPEC_NOT_APPLIED]
    assert "model.uri: cannot change after creation, not applied" in kube.messages[-1]
    ctl.reconcile("ns", "tune")
    assert kube.events == [c.Reason.SPEC_NOT_APPLIED]


def test_an_edit_of_a_finished_job_is_told_to_have_no_effect() -> None:
    b = body()
    b["status"] = {"phase": c.Phase.SUCCEEDED, "observedGeneration": 1}
    b["metadata"]["generation"] = 2  # edited where the CRD lacks the rule that refuses it
    ctl, kube = controller(b)
    for _ in range(2):
        ctl.reconcile("ns", "tune", full=True)
    assert kube.creates == [] and kube.events == [c.Reason.SPEC_NOT_APPLIED]
    assert kube.messages == ["spec generation 2: the job has finished (Succeeded); edits have no effect"]
    assert kube.ftjs[("ns", "tune")]["status"]["observedGeneration"] == 2
