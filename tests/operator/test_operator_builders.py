"""The children of a FineTuneJob, built without a cluster."""

from __future__ import annotations

import json
from typing import Any

import pytest
from finetune_api import constants as c
from finetune_api import parse_spec
from finetune_operator.builders import (
    COMPLETION_INDEX_ANNOTATION,
    BuildOptions,
    Owner,
    build_children,
    desired_suspend,
)
from operator_specs import job_manifest

OWNER = Owner(name="tune", namespace="team-a", uid="1234-uid")
OPTIONS = BuildOptions(trainer_image="registry.local/trainer:1")


def children(**overrides: Any) -> Any:
    spec = parse_spec(job_manifest("tune", **overrides)["spec"])
    return build_children(OWNER, spec, OPTIONS)


def env_of(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_every_child_is_owned_by_the_finetunejob_and_labelled() -> None:
    built = children()
    for child in built.all():
        meta = child["metadata"]
        assert meta["namespace"] == "team-a"
        assert meta["ownerReferences"] == [{
            "apiVersion": c.API_VERSION, "kind": c.KIND, "name": "tune", "uid": "1234-uid",
            "controller": True, "blockOwnerDeletion": True,
        }]
        assert meta["labels"][c.LABEL_JOB_NAME] == "tune"
        assert meta["labels"][c.LABEL_MANAGED_BY] == c.MANAGED_BY
    assert {ch["metadata"]["name"] for ch in built.all()} == {"tune", "tune-spec"}


def test_config_map_holds_the_validated_spec_with_defaults() -> None:
    built = children()
    data = json.loads(built.config_map["data"][c.SPEC_FILE_NAME])
    again = parse_spec(data)  # the trainer validates it with the same model
    assert again.method.lora is not None and again.method.lora.r == 16  # default filled in
    assert again.output.save == ["adapter"]


def test_headless_service_selects_the_trainer_pods_before_they_are_ready() -> None:
    built = children()
    svc = built.service["spec"]
    assert svc["clusterIP"] == "None"
    assert svc["publishNotReadyAddresses"] is True
    pod_labels = built.job["spec"]["template"]["metadata"]["labels"]
    assert svc["selector"].items() <= pod_labels.items()
    assert c.RENDEZVOUS_PORT in {p["port"] for p in svc["ports"]}


def test_indexed_job_has_one_pod_per_node_with_gpus_and_rendezvous_env() -> None:
    built = children(resources={"nodes": 3, "gpusPerNode": 8, "cpu": "16", "memory": "64Gi"})
    spec = built.job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 3
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == built.service["metadata"]["name"]
    container = pod["containers"][0]
    assert container["image"] == "registry.local/trainer:1"
    assert container["command"] == ["finetune", "train"]
    amounts = {"cpu": "16", "memory": "64Gi", c.GPU_RESOURCE: "8"}
    assert container["resources"] == {"requests": {**amounts, "ephemeral-storage": "200Gi"}, "limits": amounts}
    assert {"key": c.GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    env = env_of(built.job)
    assert env[c.Env.NUM_NODES]["value"] == "3"
    assert env[c.Env.NPROC_PER_NODE]["value"] == "8"
    assert env[c.Env.MASTER_ADDR]["value"] == "tune-0.tune"
    assert env[c.Env.MASTER_PORT]["value"] == str(c.RENDEZVOUS_PORT)
    assert env[c.Env.NODE_RANK]["valueFrom"]["fieldRef"]["fieldPath"] == (
        f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"
    )
    assert env[c.Env.SPEC_PATH]["value"] == f"{c.SPEC_MOUNT_DIR}/{c.SPEC_FILE_NAME}"
    assert env[c.Env.OUTPUT_URI]["value"] == "s3://out/run-1"
    assert env[c.Env.CHECKPOINT_URI]["value"] == "s3://out/run-1/checkpoints"
    assert env[c.Env.METRICS_PORT]["value"] == str(c.TRAINER_METRICS_PORT)
    assert {"name": "metrics", "containerPort": c.TRAINER_METRICS_PORT, "protocol": "TCP"} in container["ports"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[c.SPEC_MOUNT_DIR]["readOnly"] is True


def test_cpu_only_job_requests_no_gpu_and_tolerates_no_gpu_taint() -> None:
    built = children(resources={"gpusPerNode": 0, "cpu": "2", "memory": "4Gi"})
    pod = built.job["spec"]["template"]["spec"]
    assert c.GPU_RESOURCE not in pod["containers"][0]["resources"]["limits"]
    assert "tolerations" not in pod
    assert env_of(built.job)[c.Env.NPROC_PER_NODE]["value"] == "1"


def test_credentials_come_only_from_the_referenced_secret() -> None:
    env = env_of(children().job)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION"):
        ref = env[key]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "s3-creds" and ref["key"] == key
        assert "value" not in env[key]
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["optional"] is False
    assert env["AWS_REGION"]["valueFrom"]["secretKeyRef"]["optional"] is True
    manifest = job_manifest("tune")
    del manifest["spec"]["output"]["credentialsSecret"]
    no_secret = env_of(build_children(OWNER, parse_spec(manifest["spec"]), OPTIONS).job)
    assert not any(k.startswith("AWS_") for k in no_secret)


def test_pod_runs_restricted_with_writable_scratch_only() -> None:
    pod = children().job["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = pod["containers"][0]["securityContext"]
    assert sc == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
        "runAsUser": c.TRAINER_USER_ID, "capabilities": {"drop": ["ALL"]},
    }
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert {c.SCRATCH_DIR, "/tmp"} <= mounts
    env = env_of(children().job)
    assert env["HF_HOME"]["value"].startswith(c.SCRATCH_DIR)
    assert env["HOME"]["value"].startswith(c.SCRATCH_DIR)


def test_pod_failure_policy_fails_on_permanent_code_and_ignores_disruptions() -> None:
    spec = children(runPolicy={"backoffLimit": 5, "activeDeadlineSeconds": 3600,
                               "ttlSecondsAfterFinished": 600}).job["spec"]
    assert spec["backoffLimit"] == 5
    assert spec["activeDeadlineSeconds"] == 3600
    assert spec["ttlSecondsAfterFinished"] == 600
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob"
    assert rules[0]["onExitCodes"]["values"] == [c.ExitCode.PERMANENT]
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
    assert not any(r["action"] == "Ignore" and c.ExitCode.PERMANENT in r.get("onExitCodes", {}).get("values", [])
                   for r in rules)


def test_placement_fields_and_spec_image() -> None:
    built = children(
        image="my/trainer:2",
        resources={"gpusPerNode": 1, "nodeSelector": {"gpu": "h100"}, "priorityClassName": "high",
                   "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}]},
    )
    pod = built.job["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "my/trainer:2"
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert pod["priorityClassName"] == "high"
    assert {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"} in pod["tolerations"]


@pytest.mark.parametrize(
    ("suspend", "queue", "creating", "expected"),
    [(False, None, True, False), (True, None, False, True), (False, "q", True, True), (False, "q", False, None),
     (True, "q", False, True)],
)
def test_suspend_and_kueue(suspend: bool, queue: str | None, creating: bool, expected: bool | None) -> None:
    extra: dict[str, Any] = {"suspend": suspend}
    if queue:
        extra["queueName"] = queue
    spec = parse_spec(job_manifest("tune", **extra)["spec"])
    assert desired_suspend(spec, creating) is expected
    job = build_children(OWNER, spec, OPTIONS).job
    assert job["spec"]["suspend"] is bool(desired_suspend(spec, True))
    if queue:
        assert job["metadata"]["labels"][c.KUEUE_QUEUE_LABEL] == queue
    else:
        assert c.KUEUE_QUEUE_LABEL not in job["metadata"]["labels"]


def test_pvc_uris_are_mounted_where_the_trainer_looks() -> None:
    built = children(model={"uri": "pvc://models/llama"}, output={"uri": "pvc://results/run"})
    pod = built.job["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"]["readOnly"]
              for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"models": True, "results": False}
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert {f"{c.PVC_MOUNT_ROOT}/models", f"{c.PVC_MOUNT_ROOT}/results"} <= mounts


def test_only_prefixed_annotations_and_labels_reach_the_pods() -> None:
    owner = Owner(name="tune", namespace="ns", uid="u",
                  annotations={"test.finetune.dev/exit-code": "42", "other/x": "y"},
                  labels={"test.finetune.dev/kwok-skip": "true", "team": "a"})
    spec = parse_spec(job_manifest("tune")["spec"])
    tmpl = build_children(owner, spec, BuildOptions("img", ("test.finetune.dev/",))).job["spec"]["template"]
    assert tmpl["metadata"]["annotations"] == {"test.finetune.dev/exit-code": "42"}
    assert tmpl["metadata"]["labels"]["test.finetune.dev/kwok-skip"] == "true"
    assert "team" not in tmpl["metadata"]["labels"]
    plain = build_children(owner, spec, BuildOptions("img")).job["spec"]["template"]
    assert "annotations" not in plain["metadata"]
