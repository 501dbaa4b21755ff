"""`finetune operator`: run the FineTuneJob operator (Kopf) with its metrics and health endpoints."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import kopf

from . import handlers  # noqa: F401  (registers the handlers with kopf)
from .controller import Controller
from .k8s import Kube, load_config
from .leader import LeaderElector
from .metrics import Health, OperatorMetrics
from .settings import Settings, install, parse_settings


class StartError(RuntimeError):
    """The operator cannot start (e.g. a port in use): one line for the user, no traceback."""


def _listen(what: str, flag: str, port: int, addr: str, serve: Callable[[int, str], Any]) -> None:
    try:
        serve(port, addr)
    except OSError as exc:
        raise StartError(f"cannot serve {what} on {addr}:{port} ({flag}): {exc.strerror or exc}") from None


def run(settings: Settings) -> None:
    install(settings)
    metrics = OperatorMetrics()
    # Ports first: a port in use is the most common start-up failure, and it needs no API server.
    if settings.metrics_port:
        _listen("metrics", "--metrics-port", settings.metrics_port, settings.bind_address, metrics.serve)
    # Alive while the resync loop ticks; a few missed ticks mean it is stuck.
    health = Health(max_silence=max(60.0, settings.resync_interval * 6))
    if settings.health_port:
        _listen("health checks", "--health-port", settings.health_port, settings.bind_address, health.serve)
    load_config()
    if settings.leader_elect:
        elector = LeaderElector(settings.leader_election_namespace, settings.leader_election_name,
                                settings.lease_duration)
        elector.acquire()
        elector.keep_renewing()
    controller = Controller(Kube(), settings, metrics)
    memo = kopf.Memo(controller=controller, settings=settings, health=health, metrics=metrics)
    kopf.run(
        clusterwide=settings.all_namespaces,
        namespaces=list(settings.namespaces),
        standalone=True,  # no Kopf peering: leader election (above) keeps other replicas idle
        memo=memo,
    )


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run(settings)
    except StartError as exc:
        print(f"finetune operator: {exc}", file=sys.stderr)
        return 1
    return 0
