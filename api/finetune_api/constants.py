"""Contracts shared by the operator, the trainer and the tests.

Each value is decided once here; the other parts import it instead of repeating literals.
"""

from __future__ import annotations

from typing import Final

# --- The resource -------------------------------------------------------------------------
GROUP: Final = "finetune.dev"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
KIND: Final = "FineTuneJob"
PLURAL: Final = "finetunejobs"
SINGULAR: Final = "finetunejob"
SHORT_NAMES: Final = ("ftj",)
CRD_NAME: Final = f"{PLURAL}.{GROUP}"
CRD_FILE: Final = f"crds/{CRD_NAME}.yaml"

# Names of children are derived from the job name, so it must fit a DNS-1035 label with room
# for the pod suffix (`<name>-<index>-<random>`).
MAX_NAME_LENGTH: Final = 52


# --- Phases -------------------------------------------------------------------------------
class Phase:
    PENDING: Final = "Pending"
    RUNNING: Final = "Running"
    SUCCEEDED: Final = "Succeeded"
    FAILED: Final = "Failed"
    SUSPENDED: Final = "Suspended"

    ALL: Final = (PENDING, RUNNING, SUCCEEDED, FAILED, SUSPENDED)
    TERMINAL: Final = (SUCCEEDED, FAILED)


# --- Condition types and reasons ---------------------------------------------------------
class ConditionType:
    CREATED: Final = "Created"
    RUNNING: Final = "Running"
    SUCCEEDED: Final = "Succeeded"
    FAILED: Final = "Failed"
    SUSPENDED: Final = "Suspended"
    STALLED: Final = "Stalled"
    # Only with spec.queueName: Kueue's verdict on the Job (True once it has quota; False, with
    # Kueue's own reason and message, while it waits or after it was evicted).
    ADMITTED: Final = "Admitted"
    # The preflight (spec.preflight): the data and the memory plan checked in a CPU pod before the
    # GPU Job exists. Unknown while it runs; True (DataValid) or False (InvalidData, WillNotFit,
    # PreflightFailed).
    DATA_CHECKED: Final = "DataChecked"


class Reason:
    CREATED: Final = "Created"
    RUNNING: Final = "Running"
    SUCCEEDED: Final = "Succeeded"
    FAILED: Final = "Failed"
    SUSPENDED: Final = "Suspended"
    RESUMED: Final = "Resumed"
    STALLED: Final = "Stalled"
    INVALID_SPEC: Final = "InvalidSpec"
    PERMANENT_ERROR: Final = "PermanentError"
    BACKOFF_LIMIT_EXCEEDED: Final = "BackoffLimitExceeded"
    DEADLINE_EXCEEDED: Final = "DeadlineExceeded"
    PREEMPTED: Final = "Preempted"
    RESTARTED: Final = "Restarted"
    STORAGE_ERROR: Final = "StorageError"
    PENDING: Final = "Pending"
    # Created suspended, waiting for Kueue to admit it (spec.queueName).
    QUEUED: Final = "Queued"
    # Kueue admitted it (it unsuspends the Job).
    ADMITTED: Final = "Admitted"
    # The preflight: running, passed, or why it failed (the job ends Failed with that reason).
    CHECKING_DATA: Final = "CheckingData"
    DATA_VALID: Final = "DataValid"
    INVALID_DATA: Final = "InvalidData"
    WILL_NOT_FIT: Final = "WillNotFit"
    # The preflight pod itself failed (crashed, OOM-killed, not scheduled in time): no verdict on the data.
    PREFLIGHT_FAILED: Final = "PreflightFailed"
    # A child (ConfigMap, Service, Job) was missing, deleted by hand, and the operator made it again.
    RECREATED: Final = "Recreated"
    # A damaged entry of the shared model cache was discarded and the model downloaded again.
    MODEL_CACHE_REFETCHED: Final = "ModelCacheRefetched"
    # An accepted spec edit: applied (to the Job, the watchdog or the spec ConfigMap), waiting for
    # the trainer pods to stop, or not applied (an immutable field changed where the CRD lacks its rules).
    SPEC_APPLIED: Final = "SpecApplied"
    SPEC_DEFERRED: Final = "SpecDeferred"
    SPEC_NOT_APPLIED: Final = "SpecNotApplied"


