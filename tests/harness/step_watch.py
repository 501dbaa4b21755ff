"""Follow a trainer's progress from outside: poll its Prometheus endpoint for the optimizer step."""

from __future__ import annotations

import re
import threading
import urllib.request

from finetune_api import constants as c


class StepWatch:
    """Polls a trainer's metrics endpoint every 50 ms: the highest optimizer step it reported
    (-1 until the first answer), so a test can tell how far a run got before it was stopped."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.max_step = -1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            try:
                with urllib.request.urlopen(self.url, timeout=1) as resp:
                    text = resp.read().decode()
            except OSError:
                continue
            m = re.search(rf"^{c.TrainerMetric.STEP} ([0-9.e+]+)$", text, re.MULTILINE)
            if m:
                self.max_step = max(self.max_step, int(float(m.group(1))))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.max_step
