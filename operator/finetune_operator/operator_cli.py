"""`finetune operator`: run the FineTuneJob operator (Kopf) with its metrics and health endpoints."""

from __future__ import annotations

import logging
import sys

import kopf

from . import handlers  # noqa: F401  (registers the handlers with kopf)
from .controller import Controller
from .k8s import Kube, load_config
from .leader import LeaderElector
from .metrics import Health, OperatorMetrics
from .settings import Settings, install, parse_settings


def run(settings: Settings) -> None:
    install(settings)
    load_config()
    metrics = OperatorMetrics()
    if settings.metrics_port:
        metrics.serve(settings.metrics_port, settings.bind_address)
    # Alive while the resync loop ticks; a few missed ticks mean it is stuck.
    health = Health(max_silence=max(60.0, settings.resync_interval * 6))
    if settings.health_port:
        health.serve(settings.health_port, settings.bind_address)
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
    run(settings)
    return 0