# --- Trainer exit codes ------------------------------------------------------------------
class ExitCode:
    SUCCESS: Final = 0
    # Bad spec, bad data, access denied: retrying cannot help. The Job's podFailurePolicy fails
    # the whole job at once on this code.
    PERMANENT: Final = 42
    # SIGTERM received (preemption, eviction, drain) and a checkpoint was saved before exiting.
    PREEMPTED: Final = 43
    # Anything else (1, signals, OOM-kill 137...) is retryable.


# --- Images -------------------------------------------------------------------------------
# The release: the Python package's version and the chart's appVersion (tests/chart checks all three).
APP_VERSION: Final = "0.1.0"
# The trainer image for jobs without spec.image, where the chart's values do not name another
# (the chart's trainer.image: this repository, tag = appVersion).
TRAINER_IMAGE_REPOSITORY: Final = "ghcr.io/finetune-dev/finetune-trainer"
DEFAULT_TRAINER_IMAGE: Final = f"{TRAINER_IMAGE_REPOSITORY}:{APP_VERSION}"


# --- Termination message ----------------------------------------------------------------
TERMINATION_LOG_PATH: Final = "/dev/termination-log"
TERMINATION_MESSAGE_MAX_BYTES: Final = 4096

# --- Files the operator mounts into trainer pods ----------------------------------------
SPEC_MOUNT_DIR: Final = "/etc/finetune"
SPEC_FILE_NAME: Final = "spec.json"
SCRATCH_DIR: Final = "/scratch"
# Where the storage credentials Secret is mounted as files (one per key) when the operator runs with
# --credentials-as-files instead of passing them as environment variables.
CREDENTIALS_MOUNT_DIR: Final = "/var/run/secrets/finetune.dev/storage"
# The uid (and gid) the images run as and the operator's pods ask for: the Dockerfile's `USER`
# (tests/chart/test_dockerfile.py checks that they agree).
TRAINER_USER_ID: Final = 10001


# --- Environment the operator sets and the trainer reads --------------------------------
class Env:
    SPEC_PATH: Final = "FINETUNE_SPEC_PATH"
    JOB_NAME: Final = "FINETUNE_JOB_NAME"
    NAMESPACE: Final = "FINETUNE_NAMESPACE"
    OUTPUT_URI: Final = "FINETUNE_OUTPUT_URI"
    CHECKPOINT_URI: Final = "FINETUNE_CHECKPOINT_URI"
    METRICS_PORT: Final = "FINETUNE_METRICS_PORT"
    # Where the trainer writes its termination message (default TERMINATION_LOG_PATH).
    TERMINATION_LOG: Final = "FINETUNE_TERMINATION_LOG"
    # Rendezvous (turned into a torchrun launch by the trainer's launcher).
    NUM_NODES: Final = "FINETUNE_NUM_NODES"
    NODE_RANK: Final = "FINETUNE_NODE_RANK"
    NPROC_PER_NODE: Final = "FINETUNE_NPROC_PER_NODE"
    MASTER_ADDR: Final = "FINETUNE_MASTER_ADDR"
    MASTER_PORT: Final = "FINETUNE_MASTER_PORT"
    RDZV_TIMEOUT: Final = "FINETUNE_RDZV_TIMEOUT_SECONDS"
    # Directory holding the storage credentials as files named after StorageEnv keys (set only with
    # --credentials-as-files); the trainer reads them from there instead of the environment.
    CREDENTIALS_DIR: Final = "FINETUNE_CREDENTIALS_DIR"
    # Set by the Job controller for Indexed Jobs; the node rank is taken from it.
    JOB_COMPLETION_INDEX: Final = "JOB_COMPLETION_INDEX"
    # The shared model and dataset cache (off when CACHE_DIR is unset): its root, size budget in
    # bytes, and how hits are verified (sha256 | size).
    CACHE_DIR: Final = "FINETUNE_CACHE_DIR"
    CACHE_MAX_BYTES: Final = "FINETUNE_CACHE_MAX_BYTES"
    CACHE_VERIFY: Final = "FINETUNE_CACHE_VERIFY"


# --- Ports ---------------------------------------------------------------------------------
TRAINER_METRICS_PORT: Final = 9400
RENDEZVOUS_PORT: Final = 29500
OPERATOR_METRICS_PORT: Final = 8080
OPERATOR_HEALTH_PORT: Final = 8081

