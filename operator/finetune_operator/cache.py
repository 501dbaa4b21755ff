"""What the watches have shown: FineTuneJobs and their children and pods, trimmed, in memory.

Kopf watches these kinds anyway; its event handlers feed this cache, and the controller reads
from it instead of asking the API server. At 1,000 live jobs that turns ~6 reads per job per
resync pass (6,000 every 10 s) into none (bench/FINDINGS.md, section 4).

Bodies are trimmed to the fields the builders and the status code read: a pod's spec, the Job's
pod template and Kopf's own bookkeeping annotation (a copy of the whole spec) are dropped, which
keeps the cache at a few KB per job. Stored bodies are shared, not copied: callers must not
mutate them.
"""

from __future__ import annotations

import threading
from typing import Any

from finetune_api import constants as c

from .builders import COMPONENT_PREFLIGHT

# Kopf's bookkeeping annotations (under our group, see handlers.configure) are large and unused here.
_KOPF_ANNOTATIONS = (f"{c.GROUP}/last-handled-configuration", "kopf.zalando.org/")
_META_KEYS = ("name", "namespace", "uid", "generation", "resourceVersion", "labels", "annotations",
              "ownerReferences", "creationTimestamp", "deletionTimestamp")
_POD_STATUS_KEYS = ("phase", "podIP", "conditions", "containerStatuses", "startTime", "reason", "message")
_JOB_SPEC_KEYS = ("suspend", "completions", "parallelism", "backoffLimit", "activeDeadlineSeconds",
                  "ttlSecondsAfterFinished")

DELETED = "DELETED"


