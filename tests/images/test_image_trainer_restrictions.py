"""The trainer image under the restrictions of the pod the operator builds for it.

The pod spec comes from finetune_operator.builders (the quickstart job): its container security
context becomes podman's flags (read-only root, uid/gid, all capabilities dropped, no privilege
escalation) and its emptyDir volumes become writable directories at their mount paths. Inside, a write
anywhere on the root filesystem fails with EROFS, even into the trainer user's own home, while the
Job's writable paths (/scratch, /tmp, /dev/shm) and the termination log take writes.
"""

from __future__ import annotations

import errno
import json
import tomllib
from pathlib import Path
from typing import Any

import yaml
from finetune_api import parse_spec
from finetune_operator.builders import BuildOptions, Owner, build_job
from harness.images import REPO, TRAINER_IMAGE, podman, require_image

#: The torch version pyproject.toml pins (the image must carry that one).
TORCH_PIN = next(r.split("==")[1] for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
    "optional-dependencies"]["trainer"] if r.startswith("torch=="))
#: Paths on the image's root filesystem a trainer might try to write to (the home is the user's own).
ROOT_PATHS = ("/", "/opt/venv", "/opt/venv/lib", "/home/finetune", "/etc", "/var/tmp", "/usr/local/bin")

PROBE = r"""
import errno, json, os, sys
result = {}
for path in json.loads(sys.argv[1]):
    target = os.path.join(path, "probe-write")
    try:
        with open(target, "w") as f:
            f.write("x")
        with open(target) as f:
            result[path] = "ok" if f.read() == "x" else "read back differs"
        os.remove(target)
    except OSError as exc:
        result[path] = errno.errorcode.get(exc.errno, str(exc.errno))
term = sys.argv[2]
try:
    with open(term, "w") as f:
        f.write("done")
    result[term] = "ok"
except OSError as exc:
    result[term] = errno.errorcode.get(exc.errno, str(exc.errno))
print(json.dumps(result))
"""


def trainer_pod() -> dict[str, Any]:
    manifest = yaml.safe_load((REPO / "examples" / "cluster-quickstart.yaml").read_text())
    owner = Owner(name=manifest["metadata"]["name"], namespace="images-test", uid="00000000-0000-0000-0000-000000000001")
    job = build_job(owner, parse_spec(manifest["spec"]), BuildOptions(trainer_image=TRAINER_IMAGE))
    pod: dict[str, Any] = job["spec"]["template"]["spec"]
    return pod


def podman_flags(pod: dict[str, Any], volume_root: Path) -> tuple[list[str], list[str]]:
    """podman run flags for the pod's one container, and the paths its emptyDir volumes make writable.

    An emptyDir is what the kubelet makes of it: a directory of the node (mode 0777) bind-mounted at the
    mount path (for medium Memory the directory is on a tmpfs; sizeLimit is enforced by eviction, not by
    the mount). A podman --tmpfs would not do: runc gives a tmpfs over an existing directory of the image
    that directory's mode with root as owner (/scratch: 0755 root, not writable by the trainer).
    """
    (container,) = pod["containers"]
    sc, psc = container["securityContext"], pod["securityContext"]
    uid = sc.get("runAsUser", psc.get("runAsUser"))
    gid = sc.get("runAsGroup", psc.get("runAsGroup", uid))
    assert uid and sc["runAsNonRoot"] is not False and psc["runAsNonRoot"]
    flags = ["--network=none", f"--user={uid}:{gid}"]
    assert sc["readOnlyRootFilesystem"] is True
    flags += ["--read-only", "--read-only-tmpfs=false"]  # no tmpfs podman would add on its own: only the pod's
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
    flags.append("--cap-drop=ALL")
    assert sc["allowPrivilegeEscalation"] is False
    flags.append("--security-opt=no-new-privileges")
    if psc.get("fsGroup"):
        flags.append(f"--group-add={psc['fsGroup']}")
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable: list[str] = []
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "emptyDir" in volume:
            directory = volume_root / mount["name"]
            directory.mkdir()
            directory.chmod(0o777)
            flags.append(f"--volume={directory}:{mount['mountPath']}:rw")
            writable.append(mount["mountPath"])
        else:
            # ConfigMaps, Secrets: read-only by the pod spec, nothing the trainer writes to.
            assert mount.get("readOnly") is True, f"{mount} is writable but not an emptyDir: add it to this test"
    return flags, writable


def test_trainer_pod_spec_never_mounts_the_api_token() -> None:
    assert trainer_pod()["automountServiceAccountToken"] is False


def test_writes_outside_the_jobs_writable_paths_fail(tmp_path: Path) -> None:
    pod = trainer_pod()
    (tmp_path / "volumes").mkdir()
    flags, writable = podman_flags(pod, tmp_path / "volumes")
    assert {"/scratch", "/tmp"} <= set(writable), writable
    (container,) = pod["containers"]
    term = container["terminationMessagePath"]
    # The kubelet bind-mounts a writable file at the termination message path.
    termination_log = tmp_path / "termination-log"
    termination_log.write_text("")
    termination_log.chmod(0o666)
    proc = podman("run", "--rm", *flags, "-v", f"{termination_log}:{term}:rw", "--entrypoint", "python",
                  require_image(TRAINER_IMAGE), "-c", PROBE, json.dumps([*writable, *ROOT_PATHS]), term, timeout=180)
    result = json.loads(proc.stdout)
    assert {p: result[p] for p in writable} == dict.fromkeys(writable, "ok")
    assert result[term] == "ok" and termination_log.read_text() == "done"
    # EROFS, not EACCES: the root filesystem is read-only, not merely owned by someone else.
    assert {p: result[p] for p in ROOT_PATHS} == dict.fromkeys(ROOT_PATHS, errno.errorcode[errno.EROFS])


def test_training_stack_imports_under_the_pods_restrictions(tmp_path: Path) -> None:
    """torch, the Hugging Face stack, DeepSpeed and bitsandbytes load as uid 10001 on the read-only root
    (whatever they cache goes to the writable /tmp), and the trainer's entry module imports."""
    flags, _ = podman_flags(trainer_pod(), tmp_path)
    script = ("import torch, transformers, peft, trl, accelerate, datasets, deepspeed, bitsandbytes\n"
              "import finetune_trainer.entrypoint\n"
              "print('imported', torch.__version__.split('+')[0])")
    proc = podman("run", "--rm", *flags, "--entrypoint", "python", require_image(TRAINER_IMAGE), "-c", script,
                  timeout=300)
    assert proc.stdout.split()[-2:] == ["imported", TORCH_PIN], proc.stdout + proc.stderr
