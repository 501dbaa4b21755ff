"""Scrape the trainer's and the operator's real /metrics endpoints over HTTP on loopback."""

from __future__ import annotations

import httpx


def scrape(port: int) -> str:
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    response.raise_for_status()
    return response.text


def trainer_metrics_text() -> str:
    """The trainer's metrics server (finetune_trainer.metrics), after one step of state was copied in."""
    from finetune_trainer.metrics import TrainerMetrics

    metrics = TrainerMetrics()
    port = metrics.serve(port=0, addr="127.0.0.1")
    try:
        return scrape(port)
    finally:
        metrics.close()


def operator_metrics_text() -> str:
    """The operator's metrics server (finetune_operator.metrics), as `finetune operator` starts it."""
    from finetune_operator.metrics import OperatorMetrics

    metrics = OperatorMetrics()
    server = metrics.serve(0, "127.0.0.1")
    try:
        return scrape(int(server.server_port))
    finally:
        server.shutdown()
        server.server_close()
