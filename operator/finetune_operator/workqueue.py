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
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[str] = deque()
        # Keys waiting for a reconcile -> whether it must be a full one (children ensured).
        self._dirty: dict[str, bool] = {}
        self._processing: set[str] = set()
        self._closed = False

    def add(self, key: str, full: bool = False) -> None:
        with self._cond:
            if self._closed:
                return
            if key in self._dirty:
                self._dirty[key] = self._dirty[key] or full
                return
            self._dirty[key] = full
            if key not in self._processing:  # else done() queues it when the running reconcile ends
                self._queue.append(key)
                self._cond.notify()

    def get(self, timeout: float | None = None) -> tuple[str, bool] | None:
        """The next key and its full flag; None when closed (or nothing came within `timeout`)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._queue or self._closed, timeout):
                return None
            if self._closed:
                return None
            key = self._queue.popleft()
            full = self._dirty.pop(key)
            self._processing.add(key)
            return key, full

    def done(self, key: str) -> None:
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty and not self._closed:
                self._queue.append(key)
                self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._queue)
