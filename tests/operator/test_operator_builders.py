"""The children of a FineTuneJob, built without a cluster."""

from __future__ import annotations

import json
from typing import Any

import pytest
from finetune_api import constants as c
from finetune_api import parse_spec
from finetune_cli.manifests import load_job
from finetune_operator.builders import (
    COMPLETION_INDEX_ANNOTATION,
    BuildOptions,
    Owner,
    PodDefaults,
    build_children,
    desired_suspend,
    scale_quantity,
)
from operator_harness import REPO
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
    # Every key the trainer's storage reads, AWS_SESSION_TOKEN (temporary credentials) included.
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_REGION"):
        ref = env[key]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "s3-creds" and ref["key"] == key
        assert "value" not in env[key]
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["optional"] is False
    assert env["AWS_REGION"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert env["AWS_SESSION_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
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


# --- pod resources and volumes the platform sizes (PodDefaults) ----------------------------------


def pod_of(spec_overrides: dict[str, Any], defaults: PodDefaults | None = None) -> dict[str, Any]:
    spec = parse_spec(job_manifest("tune", **spec_overrides)["spec"])
    options = BuildOptions(trainer_image="registry.local/trainer:1", pod_defaults=defaults or PodDefaults())
    built = build_children(OWNER, spec, options)
    return dict(built.job["spec"]["template"]["spec"])


def test_cpu_and_memory_not_in_the_spec_are_requested_per_gpu() -> None:
    defaults = PodDefaults(cpu_per_gpu="12", memory_per_gpu="96Gi", cpu_without_gpu="3", memory_without_gpu="6Gi")
    unset = {"cpu": None, "memory": None}  # the test manifest sets both
    pod = pod_of({"resources": {"gpusPerNode": 8, **unset}}, defaults)
    # Requests only: what the scheduler reserves; no guessed limit to throttle or OOM-kill at.
    assert pod["containers"][0]["resources"] == {
        "requests": {"cpu": "96", "memory": "768Gi", "ephemeral-storage": "200Gi", c.GPU_RESOURCE: "8"},
        "limits": {c.GPU_RESOURCE: "8"},
    }
    cpu_only = pod_of({"resources": {"gpusPerNode": 0, **unset}}, defaults)
    assert cpu_only["containers"][0]["resources"] == {
        "requests": {"cpu": "3", "memory": "6Gi", "ephemeral-storage": "200Gi"}}


def test_what_the_spec_sets_wins_and_the_rest_is_defaulted() -> None:
    """examples/full.yaml once asked for 8 GPUs and 1000Gi with no CPU: the CPU is defaulted."""
    pod = pod_of({"resources": {"gpusPerNode": 8, "cpu": None, "memory": "1000Gi"}}, PodDefaults(cpu_per_gpu="500m"))
    assert pod["containers"][0]["resources"] == {
        "requests": {"cpu": "4000m", "memory": "1000Gi", "ephemeral-storage": "200Gi", c.GPU_RESOURCE: "8"},
        "limits": {"memory": "1000Gi", c.GPU_RESOURCE: "8"},
    }


def test_full_example_gets_cpu_memory_and_disk() -> None:
    job = load_job(REPO / "examples" / "full.yaml")
    built = build_children(OWNER, job.spec, OPTIONS)
    requests = built.job["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]
    assert {"cpu", "memory", "ephemeral-storage", c.GPU_RESOURCE} <= set(requests)


@pytest.mark.parametrize(("value", "times", "want"), [
    ("8", 8, "64"), ("500m", 3, "1500m"), ("64Gi", 8, "512Gi"), ("1.5", 3, "4.5"), ("0.25", 4, "1")])
def test_scale_quantity(value: str, times: int, want: str) -> None:
    assert scale_quantity(value, times) == want


def test_shm_and_scratch_have_size_limits() -> None:
    pod = pod_of({}, PodDefaults(shm_size="4Gi", scratch_size="300Gi"))
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "4Gi"}
    assert volumes["scratch"]["emptyDir"] == {"sizeLimit": "300Gi"}
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["scratch"] == c.SCRATCH_DIR and mounts["shm"] == "/dev/shm"
    assert pod["containers"][0]["resources"]["requests"]["ephemeral-storage"] == "300Gi"


def test_credentials_as_files_mount_the_secret_and_leave_the_environment_clean() -> None:
    pod = pod_of({}, PodDefaults(credentials_as_files=True))
    container = pod["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert not any(k in env for k in c.StorageEnv.ALL)
    assert not any("secretKeyRef" in (e.get("valueFrom") or {}) for e in container["env"])
    assert env[c.Env.CREDENTIALS_DIR]["value"] == c.CREDENTIALS_MOUNT_DIR
    (volume,) = [v for v in pod["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == "s3-creds" and volume["secret"]["defaultMode"] == 0o440
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert mount == {"name": volume["name"], "mountPath": c.CREDENTIALS_MOUNT_DIR, "readOnly": True}
    # Without a credentials Secret there is nothing to mount.
    bare = pod_of({"output": {"uri": "s3://out/run-1", "credentialsSecret": None}},
                  PodDefaults(credentials_as_files=True))
    assert not [v for v in bare["volumes"] if "secret" in v]
    assert c.Env.CREDENTIALS_DIR not in {e["name"] for e in bare["containers"][0]["env"]}


def test_spec_sizes_the_scratch_disk() -> None:
    pod = pod_of({"resources": {"gpusPerNode": 1, "ephemeralStorage": "1500Gi"}}, PodDefaults(scratch_size="100Gi"))
    assert {v["name"]: v for v in pod["volumes"]}["scratch"]["emptyDir"] == {"sizeLimit": "1500Gi"}
    assert pod["containers"][0]["resources"]["requests"]["ephemeral-storage"] == "1500Gi"


def test_network_policy_lets_only_the_jobs_own_pods_in() -> None:
    from finetune_operator.builders import JOB_CONTROLLER_UID_LABEL, build_network_policy

    built = children()
    np = build_network_policy(OWNER, "job-uid-7")
    assert np["metadata"]["ownerReferences"] == built.job["metadata"]["ownerReferences"]
    assert np["metadata"]["namespace"] == "team-a"
    spec = np["spec"]
    # The pods of this Job (the uid label the Job controller sets on them), nobody else's.
    selector = spec["podSelector"]["matchLabels"]
    assert selector[JOB_CONTROLLER_UID_LABEL] == "job-uid-7"
    template_labels = built.job["spec"]["template"]["metadata"]["labels"]
    assert {k: v for k, v in selector.items() if k != JOB_CONTROLLER_UID_LABEL}.items() <= template_labels.items()
    assert spec["policyTypes"] == ["Ingress"]
    assert spec["ingress"] == [{"from": [{"podSelector": {"matchLabels": selector}}]}]  # any port: NCCL
