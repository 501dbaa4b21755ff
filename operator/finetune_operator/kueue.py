"""Kueue's Workloads, as far as the operator reads them: why a queued job waits.

For a Job with the queue label, Kueue makes a Workload (owned by the Job; one pod set whose count
is the Job's parallelism, i.e. spec.resources.nodes, each pod with the trainer's requests) and
records its verdict in the Workload's status conditions: QuotaReserved=False with the reason and
message of the last admission attempt (e.g. "couldn't assign flavors to pod set main:
insufficient unused quota for nvidia.com/gpu in flavor h200, 4 more needed"), Evicted=True when
it was preempted, Admitted=True once it may run (Kueue then unsuspends the Job). Pure functions
on plain dicts; the watch that feeds them is in handlers.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune_api import constants as c

from .cache import key_of

# Kueue's Workload condition types (kueue.x-k8s.io/v1beta2).
QUOTA_RESERVED = "QuotaReserved"
ADMITTED = "Admitted"
EVICTED = "Evicted"


@dataclass(frozen=True)
class Verdict:
    """What Kueue says about a job: admitted or not, with Kueue's reason and message."""

    admitted: bool
    reason: str
    message: str


def owner_job(workload: dict[str, Any]) -> dict[str, Any] | None:
    """The ownerReference of the batch/v1 Job a Workload was made for."""
    for ref in (workload.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("kind") == "Job" and str(ref.get("apiVersion", "")).startswith("batch/"):
            return dict(ref)
    return None


def owner_key(workload: dict[str, Any]) -> str | None:
    """The FineTuneJob a Workload belongs to: its Job has the FineTuneJob's name (builders.job_name)."""
    ref = owner_job(workload)
    namespace = (workload.get("metadata") or {}).get("namespace")
    return key_of(namespace, ref["name"]) if ref and namespace and ref.get("name") else None


def trim(workload: dict[str, Any]) -> dict[str, Any]:
    meta = workload.get("metadata") or {}
    status = workload.get("status") or {}
    return {
        "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion", "ownerReferences")
                     if k in meta},
        "status": {"conditions": status.get("conditions") or [],
                   "clusterQueue": (status.get("admission") or {}).get("clusterQueue")},
    }


def verdict(workload: dict[str, Any] | None, job_uid: str | None = None) -> Verdict | None:
    """Kueue's verdict on the Job with uid job_uid (None when the Workload is not that Job's, or
    Kueue has not looked at it yet)."""
    if workload is None:
        return None
    ref = owner_job(workload)
    if job_uid is not None and (ref is None or ref.get("uid") != job_uid):
        return None  # a Workload of an earlier Job of the same name
    conds = {x.get("type"): x for x in (workload.get("status") or {}).get("conditions") or []}

    def true(type_: str) -> dict[str, Any] | None:
        cond = conds.get(type_)
        return cond if cond is not None and cond.get("status") == "True" else None

    if true(ADMITTED):
        cq = (workload.get("status") or {}).get("clusterQueue")
        where = f" to ClusterQueue {cq}" if cq else ""
        return Verdict(True, c.Reason.ADMITTED, f"admitted by Kueue{where}")
    reserved = conds.get(QUOTA_RESERVED)
    if reserved is not None and reserved.get("status") == "False" and reserved.get("message"):
        return Verdict(False, str(reserved.get("reason") or "Pending"), str(reserved["message"]))
    evicted = true(EVICTED)
    if evicted is not None:
        return Verdict(False, str(evicted.get("reason") or EVICTED), str(evicted.get("message") or "evicted"))
    if reserved is not None and reserved.get("status") == "True":
        return Verdict(False, QUOTA_RESERVED, "quota reserved; waiting for Kueue's admission checks")
    return None