def key_of(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


def _meta(body: dict[str, Any]) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    out = {k: meta[k] for k in _META_KEYS if k in meta}
    if "annotations" in out:
        out["annotations"] = {k: v for k, v in (out["annotations"] or {}).items()
                              if not k.startswith(_KOPF_ANNOTATIONS)}
    return out


def trim_ftj(body: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"metadata": _meta(body), "spec": body.get("spec")}
    if body.get("status"):
        out["status"] = body["status"]
    return out


def trim_job(body: dict[str, Any]) -> dict[str, Any]:
    spec = body.get("spec") or {}
    return {"metadata": _meta(body), "spec": {k: spec[k] for k in _JOB_SPEC_KEYS if k in spec},
            "status": body.get("status") or {}}


def trim_config_map(body: dict[str, Any]) -> dict[str, Any]:
    # Metadata only: the spec it carries is the operator's own (its digest is an annotation).
    return {"metadata": _meta(body)}


def trim_service(body: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": _meta(body), "spec": {"selector": (body.get("spec") or {}).get("selector") or {}}}


#: The children of a FineTuneJob, by kind, and how each is trimmed. A FineTuneJob has two Jobs:
#: the preflight's (PREFLIGHT_JOB, told apart by its component label) and the trainer's.
PREFLIGHT_JOB = "PreflightJob"
CHILD_TRIMS = {"ConfigMap": trim_config_map, "Service": trim_service, "Job": trim_job, PREFLIGHT_JOB: trim_job}


def slot_of(kind: str, body: dict[str, Any]) -> str:
    """Where the cache keeps a child: its kind, or PREFLIGHT_JOB for the preflight's Job."""
    labels = (body.get("metadata") or {}).get("labels") or {}
    if kind == "Job" and labels.get(c.LABEL_COMPONENT) == COMPONENT_PREFLIGHT:
        return PREFLIGHT_JOB
    return kind


def trim_pod(body: dict[str, Any]) -> dict[str, Any]:
    status = body.get("status") or {}
    return {"metadata": _meta(body), "status": {k: status[k] for k in _POD_STATUS_KEYS if k in status}}


def _newer(new: dict[str, Any], old: dict[str, Any] | None) -> bool:
    """False when `new` is an older version than what we hold (e.g. an event that trails our patch).

    resourceVersions are opaque to clients in general; the API server backed by etcd serves
    integers, and where they are not we take the newest arrival.
    """
    if old is None:
        return True
    try:
        return int(new["metadata"]["resourceVersion"]) >= int(old["metadata"]["resourceVersion"])
    except (KeyError, TypeError, ValueError):
        return True


def owner_key(body: dict[str, Any]) -> str | None:
    """The FineTuneJob a Job or pod belongs to, from the label the builders put on every child."""
    meta = body.get("metadata") or {}
    name = (meta.get("labels") or {}).get(c.LABEL_JOB_NAME)
    if not name or not meta.get("namespace"):
        return None
    return key_of(meta["namespace"], name)


class WatchCache:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ftjs: dict[str, dict[str, Any]] = {}
        # kind -> FineTuneJob key -> the child of that kind.
        self._children: dict[str, dict[str, dict[str, Any]]] = {kind: {} for kind in CHILD_TRIMS}
        self._pods: dict[str, dict[str, dict[str, Any]]] = {}
        # FineTuneJob key -> Kueue's Workload for its Job (only jobs with spec.queueName have one).
        self._workloads: dict[str, dict[str, Any]] = {}

    # --- FineTuneJobs ----------------------------------------------------------------------------

    def put_ftj(self, body: dict[str, Any], event: str | None = None) -> str:
        meta = body["metadata"]
        key = key_of(meta["namespace"], meta["name"])
        with self._lock:
            if event == DELETED:
                self._ftjs.pop(key, None)
            elif _newer(body, self._ftjs.get(key)):
                self._ftjs[key] = trim_ftj(body)
        return key

    def drop_ftj(self, key: str) -> None:
        with self._lock:
            self._ftjs.pop(key, None)

    def ftj(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            return self._ftjs.get(key)

    def ftj_keys(self) -> list[str]:
        with self._lock:
            return list(self._ftjs)

    # --- children ----------------------------------------------------------------------------------

    def put_child(self, kind: str, body: dict[str, Any], event: str | None = None) -> str | None:
        """Record a ConfigMap, Service or Job (the trainer's or the preflight's); returns the key of
        the FineTuneJob it belongs to."""
        key = owner_key(body)
        if key is None:
            return None
        slot = slot_of(kind, body)
        with self._lock:
            held_by_key = self._children[slot]
            held = held_by_key.get(key)
            if event == DELETED:
                # Only forget the child we hold: a deleted old one must not hide its successor.
                if held is not None and held["metadata"].get("uid") == body["metadata"].get("uid"):
                    del held_by_key[key]
            elif held is None or held["metadata"].get("uid") != body["metadata"].get("uid") or _newer(body, held):
                held_by_key[key] = {"kind": kind, **CHILD_TRIMS[slot](body)}
        return key

    def child(self, kind: str, key: str) -> dict[str, Any] | None:
        with self._lock:
            return self._children[kind].get(key)

    def put_job(self, body: dict[str, Any], event: str | None = None) -> str | None:
        return self.put_child("Job", body, event)

    def job(self, key: str) -> dict[str, Any] | None:
        return self.child("Job", key)

    def preflight_job(self, key: str) -> dict[str, Any] | None:
        return self.child(PREFLIGHT_JOB, key)

    def put_pod(self, body: dict[str, Any], event: str | None = None) -> str | None:
        key = owner_key(body)
        if key is None:
            return None
        name = body["metadata"]["name"]
        with self._lock:
            pods = self._pods.setdefault(key, {})
            if event == DELETED:
                pods.pop(name, None)
                if not pods:
                    del self._pods[key]
            elif _newer(body, pods.get(name)):
                pods[name] = trim_pod(body)
        return key

    def pods(self, key: str) -> list[dict[str, Any]]:
        """The pods labelled with this FineTuneJob's name: which of them its Job owns is for the
        caller to check (any pod can carry a label)."""
        with self._lock:
            return list((self._pods.get(key) or {}).values())

    def put_workload(self, key: str, body: dict[str, Any], event: str | None = None) -> None:
        """Record the (trimmed) Workload Kueue made for this FineTuneJob's Job."""
        with self._lock:
            held = self._workloads.get(key)
            same = held is not None and held["metadata"].get("uid") == body["metadata"].get("uid")
            if event == DELETED:
                if same:
                    del self._workloads[key]
            elif not same or _newer(body, held):
                self._workloads[key] = body

    def workload(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            return self._workloads.get(key)

    def sizes(self) -> dict[str, int]:
        with self._lock:
            return {"finetunejobs": len(self._ftjs), "jobs": len(self._children["Job"]),
                    "configmaps": len(self._children["ConfigMap"]), "services": len(self._children["Service"]),
                    "pods": sum(len(p) for p in self._pods.values())}
