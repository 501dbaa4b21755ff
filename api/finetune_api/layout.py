"""Where things live: checkpoints under the output URI, and which URIs are files in the pod.

The operator (FINETUNE_CHECKPOINT_URI of the pods, status), the trainer (publishing, resuming,
pruning) and the tests ask these functions instead of joining paths themselves.
"""

from __future__ import annotations

from .constants import CHECKPOINT_PREFIX, CHECKPOINTS_DIR, PVC_MOUNT_ROOT

#: Schemes of URIs read and written through the filesystem of the trainer's pod.
LOCAL_SCHEMES = ("file://", "pvc://")


def checkpoints_uri(output_uri: str) -> str:
    """The default prefix of a job's checkpoints: <output>/checkpoints."""
    return f"{output_uri.rstrip('/')}/{CHECKPOINTS_DIR}"


def step_uri(checkpoints: str, step: int) -> str:
    """The prefix of one checkpoint: <checkpoints>/step-N."""
    return f"{checkpoints.rstrip('/')}/{CHECKPOINT_PREFIX}{step}"


def pvc_mount_path(claim: str) -> str:
    """Where the operator mounts PersistentVolumeClaim `claim` in the trainer's pod."""
    return f"{PVC_MOUNT_ROOT}/{claim}"


def local_path(uri: str) -> str | None:
    """The path in the trainer's pod of a local URI, None for any other (s3://, a Hugging Face id).

    Local: file:///abs, /abs, ./rel, ../rel, and pvc://claim/path, which the operator mounts at
    PVC_MOUNT_ROOT/claim: it is read and written in place, never downloaded.
    """
    if uri.startswith("pvc://"):
        claim, _, path = uri.removeprefix("pvc://").partition("/")
        return f"{pvc_mount_path(claim)}/{path}" if path else pvc_mount_path(claim)
    if uri.startswith("file://"):
        return uri.removeprefix("file://")
    if uri.startswith(("/", "./", "../")) or uri in (".", ".."):
        return uri
    return None


def is_local(uri: str) -> bool:
    """Whether `uri` is a path in the trainer's pod (see local_path)."""
    return local_path(uri) is not None
