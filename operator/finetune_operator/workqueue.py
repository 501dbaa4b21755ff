"""A queue of FineTuneJob keys to reconcile, with client-go's workqueue semantics.

Watch events only mark a key dirty; worker threads reconcile. A burst of events for one job (a
pod going Pending -> Running, its Job's status following) becomes one reconcile, a key is never
reconciled by two workers at once, and a key that changes while it is being reconciled is queued
again. Kopf's event handlers stay cheap, so its per-object event backlog, which held most of the
operator's memory in a 1,000-job burst (bench/FINDINGS.md), drains quickly.
"""

from __future__ import annotations

import threading
from collections import deque


class WorkQueue:
    """Keys to reconcile. Full requests (a new job, a spec change) go before status updates: in a
    burst of 1,000 creations, FIFO order left new jobs waiting behind the pod events of the jobs
    created before them (bench: create->Job p50 45 s)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._urgent: deque[str] = deque()
        self._queue: deque[str] = deque()
        # Keys waiting for a reconcile -> whether it must be a full one (children ensured).
        # A key may sit in both deques after an upgrade to full; get() skips the stale entry.
        self._dirty: dict[str, bool] = {}
        self._processing: set[str] = set()
        self._closed = False

    def _push(self, key: str, full: bool) -> None:
        (self._urgent if full else self._queue).append(key)
        self._cond.notify()

    def add(self, key: str, full: bool = False) -> None:
        with self._cond:
            if self._closed:
                return
            if key in self._dirty:
                if full and not self._dirty[key]:
                    self._dirty[key] = True
                    if key not in self._processing:
                        self._push(key, True)
                return
            self._dirty[key] = full
            if key not in self._processing:  # else done() queues it when the running reconcile ends
                self._push(key, full)

    def _ready(self) -> bool:
        return bool(self._urgent or self._queue)

    def get(self, timeout: float | None = None) -> tuple[str, bool] | None:
        """The next key and its full flag; None when closed (or nothing came within `timeout`)."""
        with self._cond:
            while True:
                if not self._cond.wait_for(lambda: self._ready() or self._closed, timeout):
                    return None
                if self._closed:
                    return None
                key = (self._urgent or self._queue).popleft()
                if key in self._dirty and key not in self._processing:
                    full = self._dirty.pop(key)
                    self._processing.add(key)
                    return key, full

    def done(self, key: str) -> None:
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty and not self._closed:
                self._push(key, self._dirty[key])

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        """Keys waiting (not counting those being reconciled)."""
        with self._cond:
            return sum(1 for k in self._dirty if k not in self._processing)
