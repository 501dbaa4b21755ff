"""`finetune operator` flags and FINETUNE_OPERATOR_* environment."""

from __future__ import annotations

import kopf
import pytest
from finetune_api.constants import OPERATOR_HEALTH_PORT, OPERATOR_METRICS_PORT
from finetune_operator import handlers
from finetune_operator.controller import Controller
from finetune_operator.metrics import Health, OperatorMetrics
from finetune_operator.settings import parse_settings


def test_defaults_watch_every_namespace_on_the_contract_ports() -> None:
    s = parse_settings([], env={})
    assert s.all_namespaces and s.namespaces == ()
    assert (s.metrics_port, s.health_port) == (OPERATOR_METRICS_PORT, OPERATOR_HEALTH_PORT)
    assert not s.leader_elect


def test_flags() -> None:
    s = parse_settings(["-n", "a", "--namespace", "b", "--trainer-image", "img:1", "--stall-timeout", "90",
                        "--leader-elect", "--propagate-prefix", "x.io/"], env={})
    assert s.namespaces == ("a", "b") and not s.all_namespaces
    assert s.trainer_image == "img:1" and s.stall_timeout == 90
    assert s.leader_elect and s.leader_election_namespace == "a"
    assert s.propagate_prefixes == ("x.io/",)


def test_environment_gives_defaults_and_flags_win() -> None:
    env = {"FINETUNE_OPERATOR_NAMESPACE": "x,y", "FINETUNE_OPERATOR_TRAINER_IMAGE": "env:2",
           "FINETUNE_OPERATOR_METRICS_PORT": "9999", "POD_NAMESPACE": "ops", "FINETUNE_OPERATOR_LEADER_ELECT": "true"}
    s = parse_settings([], env=env)
    assert s.namespaces == ("x", "y") and s.trainer_image == "env:2" and s.metrics_port == 9999
    assert s.leader_elect and s.leader_election_namespace == "ops"
    assert parse_settings(["--trainer-image", "flag:3", "--standalone"], env=env).trainer_image == "flag:3"
    assert not parse_settings(["--standalone"], env=env).leader_elect


def test_namespace_and_all_namespaces_exclude_each_other() -> None:
    with pytest.raises(SystemExit):
        parse_settings(["-n", "a", "-A"], env={})


@pytest.mark.parametrize(("argv", "scanning_off"), [(["-n", "team-a"], True), (["-A"], False), ([], False)])
def test_kopf_cluster_wide_scanning_is_off_only_for_exact_namespaces(argv: list[str], scanning_off: bool) -> None:
    # A namespaced Role cannot list namespaces or CRDs; Kopf would retry that for about a minute
    # before handling jobs (tests/chart/test_chart_cluster.py runs the operator with such a Role).
    kopf_settings = kopf.OperatorSettings()
    settings = parse_settings(argv, env={})
    controller = Controller(None, settings, OperatorMetrics())  # type: ignore[arg-type]  # no API calls here
    memo = kopf.Memo(settings=settings, health=Health(max_silence=60), controller=controller)
    try:
        handlers.configure(settings=kopf_settings, memo=memo)
    finally:
        handlers.cleanup(memo=memo)  # stops the resync loop and the workers configure starts
    assert kopf_settings.scanning.disabled is scanning_off
    assert memo["health"].ready.is_set()
