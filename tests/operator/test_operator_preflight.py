"""The preflight before the GPU Job, without a cluster: its Job (builders), its verdict
(operator preflight.outcome), and the reconcile that holds the GPU Job back until it passes."""

from __future__ import annotations

import json
from typing import Any

from finetune_api import constants as c
from finetune_api import parse_spec
from finetune_api.status import DataCheck, TerminationMessage
from finetune_operator import preflight
from finetune_operator.builders import (
    PREFLIGHT_CONTAINER,
    BuildOptions,
    GpuMemory,
    Owner,
    PreflightOptions,
    build_job,
    build_preflight_job,
)
from finetune_operator.controller import Controller
from finetune_operator.metrics import OperatorMetrics
from finetune_operator.settings import Settings
from operator_specs import job_manifest
from test_operator_controller import MemoryKube

OWNER = Owner(name="tune", namespace="team-a", uid="1234-uid")
ON = {"enabled": True}
H200 = GpuMemory(by_product=(("NVIDIA-H200", "141Gi"),), default="80Gi")


def spec_of(**overrides: Any) -> Any:
    return parse_spec(job_manifest("tune", **{"preflight": ON, **overrides})["spec"])


def options(gpu_memory: GpuMemory = H200) -> BuildOptions:
    return BuildOptions(trainer_image="registry.local/trainer:1", preflight=PreflightOptions(gpu_memory=gpu_memory))


def container_of(job: dict[str, Any]) -> dict[str, Any]:
    return dict(job["spec"]["template"]["spec"]["containers"][0])


# --- the preflight Job ----------------------------------------------------------------------------


def test_preflight_job_is_one_cpu_pod_of_the_trainer_image_with_the_jobs_spec_and_credentials() -> None:
    spec = spec_of(resources={"gpusPerNode": 8, "nodeSelector": {c.GPU_PRODUCT_LABEL: "NVIDIA-H200"}},
                   queueName="gpus")
    job = build_preflight_job(OWNER, spec, options())
    trainer = build_job(OWNER, spec, options())
    assert job["metadata"]["name"] == "tune-preflight"
    assert job["metadata"]["ownerReferences"][0]["uid"] == "1234-uid"
    assert job["metadata"]["labels"][c.LABEL_COMPONENT] == "preflight"
    assert job["spec"]["template"]["metadata"]["labels"][c.LABEL_COMPONENT] == "preflight"
    # Not Kueue's to admit, never suspended: it runs before the job queues for GPUs.
    assert c.KUEUE_QUEUE_LABEL not in job["metadata"]["labels"] and "suspend" not in job["spec"]
    assert job["spec"]["completions"] == 1 and job["spec"]["activeDeadlineSeconds"] == 1800
    box = container_of(job)
    assert box["name"] == PREFLIGHT_CONTAINER and box["image"] == container_of(trainer)["image"]
    # The pool's GPU memory: the H200s the nodeSelector asks for.
    assert box["command"] == ["finetune", "preflight", "--json", "--sample", "2000", "--gpu-memory", "141Gi"]
    assert box["resources"] == {"requests": {"cpu": "1", "memory": "2Gi", "ephemeral-storage": "20Gi"},
                                "limits": {"memory": "8Gi"}}
    assert c.GPU_RESOURCE not in json.dumps(box["resources"])
    env = {e["name"]: e for e in box["env"]}
    assert env[c.Env.SPEC_PATH]["value"] == f"{c.SPEC_MOUNT_DIR}/{c.SPEC_FILE_NAME}"
    assert env[c.StorageEnv.SECRET_ACCESS_KEY]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"
    assert env["TMPDIR"]["value"] == c.SCRATCH_DIR
    assert c.Env.MASTER_ADDR not in env and c.Env.NODE_RANK not in env
    pod = job["spec"]["template"]["spec"]
    assert {"name": "spec", "configMap": {"name": "tune-spec"}} in pod["volumes"]
    assert pod["securityContext"] == trainer["spec"]["template"]["spec"]["securityContext"]
    assert box["securityContext"] == container_of(trainer)["securityContext"]
    assert pod["automountServiceAccountToken"] is False
    # No GPU model to pick; it may run on a GPU node (tolerations) without taking a GPU.
    assert "nodeSelector" not in pod and pod["tolerations"] == trainer["spec"]["template"]["spec"]["tolerations"]
    assert box["terminationMessagePolicy"] == "FallbackToLogsOnError"
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "FailJob", "onExitCodes": {
        "containerName": PREFLIGHT_CONTAINER, "operator": "In", "values": [c.ExitCode.PERMANENT]}}


