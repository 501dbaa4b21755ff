"""What a FineTuneJob author may put into the trainer pods: the platform's policy, checked before
any child is created.

Creating a FineTuneJob makes the operator create a Job with the operator's permissions, so without
a policy a user with only `create` on FineTuneJobs could run any image (which also receives the
credentials of the Secret the job names), on any node (control-plane included) and at any priority.
The platform team lists what is allowed in the chart (`policy.*` values -> operator flags); anything
else is refused with an InvalidSpec condition and event, and no Job is created.

Pure: no I/O, so the rules are unit-tested without a cluster.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from finetune_api import constants as c
from finetune_api.spec import FineTuneJobSpec

#: Node labels and taints that mark control-plane nodes: trainer pods never go there, whatever the
#: platform lists (a typo in the policy must not open the control plane).
CONTROL_PLANE_KEYS = ("node-role.kubernetes.io/control-plane", "node-role.kubernetes.io/master")
#: PriorityClass names starting with this are reserved by Kubernetes for system components.
SYSTEM_PRIORITY_PREFIX = "system-"

#: Taints a job may tolerate unless the platform says otherwise: the GPU taint.
DEFAULT_TOLERATION_KEYS = (c.GPU_RESOURCE,)
#: Node labels a job may select on unless the platform says otherwise: GPU model and memory
#: (NVIDIA GPU feature discovery), instance type and topology.
DEFAULT_NODE_SELECTOR_KEYS = (
    c.GPU_PRODUCT_LABEL,
    c.GPU_MEMORY_LABEL,
    "node.kubernetes.io/instance-type",
    "topology.kubernetes.io/region",
    "topology.kubernetes.io/zone",
)


@dataclass(frozen=True)
class Policy:
    """The platform's rules. `trainer_image` (the operator's default) is always allowed."""

    trainer_image: str
    # Exact references (`reg/ml/trainer:1.2`, `...@sha256:...`), a repository without tag or digest
    # (`reg/ml/trainer`: any tag or digest of it), or a prefix ending in "/" (`reg/ml/`).
    allowed_images: tuple[str, ...] = ()
    allowed_priority_classes: tuple[str, ...] = ()
    allowed_toleration_keys: tuple[str, ...] = DEFAULT_TOLERATION_KEYS
    allowed_node_selector_keys: tuple[str, ...] = DEFAULT_NODE_SELECTOR_KEYS


def _has_tag_or_digest(ref: str) -> bool:
    last = ref.rsplit("/", 1)[-1]
    return ":" in last or "@" in last


def _repository(ref: str) -> str:
    """`reg:5000/ml/trainer:1@sha256:..` -> `reg:5000/ml/trainer` (a registry port is not a tag)."""
    ref = ref.split("@", 1)[0]
    head, _, last = ref.rpartition("/")
    last = last.split(":", 1)[0]
    return f"{head}/{last}" if head else last


def image_allowed(image: str, policy: Policy) -> bool:
    for entry in (policy.trainer_image, *policy.allowed_images):
        if entry.endswith("/"):
            if image.startswith(entry):
                return True
        elif _has_tag_or_digest(entry):
            if image == entry:
                return True
        elif _repository(image) == entry:
            return True
    return False


def _listed(values: Iterable[str]) -> str:
    return ", ".join(values) or "none"


def violations(spec: FineTuneJobSpec, policy: Policy) -> list[str]:
    """One line per thing the spec asks for that the policy does not allow (empty: allowed)."""
    out: list[str] = []
    if spec.image is not None and not image_allowed(spec.image, policy):
        out.append(
            f"spec.image: {spec.image!r} is not allowed by the operator's policy "
            f"(allowed: {_listed((policy.trainer_image, *policy.allowed_images))})"
        )
    res = spec.resources
    pc = res.priority_class_name
    if pc is not None:
        if pc.startswith(SYSTEM_PRIORITY_PREFIX):
            out.append(f"spec.resources.priorityClassName: {pc!r} is reserved for system components")
        elif pc not in policy.allowed_priority_classes:
            out.append(
                f"spec.resources.priorityClassName: {pc!r} is not allowed by the operator's policy "
                f"(allowed: {_listed(policy.allowed_priority_classes)})"
            )
    for i, tol in enumerate(res.tolerations or []):
        where = f"spec.resources.tolerations[{i}]"
        if not tol.key:
            out.append(f"{where}: a toleration without a key tolerates every taint; name the taint's key")
        elif tol.key in CONTROL_PLANE_KEYS:
            out.append(f"{where}: {tol.key!r}: trainer pods never run on control-plane nodes")
        elif tol.key not in policy.allowed_toleration_keys:
            out.append(
                f"{where}: taint key {tol.key!r} is not allowed by the operator's policy "
                f"(allowed: {_listed(policy.allowed_toleration_keys)})"
            )
    for key in sorted(res.node_selector or {}):
        where = f"spec.resources.nodeSelector[{key!r}]"
        if key in CONTROL_PLANE_KEYS:
            out.append(f"{where}: trainer pods never run on control-plane nodes")
        elif key not in policy.allowed_node_selector_keys:
            out.append(
                f"{where}: node label {key!r} is not allowed by the operator's policy "
                f"(allowed: {_listed(policy.allowed_node_selector_keys)})"
            )
    return out