# --- Metric name prefixes ----------------------------------------------------------------
OPERATOR_METRIC_PREFIX: Final = "finetune_operator_"
TRAINER_METRIC_PREFIX: Final = "finetune_trainer_"


class TrainerMetric:
    """Trainer metrics the operator reads for status.progress and status.metrics."""

    STEP: Final = f"{TRAINER_METRIC_PREFIX}step"
    TOTAL_STEPS: Final = f"{TRAINER_METRIC_PREFIX}total_steps"
    EPOCH: Final = f"{TRAINER_METRIC_PREFIX}epoch"
    LOSS: Final = f"{TRAINER_METRIC_PREFIX}loss"
    LEARNING_RATE: Final = f"{TRAINER_METRIC_PREFIX}learning_rate"
    TOKENS_PER_SECOND: Final = f"{TRAINER_METRIC_PREFIX}tokens_per_second"
    EVAL_LOSS: Final = f"{TRAINER_METRIC_PREFIX}eval_loss"


# --- Labels and annotations on children ---------------------------------------------------
LABEL_JOB_NAME: Final = f"{GROUP}/job-name"
LABEL_COMPONENT: Final = "app.kubernetes.io/component"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
MANAGED_BY: Final = "finetune-operator"
KUEUE_QUEUE_LABEL: Final = "kueue.x-k8s.io/queue-name"
# Kueue's WorkloadPriorityClass of a Job: copied from the FineTuneJob's label of the same name.
KUEUE_PRIORITY_CLASS_LABEL: Final = "kueue.x-k8s.io/priority-class"
# Kueue's Workload (the admission unit Kueue makes for each queued Job): the operator reads why a
# job waits from its status conditions.
KUEUE_GROUP: Final = "kueue.x-k8s.io"
KUEUE_VERSION: Final = "v1beta2"
KUEUE_WORKLOADS: Final = "workloads"
GPU_RESOURCE: Final = "nvidia.com/gpu"
# Node labels of NVIDIA's GPU feature discovery: the GPU model, and its memory in MiB. The operator
# picks the GPU memory the preflight checks the plan against from a job's nodeSelector on them.
GPU_PRODUCT_LABEL: Final = "nvidia.com/gpu.product"
GPU_MEMORY_LABEL: Final = "nvidia.com/gpu.memory"

# --- Storage layout under the output URI -------------------------------------------------
MANIFEST_FILE: Final = "manifest.json"
METRICS_FILE: Final = "metrics.json"
CHECKPOINTS_DIR: Final = "checkpoints"
CHECKPOINT_PREFIX: Final = "step-"
MERGED_DIR: Final = "merged"

# Where the operator mounts pvc://claim/path sources and outputs: pvc://claim/p -> PVC_MOUNT_ROOT/claim/p.
PVC_MOUNT_ROOT: Final = "/mnt/pvc"
# Where the operator mounts the shared model cache in trainer pods (chart value modelCache).
CACHE_MOUNT_DIR: Final = "/var/cache/finetune"
# Values of status.modelCache / the termination message's modelCache.
MODEL_CACHE_OUTCOMES: Final = ("hit", "miss", "refetched")


class StorageEnv:
    """Keys of output.credentialsSecret, passed to trainer pods as environment of the same names."""

    ACCESS_KEY_ID: Final = "AWS_ACCESS_KEY_ID"
    SECRET_ACCESS_KEY: Final = "AWS_SECRET_ACCESS_KEY"
    SESSION_TOKEN: Final = "AWS_SESSION_TOKEN"
    ENDPOINT_URL: Final = "AWS_ENDPOINT_URL"
    REGION: Final = "AWS_REGION"

    ALL: Final = (ACCESS_KEY_ID, SECRET_ACCESS_KEY, SESSION_TOKEN, ENDPOINT_URL, REGION)
    # The keys the Secret must hold (a pod whose Secret lacks one does not start); the others are
    # optional (a session token only for temporary credentials).
    REQUIRED: Final = (ACCESS_KEY_ID, SECRET_ACCESS_KEY)
    # The values that must never be shown. The access key ID is an identifier, not a secret (and
    # often a short word that also occurs in bucket names, so masking it would mangle URIs).
    SECRETS: Final = (SECRET_ACCESS_KEY, SESSION_TOKEN)
