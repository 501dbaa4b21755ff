"""Pure builders: a validated FineTuneJob spec -> the manifests of its children.

No I/O here; everything is a plain dict ready for the API server, so it is tested without a cluster.
Children: a ConfigMap with the validated spec, a headless Service for rendezvous, and an Indexed
batch/v1 Job running one trainer pod per node.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

from finetune_api import constants as c
from finetune_api import layout
from finetune_api.spec import FineTuneJobSpec

COMPONENT_TRAINER = "trainer"
COMPONENT_SPEC = "spec"
COMPONENT_RENDEZVOUS = "rendezvous"
TRAINER_CONTAINER = "trainer"
TRAINER_COMMAND = ["finetune", "train"]
# Set by the Job controller on every pod of an Indexed Job.
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
# Set by the API server on a Job's selector and pod template (so on every pod of the Job): its uid.
JOB_CONTROLLER_UID_LABEL = "batch.kubernetes.io/controller-uid"
# On the spec ConfigMap: sha256 of the spec JSON it holds.
SPEC_DIGEST_ANNOTATION = f"{c.GROUP}/spec-digest"
# Job condition reason/type names of batch/v1 that the operator reads.
DISRUPTION_TARGET = "DisruptionTarget"
USER_ID = c.TRAINER_USER_ID
# Writable places under a read-only root filesystem.
TMP_DIR = "/tmp"
SHM_DIR = "/dev/shm"
CACHE_ENV = {
    "HOME": f"{c.SCRATCH_DIR}/home",
    "HF_HOME": f"{c.SCRATCH_DIR}/hf",
    "XDG_CACHE_HOME": f"{c.SCRATCH_DIR}/cache",
    "TRITON_CACHE_DIR": f"{c.SCRATCH_DIR}/cache/triton",
    "TMPDIR": TMP_DIR,
}


@dataclass(frozen=True)
class Owner:
    """The FineTuneJob that owns the children."""

    name: str
    namespace: str
    uid: str
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Owner:
        meta = body["metadata"]
        return cls(
            name=meta["name"],
            namespace=meta["namespace"],
            uid=meta["uid"],
            labels=dict(meta.get("labels") or {}),
            annotations=dict(meta.get("annotations") or {}),
        )


_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")


def check_quantity(value: str) -> str:
    """`value` when it is a plain Kubernetes quantity (number and optional suffix), else ValueError."""
    if not _QUANTITY.match(value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 8, 500m, 64Gi)")
    return value


def scale_quantity(value: str, times: int) -> str:
    """`times` x a quantity, in the same unit: ("64Gi", 8) -> "512Gi"."""
    m = _QUANTITY.match(value)
    if m is None:
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 8, 500m, 64Gi)")
    number = Decimal(m.group(1)) * times
    text = format(number.normalize(), "f") if number != number.to_integral_value() else str(int(number))
    return text + (m.group(2) or "")


@dataclass(frozen=True)
class ModelCache:
    """The shared model and dataset cache trainer pods mount (chart `modelCache`).

    Backed by a ReadWriteMany PersistentVolumeClaim of `claim_name` in each job's namespace, or a
    node-local `host_path` (writable by the trainer's uid). With scope "namespace" each namespace
    mounts only its own folder of the volume (subPath = namespace): one namespace's models are
    never visible to another's pods, whatever image they run. With scope "cluster" all
    namespaces share entries; the trainer still serves an entry only to a job whose own
    credentials can list the source.
    """

    claim_name: str | None = None
    host_path: str | None = None
    max_bytes: int | None = None
    scope: str = "namespace"

    def __post_init__(self) -> None:
        if (self.claim_name is None) == (self.host_path is None):
            raise ValueError("model cache: set exactly one of a claim name or a host path")
        if self.scope not in CACHE_SCOPES:
            raise ValueError(f"model cache scope {self.scope!r}: expected one of {', '.join(CACHE_SCOPES)}")
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise ValueError(f"model cache size {self.max_bytes}: must be positive")


CACHE_SCOPES = ("namespace", "cluster")
CACHE_VOLUME = "model-cache"


@dataclass(frozen=True)
class PodDefaults:
    """What a trainer pod gets when the spec does not say (chart `trainerPods`, operator flags).

    CPU and memory a job does not set are requested per GPU (or the CPU-only amounts), so the
    scheduler reserves what a GPU worker needs (data loading, NCCL buffers, a CPU copy of the
    weights) instead of packing GPU pods onto a node with `resources: {}`.
    """

    cpu_per_gpu: str = "8"
    memory_per_gpu: str = "64Gi"
    cpu_without_gpu: str = "2"
    memory_without_gpu: str = "8Gi"
    # /dev/shm is memory: bounded so a runaway DataLoader cannot take the node's RAM.
    shm_size: str = "16Gi"
    # /scratch holds the base model, the artifact and checkpoints before upload; also the pod's
    # ephemeral-storage request (the scheduler then places it on a node with that much disk).
    scratch_size: str = "200Gi"
    # Mount the credentials Secret as files (Env.CREDENTIALS_DIR) instead of environment variables.
    credentials_as_files: bool = False
    # A NetworkPolicy per job (build_network_policy): its pods accept connections from each other only.
    network_policy: bool = False
    # The shared model cache (None: off, every job downloads into its own /scratch).
    model_cache: ModelCache | None = None


@dataclass(frozen=True)
class GpuMemory:
    """GPU memory per node pool, for the preflight's memory verdict (chart `preflight.gpuMemory`).

    A job's pool is what its nodeSelector names: a GPU model (the `nvidia.com/gpu.product` label
    value) looked up in `by_product`, or the GPU memory label itself (MiB); else `default`; else
    the preflight reports the plan without a verdict."""

    by_product: tuple[tuple[str, str], ...] = ()
    default: str | None = None

    def for_spec(self, spec: FineTuneJobSpec) -> str | None:
        """The GPU memory (a quantity such as 80Gi) the job's pods will get, when it is known."""
        if spec.resources.gpus_per_node == 0:
            return None  # a CPU job: no GPU to fit
        selector = spec.resources.node_selector or {}
        product = selector.get(c.GPU_PRODUCT_LABEL)
        if product is not None and product in dict(self.by_product):
            return dict(self.by_product)[product]
        mib = selector.get(c.GPU_MEMORY_LABEL)
        if mib is not None and mib.isdigit():
            return f"{mib}Mi"
        return self.default