def test_gpu_memory_of_the_node_pool() -> None:
    def memory(table: GpuMemory, **resources: Any) -> str | None:
        return table.for_spec(spec_of(resources={"gpusPerNode": 1, **resources}))

    assert memory(H200, nodeSelector={c.GPU_PRODUCT_LABEL: "NVIDIA-H200"}) == "141Gi"
    assert memory(H200, nodeSelector={c.GPU_PRODUCT_LABEL: "Tesla-T4"}) == "80Gi"  # unknown model: the default
    assert memory(H200, nodeSelector={c.GPU_MEMORY_LABEL: "40960"}) == "40960Mi"  # GFD's label, in MiB
    assert memory(GpuMemory()) is None  # nothing known: the plan without a verdict
    assert memory(H200, gpusPerNode=0) is None  # a CPU job has no GPU to fit
    no_flag = build_preflight_job(OWNER, spec_of(), options(GpuMemory()))
    assert "--gpu-memory" not in container_of(no_flag)["command"]


# --- its verdict ------------------------------------------------------------------------------------


def pj(conditions: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": "tune-preflight", "uid": "pj-uid"}, "status": {"conditions": conditions or []}}


def pod(phase: str, code: int | None = None, message: str = "", uid: str = "pj-uid") -> dict[str, Any]:
    state: dict[str, Any] = {"running": {}} if code is None else {"terminated": {"exitCode": code, "message": message}}
    return {"metadata": {"name": "tune-preflight-x", "labels": {c.LABEL_JOB_NAME: "tune"},
                         "ownerReferences": [{"uid": uid, "controller": True}], "creationTimestamp": "2026-01-01T00:00:00Z"},
            "status": {"phase": phase, "containerStatuses": [{"name": PREFLIGHT_CONTAINER, "state": state}]}}


def said(outcome: str, reason: str, message: str, **check: Any) -> str:
    return json.dumps(TerminationMessage(outcome=outcome, reason=reason, message=message,  # type: ignore[arg-type]
                                         data_check=DataCheck(**check) if check else None).wire())


def test_the_pods_exit_code_and_termination_message_are_the_verdict() -> None:
    assert preflight.outcome(None, []).state == "running"
    assert preflight.outcome(pj(), [pod("Running")]).state == "running"
    # A pod of another Job (same labels) says nothing.
    assert preflight.outcome(pj(), [pod("Failed", 42, uid="other")]).state == "running"
    ok = preflight.outcome(pj(), [pod("Succeeded", 0, said("succeeded", c.Reason.DATA_VALID, "preflight ok: 48 rows",
                                                          rows=48, tokens=900, memory_per_gpu_bytes=2**30))])
    assert (ok.state, ok.reason, ok.message) == ("passed", c.Reason.DATA_VALID, "preflight ok: 48 rows")
    assert ok.data_check is not None and ok.data_check.rows == 48
    big = preflight.outcome(pj(), [pod("Failed", 42, said("failed", c.Reason.WILL_NOT_FIT, "will not fit: needs 90 GiB"))])
    assert (big.state, big.reason, big.message) == ("failed", c.Reason.WILL_NOT_FIT, "will not fit: needs 90 GiB")
    # Exit 42 without a message (the log's tail instead): InvalidData, in the pod's words.
    bare = preflight.outcome(pj(), [pod("Failed", 42, "error: x.jsonl: line 2: bad\npreflight: FAILED\n")])
    assert (bare.reason, bare.message) == (c.Reason.INVALID_DATA, "error: x.jsonl: line 2: bad | preflight: FAILED")
    # The Job gave up on a crashing pod: PreflightFailed, no verdict on the data.
    crashed = preflight.outcome(pj([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                     "message": "Job has reached the specified backoff limit"}]),
                                [pod("Failed", 137, "Killed")])
    assert crashed.state == "failed" and crashed.reason == c.Reason.PREFLIGHT_FAILED
    assert "backoff limit; last pod: exit code 137: Killed" in crashed.message
    assert "spec.preflight.enabled false" in crashed.message


# --- the reconcile --------------------------------------------------------------------------------


def controller_for(**spec: Any) -> tuple[Controller, MemoryKube]:
    m = job_manifest("tune", "ns", **{"preflight": ON, **spec})
    m["metadata"].update(uid="uid-1", generation=1)
    kube = MemoryKube(m)
    settings = Settings(trainer_image="img", preflight=PreflightOptions(gpu_memory=H200))
    return Controller(kube, settings, OperatorMetrics()), kube  # type: ignore[arg-type]


def finish_preflight(ctl: Controller, kube: MemoryKube, code: int, message: str) -> None:
    """The pod of the preflight Job ends (as its watch shows), then the reconcile its event asks for."""
    job = kube.objects[("Job", "ns", "tune-preflight")]
    p = pod("Succeeded" if code == 0 else "Failed", code, message, uid=job["metadata"]["uid"])
    p["metadata"].update(namespace="ns", resourceVersion="900")
    ctl.seen_pod("MODIFIED", p)
    ctl.reconcile("ns", "tune")


