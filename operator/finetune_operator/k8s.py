"""The one module that talks to the Kubernetes API (the official client, synchronous).

Reads return plain dicts in the wire form (camelCase), as the builders and status code expect.
Creation is create-or-get with deterministic names: a retry, or an operator that died between
two calls, finds what it created before instead of creating it twice.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import kubernetes
from finetune_api import constants as c
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)
MERGE_PATCH = "application/merge-patch+json"


class ChildConflict(RuntimeError):
    """A child with our deterministic name exists but belongs to someone else (e.g. a deleted job)."""


def load_config() -> None:
    """In-cluster service account, else the kubeconfig ($KUBECONFIG or ~/.kube/config)."""
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()


def api_error_text(exc: ApiException) -> str:
    """Status code, reason and the API server's message (for 403s it names the missing permission)."""
    message = ""
    try:
        message = str(json.loads(exc.body or "{}").get("message") or "")
    except (ValueError, TypeError, AttributeError):
        pass
    return f"{exc.status} {exc.reason}" + (f": {message}" if message else "")


def _raw(resp: Any) -> dict[str, Any]:
    return dict(json.loads(resp.data))


def _drain(resp: Any) -> None:
    """Read a response we do not need, so its connection goes back to the pool.

    Unread `_preload_content=False` responses keep their connection; the next call then opens
    a new TLS connection (22% of the operator's CPU at ~800 live jobs, see bench/FINDINGS.md).
    """
    resp.data  # noqa: B018 - reading .data releases the connection


@dataclass(frozen=True)
class _ChildCalls:
    create: Callable[..., Any]
    read: Callable[..., Any]
    patch: Callable[..., Any]


class Kube:
    def __init__(self, api_client: Any | None = None) -> None:
        self.client = api_client or kubernetes.client.ApiClient()
        self.core = kubernetes.client.CoreV1Api(self.client)
        self.batch = kubernetes.client.BatchV1Api(self.client)
        self.custom = kubernetes.client.CustomObjectsApi(self.client)
        self.instance = socket.gethostname()

    # --- FineTuneJobs --------------------------------------------------------------------

    def get_ftj(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return _raw(self.custom.get_namespaced_custom_object(
                c.GROUP, c.VERSION, namespace, c.PLURAL, name, _preload_content=False))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def patch_ftj_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        """Merge patch of the status subresource (only the operator writes status); the new object."""
        return _raw(self.custom.patch_namespaced_custom_object_status(
            c.GROUP, c.VERSION, namespace, c.PLURAL, name, {"status": status},
            _content_type=MERGE_PATCH, _preload_content=False))

    def annotate_ftj(self, namespace: str, name: str, annotations: dict[str, str]) -> dict[str, Any]:
        return _raw(self.custom.patch_namespaced_custom_object(
            c.GROUP, c.VERSION, namespace, c.PLURAL, name, {"metadata": {"annotations": annotations}},
            _content_type=MERGE_PATCH, _preload_content=False))

    # --- children --------------------------------------------------------------------------

    def _calls(self, kind: str) -> _ChildCalls:
        """The client's create, read and patch calls of a child kind."""
        if kind == "ConfigMap":
            return _ChildCalls(self.core.create_namespaced_config_map, self.core.read_namespaced_config_map,
                               self.core.patch_namespaced_config_map)
        if kind == "Service":
            return _ChildCalls(self.core.create_namespaced_service, self.core.read_namespaced_service,
                               self.core.patch_namespaced_service)
        if kind == "Job":
            return _ChildCalls(self.batch.create_namespaced_job, self.batch.read_namespaced_job,
                               self.batch.patch_namespaced_job)
        if kind == "NetworkPolicy":
            net = kubernetes.client.NetworkingV1Api(self.client)
            return _ChildCalls(net.create_namespaced_network_policy, net.read_namespaced_network_policy,
                               net.patch_namespaced_network_policy)
        raise ValueError(f"unsupported kind {kind}")

    def _create(self, obj: dict[str, Any]) -> Any:
        return self._calls(obj["kind"]).create(obj["metadata"]["namespace"], obj, _preload_content=False)

    def _read(self, kind: str, namespace: str, name: str) -> Any:
        return self._calls(kind).read(name, namespace, _preload_content=False)

    def get_child(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return _raw(self._read(kind, namespace, name))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def ensure(self, obj: dict[str, Any], read_first: bool = True) -> tuple[dict[str, Any], bool]:
        """Create the child, or adopt the one that is there already. Returns (object, created).

        `read_first` when the child probably exists (a job seen before): one read instead of a
        refused create and a read. A new job's children do not exist: create first.
        """
        meta = obj["metadata"]
        existing = None
        if read_first:
            try:
                existing = _raw(self._read(obj["kind"], meta["namespace"], meta["name"]))
            except ApiException as exc:
                if exc.status != 404:
                    raise
        if existing is None:
            try:
                return _raw(self._create(obj)), True
            except ApiException as exc2:
                if exc2.status != 409:  # there already (or created by a twin since we looked): adopt it
                    raise
            existing = _raw(self._read(obj["kind"], meta["namespace"], meta["name"]))
        want_uid = meta["ownerReferences"][0]["uid"]
        owners = {ref.get("uid") for ref in existing["metadata"].get("ownerReferences") or []}
        if want_uid not in owners:
            raise ChildConflict(
                f"{obj['kind']} {meta['namespace']}/{meta['name']} exists and is not owned by this FineTuneJob "
                f"(owners {sorted(o for o in owners if o)}); waiting for it to go away")
        return existing, False

    def patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        """Merge patch of a child (ConfigMap, Service or Job); the new object."""
        return _raw(self._calls(kind).patch(name, namespace, patch, _content_type=MERGE_PATCH, _preload_content=False))

    def list_pods(self, namespace: str, selector: dict[str, str]) -> list[dict[str, Any]]:
        label_selector = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        resp = self.core.list_namespaced_pod(namespace, label_selector=label_selector, _preload_content=False)
        return list(_raw(resp).get("items") or [])

    def restart_pod(self, namespace: str, name: str, reason: str) -> None:
        """Evict a pod (a disruption, not a failure), after noting why on it."""
        from .status_rules import RESTART_REASON_ANNOTATION

        _drain(self.core.patch_namespaced_pod(
            name, namespace, {"metadata": {"annotations": {RESTART_REASON_ANNOTATION: reason}}},
            _content_type=MERGE_PATCH, _preload_content=False))
        body = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name, "namespace": namespace}}
        try:
            _drain(self.core.create_namespaced_pod_eviction(name, namespace, body, _preload_content=False))
        except ApiException as exc:
            if exc.status != 404:
                raise

    # --- events ----------------------------------------------------------------------------

    def event(self, body: dict[str, Any], type_: str, reason: str, message: str) -> None:
        meta = body["metadata"]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": c.API_VERSION, "kind": c.KIND, "name": meta["name"],
                "namespace": meta["namespace"], "uid": meta["uid"],
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "source": {"component": c.MANAGED_BY},
            "reportingComponent": c.MANAGED_BY,
            "reportingInstance": self.instance,
        }
        try:
            _drain(self.core.create_namespaced_event(meta["namespace"], event, _preload_content=False))
        except ApiException as exc:  # events are best effort; status is the record
            log.warning("could not post event %s for %s/%s: %s", reason, meta["namespace"], meta["name"],
                        api_error_text(exc))
