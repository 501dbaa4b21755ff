"""Leader election on a coordination.k8s.io/v1 Lease: several replicas, one active.

The same protocol as client-go's leaderelection: the holder renews spec.renewTime every
lease_duration/3; a standby takes the Lease over once renewTime + leaseDurationSeconds has passed.
Updates carry the resourceVersion that was read, so two standbys cannot both win. A leader that
cannot renew in time exits the process: it must not keep acting next to a new leader.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)


def _now() -> datetime:
    return datetime.now(UTC)


def _fmt(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(value: Any) -> datetime | None:
    if not value:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


class LeaderElector:
    def __init__(self, namespace: str, name: str, lease_duration: float = 15.0,
                 api_client: Any | None = None, identity: str | None = None) -> None:
        self.namespace = namespace
        self.name = name
        self.lease_duration = lease_duration
        self.identity = identity or f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"
        self.api = kubernetes.client.CoordinationV1Api(api_client or kubernetes.client.ApiClient())
        self._stop = threading.Event()

    def _body(self, rv: str | None, transitions: int, acquire: datetime) -> dict[str, Any]:
        now = _now()
        meta: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if rv is not None:
            meta["resourceVersion"] = rv
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": meta,
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": max(1, round(self.lease_duration)),
                "acquireTime": _fmt(acquire),
                "renewTime": _fmt(now),
                "leaseTransitions": transitions,
            },
        }

    def try_acquire_or_renew(self) -> bool:
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            try:
                self.api.create_namespaced_lease(self.namespace, self._body(None, 0, _now()))
                return True
            except ApiException as exc2:
                if exc2.status == 409:
                    return False
                raise
        spec = lease.spec
        holder = spec.holder_identity
        renew = _parse(spec.renew_time)
        duration = spec.lease_duration_seconds or self.lease_duration
        mine = holder == self.identity
        expired = renew is None or renew + timedelta(seconds=duration) < _now()
        if holder and not mine and not expired:
            return False
        transitions = (spec.lease_transitions or 0) + (0 if mine else 1)
        acquire = _parse(spec.acquire_time) if mine and spec.acquire_time else _now()
        try:
            self.api.replace_namespaced_lease(
                self.name, self.namespace, self._body(lease.metadata.resource_version, transitions, acquire or _now()))
            return True
        except ApiException as exc:
            if exc.status == 409:  # someone else updated it first
                return False
            raise

    def acquire(self) -> None:
        """Block until this replica holds the Lease."""
        log.info("waiting to lead (Lease %s/%s, identity %s)", self.namespace, self.name, self.identity)
        while True:
            try:
                if self.try_acquire_or_renew():
                    log.info("became the leader")
                    return
            except ApiException as exc:
                log.warning("leader election: %s %s", exc.status, exc.reason)
            time.sleep(self.lease_duration / 5)

    def keep_renewing(self, on_lost: Callable[[], None] | None = None) -> threading.Thread:
        """Renew in the background; on_lost (default: exit the process) when renewals fail too long."""

        def lost() -> None:
            log.error("lost the Lease %s/%s; exiting so that a new leader can take over", self.namespace, self.name)
            os._exit(1)

        def loop() -> None:
            last_ok = time.monotonic()
            while not self._stop.wait(self.lease_duration / 3):
                try:
                    if self.try_acquire_or_renew():
                        last_ok = time.monotonic()
                        continue
                    (on_lost or lost)()
                    return
                except Exception as exc:
                    log.warning("leader election: renewal failed: %s", exc)
                if time.monotonic() - last_ok > self.lease_duration * 2 / 3:
                    (on_lost or lost)()
                    return

        thread = threading.Thread(target=loop, name="leader-election", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()