def status_of(kube: MemoryKube) -> dict[str, Any]:
    return dict(kube.ftjs[("ns", "tune")]["status"])


def cond(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(x for x in status["conditions"] if x["type"] == type_)


def test_bad_data_fails_the_job_and_no_gpu_job_is_ever_created() -> None:
    ctl, kube = controller_for()
    ctl.reconcile("ns", "tune", full=True)
    ctl.reconcile("ns", "tune", full=True)
    assert kube.creates == ["ConfigMap", "Job"]  # the spec and the preflight Job only
    assert ("Job", "ns", "tune") not in kube.objects
    status = status_of(kube)
    assert status["phase"] == c.Phase.PENDING and cond(status, c.ConditionType.DATA_CHECKED)["status"] == "Unknown"
    assert kube.events == [c.Reason.CHECKING_DATA]
    line = "s3://data/train.jsonl: line 7: column 'completion': expected a string, found null"
    finish_preflight(ctl, kube, 42, said("failed", c.Reason.INVALID_DATA, line, rows=6))
    status = status_of(kube)
    assert status["phase"] == c.Phase.FAILED
    assert cond(status, c.ConditionType.FAILED).items() >= {
        "status": "True", "reason": c.Reason.INVALID_DATA, "message": line}.items()
    assert cond(status, c.ConditionType.DATA_CHECKED)["status"] == "False" and status["dataCheck"]["rows"] == 6
    assert kube.events[-1] == c.Reason.INVALID_DATA and kube.messages[-1] == line
    ctl.reconcile("ns", "tune", full=True)  # finished: nothing more is created
    assert kube.creates == ["ConfigMap", "Job"] and "jobName" not in status


def test_a_passed_preflight_lands_in_status_and_then_the_gpu_job_is_created() -> None:
    ctl, kube = controller_for(queueName="gpus")
    ctl.reconcile("ns", "tune", full=True)
    finish_preflight(ctl, kube, 0, said("succeeded", c.Reason.DATA_VALID, "preflight ok: 48 rows, 900 tokens",
                                        rows=48, tokens=900, truncated_share=0.0, memory_per_gpu_bytes=3 * 2**30,
                                        gpu_memory_bytes=80 * 2**30, largest_batch=64))
    assert kube.creates == ["ConfigMap", "Job", "Job", "Service"]
    gpu_job = kube.objects[("Job", "ns", "tune")]
    # Queued: created suspended with its queue label, for Kueue to admit only now.
    assert gpu_job["spec"]["suspend"] is True and gpu_job["metadata"]["labels"][c.KUEUE_QUEUE_LABEL] == "gpus"
    status = status_of(kube)
    assert status["jobName"] == "tune" and status["phase"] == c.Phase.PENDING
    assert cond(status, c.ConditionType.DATA_CHECKED).items() >= {"status": "True", "reason": c.Reason.DATA_VALID}.items()
    assert status["dataCheck"] == {"rows": 48, "sampled": False, "tokens": 900, "truncatedShare": 0.0,
                                   "noLossShare": 0.0, "memoryPerGpuBytes": 3 * 2**30,
                                   "gpuMemoryBytes": 80 * 2**30, "largestBatch": 64}
    # Told once each; the GPU Job is new, not "recreated".
    assert kube.events[:3] == [c.Reason.CHECKING_DATA, c.Reason.DATA_VALID, c.Reason.CREATED]
    assert c.Reason.RECREATED not in kube.events
    before = list(kube.creates)
    ctl.reconcile("ns", "tune", full=True)  # the preflight is not run again
    assert kube.creates == before


def test_preflight_off_creates_the_gpu_job_at_once() -> None:
    ctl, kube = controller_for(preflight={"enabled": False})
    ctl.reconcile("ns", "tune", full=True)
    assert sorted(kube.creates) == ["ConfigMap", "Job", "Service"]
    assert ("Job", "ns", "tune-preflight") not in kube.objects
    assert not any(x["type"] == c.ConditionType.DATA_CHECKED for x in status_of(kube)["conditions"])


def test_gpu_memory_setting_parses_products_and_a_default_and_refuses_the_rest(
        capsys: Any) -> None:
    import pytest
    from finetune_operator.settings import parse_settings

    got = parse_settings(["--preflight-gpu-memory", "NVIDIA-H200=141Gi, NVIDIA-A100-SXM4-40GB=40Gi,default=80Gi"], env={})
    assert got.preflight.gpu_memory == GpuMemory(
        by_product=(("NVIDIA-H200", "141Gi"), ("NVIDIA-A100-SXM4-40GB", "40Gi")), default="80Gi")
    from_env = parse_settings([], env={"FINETUNE_OPERATOR_PREFLIGHT_GPU_MEMORY": "default=24Gi"})
    assert from_env.preflight.gpu_memory == GpuMemory(default="24Gi")
    assert parse_settings([], env={}).preflight == PreflightOptions()
    for bad in ("NVIDIA-H200", "NVIDIA-H200=lots"):
        with pytest.raises(SystemExit):
            parse_settings(["--preflight-gpu-memory", bad], env={})
        assert "--preflight-gpu-memory" in capsys.readouterr().err


def test_a_suspended_job_is_checked_first_and_its_gpu_job_is_created_suspended() -> None:
    ctl, kube = controller_for(suspend=True)
    ctl.reconcile("ns", "tune", full=True)
    assert kube.creates == ["ConfigMap", "Job"]
    assert "suspend" not in kube.objects[("Job", "ns", "tune-preflight")]["spec"]  # the check itself runs
    finish_preflight(ctl, kube, 0, said("succeeded", c.Reason.DATA_VALID, "preflight ok", rows=3, tokens=30))
    assert kube.objects[("Job", "ns", "tune")]["spec"]["suspend"] is True
    status = status_of(kube)
    assert status["phase"] == c.Phase.SUSPENDED and status["dataCheck"]["rows"] == 3


def test_jobs_that_have_their_gpu_job_are_not_checked_again() -> None:
    from finetune_api.status import FineTuneJobStatus

    assert preflight.needed(True, None, has_gpu_job=False)
    assert not preflight.needed(False, None, has_gpu_job=False)
    # A job from before the operator ran preflights: its Job exists, or status names it.
    assert not preflight.needed(True, None, has_gpu_job=True)
    assert not preflight.needed(True, FineTuneJobStatus(phase="Running", job_name="tune"), has_gpu_job=False)
    # Its GPU Job deleted by hand after the preflight passed: made again, not checked again.
    ctl, kube = controller_for()
    ctl.reconcile("ns", "tune", full=True)
    finish_preflight(ctl, kube, 0, said("succeeded", c.Reason.DATA_VALID, "preflight ok", rows=3, tokens=30))
    gpu_job = kube.objects.pop(("Job", "ns", "tune"))
    ctl.seen_job("DELETED", gpu_job)
    ctl.reconcile("ns", "tune")
    assert kube.creates == ["ConfigMap", "Job", "Job", "Service", "Job"] and c.Reason.RECREATED in kube.events


def test_a_pass_seen_first_by_the_resync_or_lost_in_a_crash_still_lands_in_status() -> None:
    ok = said("succeeded", c.Reason.DATA_VALID, "preflight ok", rows=3, tokens=30)
    # The periodic pass sees the finished pod before the pod event's own reconcile does.
    ctl, kube = controller_for()
    ctl.reconcile("ns", "tune", full=True)
    job = kube.objects[("Job", "ns", "tune-preflight")]
    p = pod("Succeeded", 0, ok, uid=job["metadata"]["uid"])
    p["metadata"].update(namespace="ns", resourceVersion="900")
    ctl.seen_pod("MODIFIED", p)
    ctl.reconcile("ns", "tune", periodic=True)
    status = status_of(kube)
    assert status["dataCheck"]["rows"] == 3 and status["jobName"] == "tune"
    assert cond(status, c.ConditionType.DATA_CHECKED)["status"] == "True"
    # The operator stopped after creating the GPU Job, before writing the status: the next
    # reconcile writes the preflight's pass, and creates nothing again.
    ctl, kube = controller_for()
    ctl.reconcile("ns", "tune", full=True)
    pending = json.loads(json.dumps(status_of(kube)))
    finish_preflight(ctl, kube, 0, ok)
    kube.ftjs[("ns", "tune")]["status"] = pending
    fresh = Controller(kube, ctl.settings, OperatorMetrics())  # a new operator: its cache fills from the watches
    fresh.seen_ftj("ADDED", json.loads(json.dumps(kube.ftjs[("ns", "tune")])))
    for (kind, _, _), obj in list(kube.objects.items()):
        fresh.seen_child(kind, "ADDED", obj) if kind != "Job" else fresh.seen_job("ADDED", obj)
    job = kube.objects[("Job", "ns", "tune-preflight")]
    p = pod("Succeeded", 0, ok, uid=job["metadata"]["uid"])
    p["metadata"].update(namespace="ns", resourceVersion="900")
    fresh.seen_pod("ADDED", p)
    before = list(kube.creates)
    fresh.reconcile("ns", "tune", full=True)
    status = status_of(kube)
    assert kube.creates == before and status["dataCheck"]["rows"] == 3
    assert cond(status, c.ConditionType.DATA_CHECKED)["status"] == "True" and status["jobName"] == "tune"
