"""The trainer's Prometheus endpoint: progress and throughput while a run trains.

Served on $FINETUNE_METRICS_PORT (default TRAINER_METRICS_PORT) from a private registry; the
operator scrapes it for status.progress, the chart's dashboard plots it. Every name starts with
TRAINER_METRIC_PREFIX and follows Prometheus conventions (base units, `_total` for counters).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from finetune_api.constants import TRAINER_METRIC_PREFIX, TRAINER_METRICS_PORT, Env, TrainerMetric
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from transformers import TrainerCallback

P = TRAINER_METRIC_PREFIX

#: Every metric name the trainer exports (the chart's dashboards may use only these). The ones the
#: operator reads come from the shared contract, so the two sides cannot drift apart.
NAMES = {
    "step": TrainerMetric.STEP,
    "total_steps": TrainerMetric.TOTAL_STEPS,
    "epoch": TrainerMetric.EPOCH,
    "loss": TrainerMetric.LOSS,
    "learning_rate": TrainerMetric.LEARNING_RATE,
    "tokens": f"{P}tokens_processed_total",
    "tokens_per_second": TrainerMetric.TOKENS_PER_SECOND,
    "eval_loss": TrainerMetric.EVAL_LOSS,
    "gpu_memory": f"{P}gpu_memory_allocated_bytes",
    "info": f"{P}info",
    # The shared model cache (cache.py): entries' size, and this run's lookups.
    "cache_size": f"{P}cache_size_bytes",
    "cache_hits": f"{P}cache_hits_total",
    "cache_misses": f"{P}cache_misses_total",
    "cache_discarded": f"{P}cache_discarded_total",
    "cache_evicted": f"{P}cache_evicted_total",
}


class TrainerMetrics:
    """The gauges and counters of one run, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.step = Gauge(NAMES["step"], "Optimizer steps completed.", registry=r)
        self.total_steps = Gauge(NAMES["total_steps"], "Optimizer steps the run will take.", registry=r)
        self.epoch = Gauge(NAMES["epoch"], "Epochs completed (fractional).", registry=r)
        self.loss = Gauge(NAMES["loss"], "Training loss of the last logged step.", registry=r)
        self.learning_rate = Gauge(NAMES["learning_rate"], "Learning rate of the last step.", registry=r)
        # Counter adds `_total` itself; pass the name without it.
        self.tokens = Counter(
            NAMES["tokens"].removesuffix("_total"), "Input tokens (without padding) trained on.", registry=r
        )
        self.tokens_per_second = Gauge(NAMES["tokens_per_second"], "Training throughput in input tokens per second.", registry=r)
        self.eval_loss = Gauge(NAMES["eval_loss"], "Loss on the held-out split at the last evaluation.", registry=r)
        self.gpu_memory = Gauge(NAMES["gpu_memory"], "GPU memory allocated by this process.", registry=r)
        from .cache import Collector

        r.register(Collector(NAMES))
        self._server: Any = None

    def serve(self, port: int | None = None, addr: str = "0.0.0.0") -> int:
        """Start the HTTP endpoint; returns the port (0 picks a free one)."""
        if port is None:
            port = int(os.environ.get(Env.METRICS_PORT, TRAINER_METRICS_PORT))
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        self._server = server
        return int(server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@dataclass
class _Window:
    time: float
    tokens: float


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # metrics must never break training
        return False


class MetricsCallback(TrainerCallback):  # type: ignore[misc]
    """Copies the Trainer's state into the metrics after each step, log and evaluation."""

    def __init__(self, metrics: TrainerMetrics) -> None:
        self.m = metrics
        self._start: _Window | None = None
        self._seen = 0.0
        self._cuda = False

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.m.total_steps.set(state.max_steps)
        self.m.step.set(state.global_step)
        self._seen = float(state.num_input_tokens_seen or 0)
        self._start = _Window(time.monotonic(), self._seen)
        # Asked once: on a CUDA build without a GPU, is_available() probes NVML with a dlopen on
        # every call (bench profile: ~1% of a tiny model's training loop when asked per step).
        self._cuda = _cuda_available()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.m.step.set(state.global_step)
        self.m.epoch.set(state.epoch or 0.0)
        seen = float(state.num_input_tokens_seen or 0)
        if seen > self._seen:
            self.m.tokens.inc(seen - self._seen)
            self._seen = seen
        if self._start is not None:
            elapsed = time.monotonic() - self._start.time
            if elapsed > 0:
                self.m.tokens_per_second.set((seen - self._start.tokens) / elapsed)
        if self._cuda:
            try:
                import torch

                self.m.gpu_memory.set(torch.cuda.memory_allocated())
            except Exception:  # metrics must never break training
                pass

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        if "loss" in logs:
            self.m.loss.set(logs["loss"])
        if "learning_rate" in logs:
            self.m.learning_rate.set(logs["learning_rate"])
        if "eval_loss" in logs:
            self.m.eval_loss.set(logs["eval_loss"])

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None, **kwargs: Any) -> None:
        if metrics and "eval_loss" in metrics:
            self.m.eval_loss.set(metrics["eval_loss"])
