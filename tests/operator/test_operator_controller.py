"""The reconcile loop against an in-memory API: idempotent, patches only on change, never rebuilds history."""

from __future__ import annotations

import copy
from typing import Any

from finetune_api import constants as c
from finetune_operator.controller import Controller
from finetune_operator.metrics import OperatorMetrics
from finetune_operator.settings import Settings
from operator_specs import job_manifest


class MemoryKube:
    """Just the calls the Controller makes, on dicts; counts writes."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.ftjs = {(body["metadata"]["namespace"], body["metadata"]["name"]): body}
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.creates: list[str] = []
        self.status_patches = 0
        self.events: list[str] = []
        self.pods: list[dict[str, Any]] = []

    def get_ftj(self, namespace: str, name: str) -> dict[str, Any] | None:
        body = self.ftjs.get((namespace, name))
        return copy.deepcopy(body) if body else None

    def list_ftjs(self, namespace: str | None) -> list[dict[str, Any]]:
        return [copy.deepcopy(b) for (ns, _), b in self.ftjs.items() if namespace in (None, ns)]

    def patch_ftj_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.status_patches += 1
        self.ftjs[(namespace, name)]["status"] = copy.deepcopy(status)

    def annotate_ftj(self, namespace: str, name: str, annotations: dict[str, str]) -> None:
        self.ftjs[(namespace, name)]["metadata"].setdefault("annotations", {}).update(annotations)

    def ensure(self, obj: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        key = (obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])
        if key in self.objects:
            return copy.deepcopy(self.objects[key]), False
        self.creates.append(obj["kind"])
        self.objects[key] = copy.deepcopy(obj)
        return copy.deepcopy(obj), True

    def set_job_suspend(self, namespace: str, name: str, suspend: bool) -> dict[str, Any]:
        job = self.objects[("Job", namespace, name)]
        job["spec"]["suspend"] = suspend
        return copy.deepcopy(job)

    def list_pods(self, namespace: str, selector: dict[str, str]) -> list[dict[str, Any]]:
        return copy.deepcopy(self.pods)

    def restart_pod(self, namespace: str, name: str, reason: str) -> None:
        raise AssertionError("no restarts expected")

    def event(self, body: dict[str, Any], type_: str, reason: str, message: str) -> None:
        self.events.append(reason)


def controller(body: dict[str, Any]) -> tuple[Controller, MemoryKube]:
    kube = MemoryKube(body)
    return Controller(kube, Settings(trainer_image="img"), OperatorMetrics()), kube  # type: ignore[arg-type]


def body(**spec: Any) -> dict[str, Any]:
    m = job_manifest("tune", "ns", **spec)
    m["metadata"].update(uid="uid-1", generation=1)
    return m


def test_reconcile_twice_creates_each_child_once_and_patches_status_once() -> None:
    ctl, kube = controller(body())
    ctl.reconcile("ns", "tune")
    ctl.reconcile("ns", "tune")
    assert sorted(kube.creates) == ["ConfigMap", "Job", "Service"]
    assert kube.status_patches == 1  # the second pass saw nothing new
    assert kube.ftjs[("ns", "tune")]["status"]["phase"] == c.Phase.PENDING
    assert kube.events == [c.Reason.CREATED]


def test_suspend_is_applied_to_the_existing_job() -> None:
    ctl, kube = controller(body())
    ctl.reconcile("ns", "tune")
    kube.ftjs[("ns", "tune")]["spec"]["suspend"] = True
    ctl.reconcile("ns", "tune")
    assert kube.objects[("Job", "ns", "tune")]["spec"]["suspend"] is True
    assert kube.ftjs[("ns", "tune")]["status"]["phase"] == c.Phase.SUSPENDED


def test_invalid_spec_fails_without_children() -> None:
    ctl, kube = controller(body(method={"type": "qlora"}))
    ctl.reconcile("ns", "tune")
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
    ctl.reconcile("ns", "tune")  # its Job was cleaned up by ttlSecondsAfterFinished
    assert kube.creates == [] and kube.status_patches == 0


def test_gauge_counts_phases_and_forgets_deleted_jobs() -> None:
    ctl, kube = controller(body())
    ctl.resync([None])
    assert ctl.metrics.jobs.labels(phase=c.Phase.PENDING)._value.get() == 1
    kube.ftjs.clear()
    ctl.resync([None])
    assert ctl.metrics.jobs.labels(phase=c.Phase.PENDING)._value.get() == 0