@dataclass(frozen=True)
class PreflightOptions:
    """The preflight pod (chart `preflight`): small CPU requests, no GPU; how long it may take."""

    cpu: str = "1"
    memory: str = "2Gi"
    # Its memory limit: it reads a sample of the data and the tokenizer, never the weights.
    memory_limit: str = "8Gi"
    # /scratch for the data it downloads (and its ephemeral-storage request).
    scratch_size: str = "20Gi"
    # The preflight Job's activeDeadlineSeconds: a pod that never schedules fails the job
    # (PreflightFailed) instead of leaving it Pending forever.
    timeout_seconds: int = 1800
    gpu_memory: GpuMemory = GpuMemory()


@dataclass(frozen=True)
class BuildOptions:
    """Operator-wide inputs of the builders."""

    trainer_image: str
    propagate_prefixes: tuple[str, ...] = ()
    pod_defaults: PodDefaults = PodDefaults()
    preflight: PreflightOptions = PreflightOptions()


@dataclass(frozen=True)
class Children:
    config_map: dict[str, Any]
    service: dict[str, Any]
    job: dict[str, Any]

    def all(self) -> list[dict[str, Any]]:
        return [self.config_map, self.service, self.job]


# --- names -----------------------------------------------------------------------------------


def job_name(owner_name: str) -> str:
    return owner_name


def service_name(owner_name: str) -> str:
    return owner_name


def config_map_name(owner_name: str) -> str:
    return f"{owner_name}-spec"


def master_address(owner_name: str) -> str:
    """Indexed Job pods are named <job>-<index> as hosts, under the Service as subdomain."""
    return f"{job_name(owner_name)}-0.{service_name(owner_name)}"


# --- metadata --------------------------------------------------------------------------------


