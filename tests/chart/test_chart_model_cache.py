"""The chart's modelCache switch: off by default; on, the operator gets the settings that make it
mount the cache into trainer pods, and an optional Job warms the cache with `finetune cache warm`."""

from __future__ import annotations

from typing import Any

import pytest
from finetune_api import constants as c
from finetune_cli.main import PLUGINS
from finetune_operator.builders import ModelCache
from finetune_operator.settings import parse_settings

from .helm import CHART, find, helm_binary, one, render, run_helm, set_args

pytestmark = pytest.mark.skipif(helm_binary() is None, reason="helm is not built (make tools)")


def operator_env(objs: list[dict[str, Any]]) -> dict[str, str]:
    container = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def test_off_by_default() -> None:
    objs = render()
    assert not any(k.startswith("FINETUNE_OPERATOR_MODEL_CACHE") for k in operator_env(objs))
    assert find(objs, "Job") == []
    assert parse_settings([], operator_env(objs)).pod_defaults.model_cache is None


def test_on_with_a_claim_the_operator_mounts_it_in_trainer_pods() -> None:
    objs = render({"modelCache": {"enabled": True, "claimName": "models", "size": "2Ti"}})
    settings = parse_settings([], operator_env(objs))  # what the operator reads from its environment
    assert settings.pod_defaults.model_cache == ModelCache(claim_name="models", max_bytes=2 * 2**40, scope="namespace")
    assert find(objs, "Job") == []  # nothing to warm


def test_on_with_a_node_path_shared_by_all_namespaces() -> None:
    objs = render({"modelCache": {"enabled": True, "hostPath": "/var/lib/finetune-cache", "scope": "cluster"}})
    cache = parse_settings([], operator_env(objs)).pod_defaults.model_cache
    assert cache == ModelCache(host_path="/var/lib/finetune-cache", max_bytes=500 * 2**30, scope="cluster")


def test_warm_job_fills_the_cache_where_trainer_pods_read_it() -> None:
    uris = ["s3://models/llama-8b", "s3://data/chat.jsonl"]
    objs = render({"modelCache": {"enabled": True, "claimName": "models",
                                  "warm": {"uris": uris, "namespace": "team-a", "credentialsSecret": "s3-read"}}})
    job = one(objs, "Job")
    assert job["metadata"]["namespace"] == "team-a"
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["finetune", "cache", "warm"] and "cache" in PLUGINS
    assert container["args"] == uris
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env[c.Env.CACHE_DIR] == c.CACHE_MOUNT_DIR and env[c.Env.CACHE_MAX_BYTES] == "500Gi"
    assert container["envFrom"] == [{"secretRef": {"name": "s3-read"}}]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "model-cache")
    # The same folder the operator mounts for team-a's trainer pods (builders.cache_volume).
    assert mount == {"name": "model-cache", "mountPath": c.CACHE_MOUNT_DIR, "subPath": "team-a"}
    assert {"name": "model-cache", "persistentVolumeClaim": {"claimName": "models"}} in pod["volumes"]
    assert container["securityContext"]["readOnlyRootFilesystem"]


@pytest.mark.parametrize("values,complaint", [
    ({"modelCache": {"enabled": True}}, "modelCache"),  # neither a claim nor a node path
    ({"modelCache": {"enabled": True, "claimName": "m", "scope": "world"}}, "scope"),
    ({"modelCache": {"enabled": True, "claimName": "m", "size": "lots"}}, "size"),
    ({"modelCache": {"enabled": True, "claimName": "m", "warm": {"uris": ["/local/model"]}}}, "uris"),
])
def test_schema_rejects_bad_cache_values(values: dict[str, Any], complaint: str) -> None:
    proc = run_helm(["template", "ft", str(CHART), *set_args(values)], check=False)
    assert proc.returncode != 0, f"accepted {values}"
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr
    assert complaint in proc.stderr
