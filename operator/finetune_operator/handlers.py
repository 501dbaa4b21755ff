"""Kopf handlers: thin and typed; every one delegates to the Controller.

The Controller lives in kopf's memo (set by operator_cli.run). All handlers are event handlers: each hands
the raw object to the Controller's watch cache, which is what reconciles read instead of the API,
and queues the FineTuneJob it belongs to for the Controller's reconcile workers.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import kopf
from finetune_api import constants as c

from .controller import Controller
from .metrics import Health
from .settings import Settings

log = logging.getLogger(__name__)


def _controller(memo: kopf.Memo) -> Controller:
    return memo["controller"]  # type: ignore[no-any-return]


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Only event handlers are registered (no create/update/resume ones): Kopf keeps no state of
    # its own on our objects, so it writes no annotations (one patch per job less) and never
    # re-runs a "creation" when a watch lags behind its own patch (bench: 820 of 1,000 jobs).
    # Our own Events tell the story; Kopf's would only add "Handler succeeded" noise, and so
    # would its per-event log lines.
    settings.posting.level = logging.WARNING
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    settings.networking.request_timeout = 30
    settings.watching.server_timeout = 60
    ours: Settings = memo["settings"]
    if not ours.all_namespaces:
        # Exact namespaces: a namespaced Role is all the operator has. Kopf's cluster-wide
        # observers would list/watch namespaces and CRDs, get 403 and retry it for about a
        # minute before handling anything; without them it serves the given namespaces at once.
        settings.scanning.disabled = True
    _controller(memo).start_workers()
    stop = threading.Event()
    memo["stop"] = stop
    thread = threading.Thread(target=_resync_loop, args=(memo, stop), name="resync", daemon=True)
    thread.start()
    health: Health = memo["health"]
    health.ready.set()


@kopf.on.cleanup()
def cleanup(memo: kopf.Memo, **_: Any) -> None:
    stop = memo.get("stop")
    if stop is not None:
        stop.set()
    _controller(memo).stop()


def _resync_loop(memo: kopf.Memo, stop: threading.Event) -> None:
    """Requeue every live job periodically: progress scraping and the stall watchdog need no event."""
    settings: Settings = memo["settings"]
    health: Health = memo["health"]
    while not stop.wait(settings.resync_interval):
        health.tick()
        try:
            # Half the interval: a pass that runs long still ends before the next one is due.
            _controller(memo).resync(spread_over=settings.resync_interval / 2)
        except Exception:
            log.exception("resync failed")


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    return kopf.login_via_client(**kwargs)


# Event handlers are async and only record the object and queue its job: Kopf runs them on its
# event loop (no thread hop), and the Controller's workers reconcile (see workqueue.py).


# A FineTuneJob's own events: the first sight of it (created, or listed at start-up) and every new
# generation (a spec change) ask for a full reconcile; status-only changes (ours) need nothing.
@kopf.on.event(c.GROUP, c.VERSION, c.PLURAL)
async def finetunejob_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    ctl = _controller(memo)
    ctl.enqueue(ctl.seen_ftj(event["type"], dict(event["object"])), full=True)


@kopf.on.event("batch", "v1", "jobs", labels={c.LABEL_MANAGED_BY: c.MANAGED_BY})
async def owned_job_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    ctl = _controller(memo)
    ctl.enqueue(ctl.seen_job(event["type"], dict(event["object"])))


# The ConfigMap and the Service: watched so that one deleted (or edited) by hand is put back at once.
@kopf.on.event("v1", "configmaps", labels={c.LABEL_MANAGED_BY: c.MANAGED_BY})
async def owned_config_map_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    ctl = _controller(memo)
    ctl.enqueue(ctl.seen_child("ConfigMap", event["type"], dict(event["object"])))


@kopf.on.event("v1", "services", labels={c.LABEL_MANAGED_BY: c.MANAGED_BY})
async def owned_service_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    ctl = _controller(memo)
    ctl.enqueue(ctl.seen_child("Service", event["type"], dict(event["object"])))


@kopf.on.event("v1", "pods", labels={c.LABEL_MANAGED_BY: c.MANAGED_BY})
async def owned_pod_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    ctl = _controller(memo)
    ctl.enqueue(ctl.seen_pod(event["type"], dict(event["object"])))


# Kueue's Workloads (jobs with spec.queueName): why a job waits, in Kueue's words. Kueue copies no
# label of ours onto them, so every Workload of the watched namespaces comes here and those not
# made for one of our Jobs are dropped. Without Kueue installed the resource does not exist and
# Kopf watches nothing.
@kopf.on.event(c.KUEUE_GROUP, c.KUEUE_VERSION, c.KUEUE_WORKLOADS)
async def kueue_workload_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    ctl = _controller(memo)
    ctl.enqueue(ctl.seen_workload(event["type"], dict(event["object"])))