def selector_labels(owner: Owner) -> dict[str, str]:
    return {c.LABEL_JOB_NAME: owner.name, c.LABEL_COMPONENT: COMPONENT_TRAINER}


def child_labels(owner: Owner, component: str) -> dict[str, str]:
    return {c.LABEL_JOB_NAME: owner.name, c.LABEL_MANAGED_BY: c.MANAGED_BY, c.LABEL_COMPONENT: component}


def owner_reference(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND,
        "name": owner.name,
        "uid": owner.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(owner: Owner, name: str, component: str, extra_labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": {**(extra_labels or {}), **child_labels(owner, component)},
        "ownerReferences": [owner_reference(owner)],
    }


def _propagated(items: dict[str, str], prefixes: tuple[str, ...]) -> dict[str, str]:
    return {k: v for k, v in sorted(items.items()) if any(k.startswith(p) for p in prefixes)}


# --- children --------------------------------------------------------------------------------


def spec_json(spec: FineTuneJobSpec) -> str:
    """The validated spec with every default filled in: what the trainer reads back."""
    return json.dumps(spec.wire(), sort_keys=True, indent=2)


def spec_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def build_config_map(owner: Owner, spec: FineTuneJobSpec) -> dict[str, Any]:
    text = spec_json(spec)
    meta = metadata(owner, config_map_name(owner.name), COMPONENT_SPEC)
    # Which spec it holds, comparable without reading the data (the operator rewrites it after edits).
    meta["annotations"] = {SPEC_DIGEST_ANNOTATION: spec_digest(text)}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {c.SPEC_FILE_NAME: text}}


def service_selector(owner: Owner, job_uid: str | None) -> dict[str, str]:
    """The rendezvous Service selects the pods of this FineTuneJob's Job only: by the uid label the
    Job controller puts on them, not by our labels, which any pod in the namespace can carry."""
    return {**selector_labels(owner), **({JOB_CONTROLLER_UID_LABEL: job_uid} if job_uid else {})}


def network_policy_name(owner_name: str) -> str:
    return f"{owner_name}-ranks"


def build_network_policy(owner: Owner, job_uid: str) -> dict[str, Any]:
    """The job's trainer pods accept connections from each other only, on any port: the rendezvous
    port, and NCCL/Gloo, which open connections between ranks on ports picked at run time. Selected
    by the uid label the Job controller sets (service_selector), so no other pod, another job's
    or a hand-made one with our labels, is a peer. Policies add up: the chart's namespace policy
    lets the operator and Prometheus reach the metrics port."""
    pods = {"matchLabels": service_selector(owner, job_uid)}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(owner, network_policy_name(owner.name), COMPONENT_TRAINER),
        "spec": {"podSelector": pods, "policyTypes": ["Ingress"], "ingress": [{"from": [{"podSelector": pods}]}]},
    }


