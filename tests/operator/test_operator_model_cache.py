"""The shared model cache in trainer pods: volume, mount, environment, and the operator flags."""

from __future__ import annotations

from typing import Any

import pytest
from finetune_api import constants as c
from finetune_api import parse_spec
from finetune_operator.builders import BuildOptions, ModelCache, Owner, PodDefaults, build_children
from finetune_operator.settings import parse_settings
from operator_specs import job_manifest


def pod(cache: ModelCache | None, namespace: str = "team-a") -> dict[str, Any]:
    spec = parse_spec(job_manifest("tune")["spec"])
    options = BuildOptions(trainer_image="img", pod_defaults=PodDefaults(model_cache=cache))
    job = build_children(Owner(name="tune", namespace=namespace, uid="u"), spec, options).job
    return dict(job["spec"]["template"]["spec"])


def cache_parts(p: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, str]]:
    container = p["containers"][0]
    volumes = [v for v in p["volumes"] if v["name"] == "model-cache"]
    mounts = [m for m in container["volumeMounts"] if m["mountPath"] == c.CACHE_MOUNT_DIR]
    env = {e["name"]: e.get("value", "") for e in container["env"] if e["name"].startswith("FINETUNE_CACHE_")}
    return volumes, mounts, env


def test_off_by_default_pods_are_unchanged() -> None:
    volumes, mounts, env = cache_parts(pod(None))
    assert (volumes, mounts, env) == ([], [], {})


def test_a_claim_is_mounted_writable_with_the_cache_environment() -> None:
    volumes, mounts, env = cache_parts(pod(ModelCache(claim_name="model-cache", max_bytes=500 * 2**30)))
    assert volumes == [{"name": "model-cache", "persistentVolumeClaim": {"claimName": "model-cache"}}]
    assert len(mounts) == 1 and not mounts[0].get("readOnly")
    assert env == {c.Env.CACHE_DIR: c.CACHE_MOUNT_DIR, c.Env.CACHE_MAX_BYTES: str(500 * 2**30)}


def test_a_node_path_is_mounted_as_hostpath() -> None:
    volumes, _, _ = cache_parts(pod(ModelCache(host_path="/var/lib/finetune-cache")))
    assert volumes == [{"name": "model-cache", "hostPath": {"path": "/var/lib/finetune-cache", "type": "DirectoryOrCreate"}}]


def test_namespace_scope_gives_each_namespace_only_its_own_folder() -> None:
    """The namespace rule: by default a pod mounts <volume>/<its namespace>, so another namespace's
    cached (private) models are not in its filesystem at all, whatever image it runs."""
    cache = ModelCache(claim_name="mc")
    _, a, _ = cache_parts(pod(cache, "team-a"))
    _, b, _ = cache_parts(pod(cache, "team-b"))
    assert a[0]["subPath"] == "team-a" and b[0]["subPath"] == "team-b"
    _, shared, _ = cache_parts(pod(ModelCache(claim_name="mc", scope="cluster"), "team-a"))
    assert "subPath" not in shared[0]  # the platform allowed sharing across namespaces


def test_bad_cache_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        ModelCache(claim_name="a", host_path="/b")
    with pytest.raises(ValueError, match="scope 'everyone'"):
        ModelCache(claim_name="a", scope="everyone")


def test_operator_flags_and_environment() -> None:
    s = parse_settings(["--model-cache-claim", "mc", "--model-cache-size", "2Gi"], {})
    assert s.pod_defaults.model_cache == ModelCache(claim_name="mc", max_bytes=2 * 2**30)
    env = {"FINETUNE_OPERATOR_MODEL_CACHE_HOST_PATH": "/var/lib/x", "FINETUNE_OPERATOR_MODEL_CACHE_SIZE": "10G",
           "FINETUNE_OPERATOR_MODEL_CACHE_SCOPE": "cluster"}
    assert parse_settings([], env).pod_defaults.model_cache == ModelCache(host_path="/var/lib/x", max_bytes=10**10,
                                                                            scope="cluster")
    assert parse_settings([], {}).pod_defaults.model_cache is None


def test_a_bad_size_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_settings(["--model-cache-claim", "mc", "--model-cache-size", "lots"], {})
    assert "--model-cache-size: 'lots' is not a size in bytes" in capsys.readouterr().err


def test_status_records_whether_the_model_came_from_the_cache() -> None:
    """The trainer's termination message says hit/miss/refetched; status.modelCache keeps it."""
    import json
    from datetime import UTC, datetime

    from finetune_operator.status_rules import Observed, compute_status

    def finished(model_cache: str | None) -> Any:
        msg = {"outcome": "succeeded", "artifact": {"uri": "s3://out/r", "sha256": "ab" * 32, "sizeBytes": 1},
               **({"modelCache": model_cache} if model_cache else {})}
        job = {"metadata": {"name": "tune"}, "spec": {"suspend": False},
               "status": {"startTime": "2030-01-01T12:00:00Z", "active": 0, "failed": 0,
                          "conditions": [{"type": "Complete", "status": "True", "reason": "CompletionsReached",
                                          "message": "", "lastTransitionTime": "2030-01-01T12:10:00Z"}]}}
        pod = {"metadata": {"name": "p0", "annotations": {"batch.kubernetes.io/job-completion-index": "0"},
                            "creationTimestamp": "2030-01-01T12:00:00Z"},
               "status": {"phase": "Succeeded", "conditions": [], "containerStatuses": [{"name": "trainer", "state": {
                   "terminated": {"exitCode": 0, "finishedAt": "2030-01-01T12:05:00Z", "message": json.dumps(msg)}}}]}}
        spec = parse_spec(job_manifest("tune")["spec"])
        return compute_status("tune", spec, None, Observed(1, job, (pod,), None,
                                                           now=datetime(2030, 1, 1, 12, 11, tzinfo=UTC)))

    assert finished("hit").model_cache == "hit"
    assert finished("refetched").wire()["modelCache"] == "refetched"
    assert finished(None).model_cache is None and "modelCache" not in finished(None).wire()
    # A damaged entry, discarded and refetched, is a Warning event on the FineTuneJob (once).
    from finetune_operator.status_rules import milestones

    events = [m for m in milestones(None, finished("refetched")) if m.reason == c.Reason.MODEL_CACHE_REFETCHED]
    assert len(events) == 1 and events[0].type == "Warning" and "damaged" in events[0].message
    assert not [m for m in milestones(finished("refetched"), finished("refetched"))
                if m.reason == c.Reason.MODEL_CACHE_REFETCHED]
    assert not [m for m in milestones(None, finished("hit")) if m.reason == c.Reason.MODEL_CACHE_REFETCHED]
