"""A progress bar on the terminal: step, loss, tokens/s and ETA (tqdm computes the ETA)."""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm.auto import tqdm
from transformers import TrainerCallback


class ProgressCallback(TrainerCallback):  # type: ignore[misc]
    """Replaces the Trainer's bar (disable_tqdm=True) with one that shows what a user watches."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.bar: Any = None
        self.loss: float | None = None
        self._t0 = 0.0
        self._tokens0 = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                        file=self.stream, dynamic_ncols=True)
        self._t0 = time.monotonic()
        self._tokens0 = int(state.num_input_tokens_seen or 0)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.loss = float(logs["loss"])

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is None:
            return
        self.bar.update(state.global_step - self.bar.n)
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        tps = (int(state.num_input_tokens_seen or 0) - self._tokens0) / elapsed
        post = {"tok/s": f"{tps:.0f}"}
        if self.loss is not None:
            post = {"loss": f"{self.loss:.4f}", **post}
        self.bar.set_postfix(post, refresh=False)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