def build_service(owner: Owner, job_uid: str | None = None) -> dict[str, Any]:
    """`job_uid`: the uid of the Job, once it exists (the operator creates the Service after it)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(owner, service_name(owner.name), COMPONENT_RENDEZVOUS),
        "spec": {
            "clusterIP": "None",
            # Rank 0's address must resolve before it is Ready: the other ranks dial it at start.
            "publishNotReadyAddresses": True,
            "selector": service_selector(owner, job_uid),
            "ports": [
                {"name": "rendezvous", "port": c.RENDEZVOUS_PORT, "targetPort": c.RENDEZVOUS_PORT},
                {"name": "metrics", "port": c.TRAINER_METRICS_PORT, "targetPort": c.TRAINER_METRICS_PORT},
            ],
        },
    }


def _env(name: str, value: Any) -> dict[str, Any]:
    return {"name": name, "value": str(value)}


def build_env(owner: Owner, spec: FineTuneJobSpec, credentials_as_files: bool = False) -> list[dict[str, Any]]:
    res = spec.resources
    env: list[dict[str, Any]] = [
        _env(c.Env.SPEC_PATH, f"{c.SPEC_MOUNT_DIR}/{c.SPEC_FILE_NAME}"),
        _env(c.Env.JOB_NAME, owner.name),
        _env(c.Env.NAMESPACE, owner.namespace),
        _env(c.Env.OUTPUT_URI, spec.output.uri),
        _env(c.Env.CHECKPOINT_URI, layout.checkpoints_uri(spec.output.uri)),
        _env(c.Env.METRICS_PORT, c.TRAINER_METRICS_PORT),
        _env(c.Env.NUM_NODES, res.nodes),
        {
            "name": c.Env.NODE_RANK,
            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}},
        },
        _env(c.Env.NPROC_PER_NODE, max(res.gpus_per_node, 1)),
        _env(c.Env.MASTER_ADDR, master_address(owner.name)),
        _env(c.Env.MASTER_PORT, c.RENDEZVOUS_PORT),
        _env(c.Env.RDZV_TIMEOUT, spec.distributed.timeout_seconds),
    ]
    env += [_env(k, v) for k, v in CACHE_ENV.items()]
    secret = spec.output.credentials_secret
    if secret is not None and credentials_as_files:
        # The Secret is a volume (build_volumes): values never appear in the process environment.
        env.append(_env(c.Env.CREDENTIALS_DIR, c.CREDENTIALS_MOUNT_DIR))
    elif secret is not None:
        # Credentials travel only as references to the user's Secret, never as values.
        env += [
            {"name": key, "valueFrom": {"secretKeyRef": {
                "name": secret.name, "key": key, "optional": key not in c.StorageEnv.REQUIRED}}}
            for key in c.StorageEnv.ALL
        ]
    return env


def scratch_size(spec: FineTuneJobSpec, defaults: PodDefaults) -> str:
    return spec.resources.ephemeral_storage or defaults.scratch_size


def build_resources(spec: FineTuneJobSpec, defaults: PodDefaults = PodDefaults()) -> dict[str, Any]:
    """Set in the spec: request = limit. Defaulted: a request only (reserved for the pod; it may
    use idle capacity above it rather than be throttled or OOM-killed at a guessed figure)."""
    res = spec.resources
    gpus = res.gpus_per_node
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    for name, given, per_gpu, without_gpu in (
        ("cpu", res.cpu, defaults.cpu_per_gpu, defaults.cpu_without_gpu),
        ("memory", res.memory, defaults.memory_per_gpu, defaults.memory_without_gpu),
    ):
        if given is not None:
            requests[name] = limits[name] = given
        else:
            requests[name] = scale_quantity(per_gpu, gpus) if gpus > 0 else without_gpu
    requests["ephemeral-storage"] = scratch_size(spec, defaults)
    if gpus > 0:
        requests[c.GPU_RESOURCE] = limits[c.GPU_RESOURCE] = str(gpus)
    return {"requests": requests, "limits": limits} if limits else {"requests": requests}


def build_tolerations(spec: FineTuneJobSpec) -> list[dict[str, Any]]:
    tolerations = [t.wire() for t in spec.resources.tolerations or []]
    if spec.resources.gpus_per_node > 0:
        gpu = {"key": c.GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
        if gpu not in tolerations:
            tolerations.append(gpu)
    return tolerations


def pvc_claims(spec: FineTuneJobSpec) -> dict[str, bool]:
    """Claims named by pvc:// URIs -> whether the trainer writes to them."""
    claims: dict[str, bool] = {}
    sources = [spec.model.uri, spec.model.tokenizer, spec.dataset.train, spec.dataset.validation]
    cont = spec.objective.continual
    if cont is not None:
        sources += [cont.from_artifact, cont.replay.data if cont.replay else None]
    for uri in sources:
        if isinstance(uri, str) and uri.startswith("pvc://"):
            claims.setdefault(uri.removeprefix("pvc://").split("/", 1)[0], False)
    if spec.output.uri.startswith("pvc://"):
        claims[spec.output.uri.removeprefix("pvc://").split("/", 1)[0]] = True
    return claims


def build_volumes(
    owner: Owner, spec: FineTuneJobSpec, defaults: PodDefaults = PodDefaults()
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [
        {"name": "spec", "configMap": {"name": config_map_name(owner.name)}},
        # Past its sizeLimit the kubelet evicts the pod (retried, resumed from the last checkpoint).
        {"name": "scratch", "emptyDir": {"sizeLimit": scratch_size(spec, defaults)}},
        {"name": "tmp", "emptyDir": {}},
        # NCCL and DataLoader workers share memory through /dev/shm; the default 64Mi is too small,
        # and an unbounded one is the node's RAM.
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": defaults.shm_size}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "spec", "mountPath": c.SPEC_MOUNT_DIR, "readOnly": True},
        {"name": "scratch", "mountPath": c.SCRATCH_DIR},
        {"name": "tmp", "mountPath": TMP_DIR},
        {"name": "shm", "mountPath": SHM_DIR},
    ]
    secret = spec.output.credentials_secret
    if secret is not None and defaults.credentials_as_files:
        # Every key becomes a file named after it (no `items`: a listed key that the Secret lacks,
        # such as the optional AWS_REGION, would fail the mount). Readable by the pod's fsGroup.
        volumes.append({"name": "credentials",
                        "secret": {"secretName": secret.name, "optional": False, "defaultMode": 0o440}})
        mounts.append({"name": "credentials", "mountPath": c.CREDENTIALS_MOUNT_DIR, "readOnly": True})
    for i, (claim, writable) in enumerate(sorted(pvc_claims(spec).items())):
        vol = f"pvc-{i}"
        volumes.append({"name": vol, "persistentVolumeClaim": {"claimName": claim, "readOnly": not writable}})
        mounts.append({"name": vol, "mountPath": layout.pvc_mount_path(claim), "readOnly": not writable})
    if defaults.model_cache is not None:
        volume, mount = cache_volume(owner, defaults.model_cache)
        volumes.append(volume)
        mounts.append(mount)
    return volumes, mounts


def cache_volume(owner: Owner, cache: ModelCache) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model cache's volume and mount (writable: jobs fill it)."""
    if cache.claim_name is not None:
        source: dict[str, Any] = {"persistentVolumeClaim": {"claimName": cache.claim_name}}
    else:
        source = {"hostPath": {"path": cache.host_path, "type": "DirectoryOrCreate"}}
    mount: dict[str, Any] = {"name": CACHE_VOLUME, "mountPath": c.CACHE_MOUNT_DIR}
    if cache.scope == "namespace":
        mount["subPath"] = owner.namespace  # the kubelet creates it; other namespaces' folders stay unseen
    return {"name": CACHE_VOLUME, **source}, mount


def cache_env(cache: ModelCache | None) -> list[dict[str, Any]]:
    if cache is None:
        return []
    env = [_env(c.Env.CACHE_DIR, c.CACHE_MOUNT_DIR)]
    if cache.max_bytes is not None:
        env.append(_env(c.Env.CACHE_MAX_BYTES, cache.max_bytes))
    return env


def build_pod_failure_policy() -> dict[str, Any]:
    return {
        "rules": [
            # Any other failure matches no rule and counts against backoffLimit.
            # Bad spec, bad data, access denied: retrying cannot help.
            {
                "action": "FailJob",
                "onExitCodes": {"containerName": TRAINER_CONTAINER, "operator": "In", "values": [c.ExitCode.PERMANENT]},
            },
            # Preemption, eviction, node drain: not the job's fault, not counted against backoffLimit.
            {"action": "Ignore", "onPodConditions": [{"type": DISRUPTION_TARGET, "status": "True"}]},
            {
                "action": "Ignore",
                "onExitCodes": {"containerName": TRAINER_CONTAINER, "operator": "In", "values": [c.ExitCode.PREEMPTED]},
            },
        ]
    }


def build_pod_template(owner: Owner, spec: FineTuneJobSpec, options: BuildOptions) -> dict[str, Any]:
    res = spec.resources
    defaults = options.pod_defaults
    volumes, mounts = build_volumes(owner, spec, defaults)
    container: dict[str, Any] = {
        "name": TRAINER_CONTAINER,
        "image": spec.image or options.trainer_image,
        "command": list(TRAINER_COMMAND),
        "env": build_env(owner, spec, defaults.credentials_as_files) + cache_env(defaults.model_cache),
        "ports": [
            {"name": "metrics", "containerPort": c.TRAINER_METRICS_PORT, "protocol": "TCP"},
            {"name": "rendezvous", "containerPort": c.RENDEZVOUS_PORT, "protocol": "TCP"},
        ],
        "resources": build_resources(spec, defaults),
        "volumeMounts": mounts,
        "terminationMessagePath": c.TERMINATION_LOG_PATH,
        "terminationMessagePolicy": "File",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": USER_ID,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # required by podFailurePolicy; the Job controller retries
        "subdomain": service_name(owner.name),
        "automountServiceAccountToken": False,  # the trainer never talks to the API
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": USER_ID,
            "runAsGroup": USER_ID,
            "fsGroup": USER_ID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if res.node_selector:
        pod_spec["nodeSelector"] = dict(res.node_selector)
    tolerations = build_tolerations(spec)
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if res.priority_class_name:
        pod_spec["priorityClassName"] = res.priority_class_name
    labels = {**_propagated(owner.labels, options.propagate_prefixes), **child_labels(owner, COMPONENT_TRAINER)}
    template_meta: dict[str, Any] = {"labels": labels}
    annotations = _propagated(owner.annotations, options.propagate_prefixes)
    if annotations:
        template_meta["annotations"] = annotations
    return {"metadata": template_meta, "spec": pod_spec}


def desired_suspend(spec: FineTuneJobSpec, creating: bool) -> bool | None:
    """What .spec.suspend of the Job should be; None = leave it to Kueue.

    With a queue, Kueue admits the job by unsuspending it, so the operator creates it suspended and
    afterwards only forces suspension, never lifts it.
    """
    if spec.suspend:
        return True
    if spec.queue_name:
        return True if creating else None
    return False


def job_run_policy(spec: FineTuneJobSpec) -> dict[str, Any]:
    """The Job fields that come from spec.runPolicy (None: not set). They may change on a live Job:
    the operator patches them when the spec is edited."""
    policy = spec.run_policy
    return {
        "backoffLimit": policy.backoff_limit,
        "activeDeadlineSeconds": policy.active_deadline_seconds,
        "ttlSecondsAfterFinished": policy.ttl_seconds_after_finished,
    }


def build_job(owner: Owner, spec: FineTuneJobSpec, options: BuildOptions) -> dict[str, Any]:
    nodes = spec.resources.nodes
    extra: dict[str, str] = {}
    if spec.queue_name:
        # Kueue reads both from the Job: the LocalQueue, and the WorkloadPriorityClass (the
        # FineTuneJob's label of the same name), which decides who preempts whom in a ClusterQueue.
        extra[c.KUEUE_QUEUE_LABEL] = spec.queue_name
        priority = owner.labels.get(c.KUEUE_PRIORITY_CLASS_LABEL)
        if priority:
            extra[c.KUEUE_PRIORITY_CLASS_LABEL] = priority
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": nodes,
        "parallelism": nodes,
        "podFailurePolicy": build_pod_failure_policy(),
        "suspend": bool(desired_suspend(spec, creating=True)),
        "template": build_pod_template(owner, spec, options),
        **{k: v for k, v in job_run_policy(spec).items() if v is not None},
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(owner, job_name(owner.name), COMPONENT_TRAINER, extra or None),
        "spec": job_spec,
    }


def build_children(
    owner: Owner, spec: FineTuneJobSpec, options: BuildOptions, job_uid: str | None = None
) -> Children:
    return Children(
        config_map=build_config_map(owner, spec),
        service=build_service(owner, job_uid),
        job=build_job(owner, spec, options),
    )


# --- the preflight ---------------------------------------------------------------------------

COMPONENT_PREFLIGHT = "preflight"
PREFLIGHT_CONTAINER = "preflight"
PREFLIGHT_COMMAND = ["finetune", "preflight"]
#: Environment of the trainer container the preflight also reads (spec, credentials, caches).
_PREFLIGHT_ENV_SKIP = {c.Env.OUTPUT_URI, c.Env.CHECKPOINT_URI, c.Env.METRICS_PORT, c.Env.NUM_NODES, c.Env.NODE_RANK,
                       c.Env.NPROC_PER_NODE, c.Env.MASTER_ADDR, c.Env.MASTER_PORT, c.Env.RDZV_TIMEOUT}


def preflight_job_name(owner_name: str) -> str:
    return f"{owner_name}-preflight"


def wants_preflight(spec: FineTuneJobSpec) -> bool:
    return spec.preflight.enabled


def preflight_command(spec: FineTuneJobSpec, options: PreflightOptions) -> list[str]:
    """`finetune preflight` on the mounted spec ($FINETUNE_SPEC_PATH), its verdict in the
    termination message, checked against the node pool's GPU memory when the operator knows it."""
    argv = [*PREFLIGHT_COMMAND, "--json", "--sample", str(spec.preflight.sample)]
    gpu_memory = options.gpu_memory.for_spec(spec)
    if gpu_memory is not None:
        argv += ["--gpu-memory", gpu_memory]
    return argv


def build_preflight_job(owner: Owner, spec: FineTuneJobSpec, options: BuildOptions) -> dict[str, Any]:
    """A one-pod Job that runs the preflight in a CPU-only pod: the trainer's image, the same spec
    ConfigMap and credentials, the trainer pod's security context and tolerations (so it can run
    on a GPU node without taking a GPU where a cluster has no other nodes), no GPU, no nodeSelector
    (it picks a GPU model), small requests. Exit 42 (the data or the plan is wrong) fails it at once;
    other failures are retried twice."""
    pre = options.preflight
    # The trainer's pod, less what only training needs: the model cache, /dev/shm, the GPU, big disk.
    defaults = replace(options.pod_defaults, model_cache=None, scratch_size=pre.scratch_size)
    cpu_spec = spec.model_copy(update={"resources": spec.resources.model_copy(update={"ephemeral_storage": None})})
    template = build_pod_template(owner, cpu_spec, replace(options, pod_defaults=defaults))
    pod = template["spec"]
    pod.pop("subdomain", None)
    pod.pop("nodeSelector", None)
    pod["volumes"] = [v for v in pod["volumes"] if v["name"] != "shm"]
    for volume in pod["volumes"]:
        if "persistentVolumeClaim" in volume:
            volume["persistentVolumeClaim"]["readOnly"] = True
    container = pod["containers"][0]
    container.update({
        "name": PREFLIGHT_CONTAINER,
        "command": preflight_command(spec, pre),
        # Downloaded data goes to /scratch (size-limited), through TMPDIR.
        "env": [e if e["name"] != "TMPDIR" else _env("TMPDIR", c.SCRATCH_DIR)
                for e in container["env"] if e["name"] not in _PREFLIGHT_ENV_SKIP],
        "resources": {"requests": {"cpu": pre.cpu, "memory": pre.memory, "ephemeral-storage": pre.scratch_size},
                      "limits": {"memory": pre.memory_limit}},
        "volumeMounts": [{**m, "readOnly": True} if m["name"].startswith("pvc-") else m
                         for m in container["volumeMounts"] if m["name"] != "shm"],
        # A crash before the message is written still says why (the log's tail).
        "terminationMessagePolicy": "FallbackToLogsOnError",
    })
    container.pop("ports", None)
    template["metadata"]["labels"].update(child_labels(owner, COMPONENT_PREFLIGHT))
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(owner, preflight_job_name(owner.name), COMPONENT_PREFLIGHT),
        "spec": {
            "completions": 1,
            "parallelism": 1,
            "backoffLimit": 2,
            "activeDeadlineSeconds": pre.timeout_seconds,
            "podFailurePolicy": {"rules": [
                {"action": "FailJob", "onExitCodes": {"containerName": PREFLIGHT_CONTAINER, "operator": "In",
                                                      "values": [c.ExitCode.PERMANENT]}},
                {"action": "Ignore", "onPodConditions": [{"type": DISRUPTION_TARGET, "status": "True"}]},
            ]},
            "template": template,
        },
    }
