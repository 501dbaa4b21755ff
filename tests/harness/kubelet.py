"""A fake kubelet for the test cluster: runs pods of the fake GPU nodes as local processes.

kwok drives every pod on the fake nodes except those labelled `STAGE_KWOK_SKIP: "true"`; this
helper plays the kubelet for exactly those. For each such pod, once the scheduler has bound it, it

1. resolves the container's environment (plain values, secretKeyRef, configMapKeyRef, fieldRef
   to metadata.name/namespace/labels/annotations, e.g. the Job's completion index),
2. writes the content of mounted ConfigMaps and Secrets into a temp dir and gives emptyDir
   mounts a temp dir, rewriting env values that point under a mount path to the local copy
   (e.g. FINETUNE_SPEC_PATH=/etc/finetune/spec.json), after applying the test's `extra_env`,
3. points the termination message at a local file (FINETUNE_TERMINATION_LOG),
4. marks the pod Running, runs `command + args` (the executable looked up on `path` first),
5. writes phase Succeeded/Failed and containerStatuses[0].state.terminated {exitCode, reason,
   message} through the pods/status subresource, as a kubelet does.

When such a pod is deleted while its process runs (a Job suspended by Kueue, an eviction), it
does what a kubelet does: SIGTERM to the container's main process, SIGKILL to all of its processes
once the grace period (the deletion's, else the pod's terminationGracePeriodSeconds, else 30 s)
has passed, then the terminal status as above, then it removes the pod object (delete with grace
period 0; the Job controller's finalizer may hold it a moment longer).

    with FakeKubelet(api_client, namespace, workdir, path=[venv_bin]) as kubelet:
        ...  # create a Job whose pod template has the label
        kubelet.wait_for(pod_count=1)
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from finetune_api.constants import TERMINATION_MESSAGE_MAX_BYTES, Env

from harness.cluster import STAGE_KWOK_SKIP


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeKubelet:
    def __init__(
        self,
        api_client: Any,
        namespace: str,
        workdir: Path,
        *,
        path: list[str] | None = None,
        extra_env: dict[str, str] | None = None,
        poll_s: float = 0.5,
    ) -> None:
        from kubernetes import client

        self.core = client.CoreV1Api(api_client)
        self.namespace = namespace
        self.workdir = Path(workdir)
        self.path = path or []
        self.extra_env = extra_env or {}
        self.poll_s = poll_s
        self.handled: dict[str, int | None] = {}  # pod name -> exit code (None while running)
        self.logs: dict[str, Path] = {}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        # Pods whose deletion was seen: name -> monotonic time the SIGTERM was sent.
        self.terminated_at: dict[str, float] = {}
        self.deleting: set[str] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="fake-kubelet", daemon=True)
        self.errors: list[str] = []

    # --- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> FakeKubelet:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            procs = list(self._procs.values())
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        self._thread.join(timeout=10)

    def wait_for(self, pod_count: int, timeout: float = 600) -> dict[str, int | None]:
        """Wait until `pod_count` pods have finished; returns pod name -> exit code."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                done = {k: v for k, v in self.handled.items() if v is not None}
            if len(done) >= pod_count:
                return done
            if self.errors:
                raise AssertionError("fake kubelet: " + "; ".join(self.errors))
            time.sleep(0.2)
        raise TimeoutError(f"fake kubelet: {pod_count} pods did not finish in {timeout}s: {self.handled}")

    # --- the loop ----------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                pods = self.core.list_namespaced_pod(
                    self.namespace, label_selector=f"{STAGE_KWOK_SKIP}=true"
                ).items
            except Exception:  # the API server may blink; a kubelet keeps polling
                self._stop.wait(self.poll_s)
                continue
            for pod in pods:
                name = pod.metadata.name
                if pod.metadata.deletion_timestamp:
                    self._deleted(pod)
                    continue
                if name in self.handled or not pod.spec.node_name:
                    continue
                with self._lock:
                    self.handled[name] = None
                threading.Thread(target=self._run_pod_safely, args=(pod,), daemon=True).start()
            self._stop.wait(self.poll_s)

    def _deleted(self, pod: Any) -> None:
        """A pod being deleted: stop its process as a kubelet does (once per pod)."""
        name = pod.metadata.name
        with self._lock:
            if name in self.deleting:
                return
            self.deleting.add(name)
            proc = self._procs.get(name)
            started = name in self.handled
        if proc is None and started:
            # Its thread is about to start the process: look again at the next poll.
            with self._lock:
                self.deleting.discard(name)
            return
        grace = pod.metadata.deletion_grace_period_seconds
        if grace is None:
            grace = pod.spec.termination_grace_period_seconds
        if grace is None:
            grace = 30
        if proc is None:
            # Never started here (deleted before it was bound or picked up): nothing to stop.
            with self._lock:
                self.handled.setdefault(name, None)
            threading.Thread(target=self._remove, args=(name,), daemon=True).start()
            return
        threading.Thread(target=self._terminate, args=(name, proc, float(grace)), daemon=True).start()

    def _terminate(self, name: str, proc: subprocess.Popen[bytes], grace: float) -> None:
        if proc.poll() is not None:
            return
        self.terminated_at[name] = time.monotonic()
        # The container's main process gets SIGTERM (it forwards it to its children, if any)...
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            # ...and when the grace period is over, every process of the container gets SIGKILL.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

    def _remove(self, name: str) -> None:
        """The kubelet's last word on a deleted pod: remove the object (grace period 0)."""
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.delete_namespaced_pod(name, self.namespace, grace_period_seconds=0)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def _run_pod_safely(self, pod: Any) -> None:
        try:
            self._run_pod(pod)
        except Exception as exc:
            self.errors.append(f"{pod.metadata.name}: {type(exc).__name__}: {exc}")

    # --- one pod -----------------------------------------------------------------------

    def _run_pod(self, pod: Any) -> None:
        name = pod.metadata.name
        container = pod.spec.containers[0]
        root = self.workdir / name
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        mounts = self._materialize_volumes(pod, container, root)
        env = self._env(pod, container, mounts)
        termination = root / "termination-log"
        env[Env.TERMINATION_LOG] = str(termination)
        argv = [*(container.command or []), *(container.args or [])]
        if not argv:
            raise ValueError(f"pod {name}: container has no command (a fake kubelet has no image entrypoint)")
        exe = shutil.which(argv[0], path=os.pathsep.join([*self.path, env.get("PATH", "")]))
        if exe is None:
            raise FileNotFoundError(f"pod {name}: {argv[0]} not found on {self.path}")
        started = _now()
        self._patch_status(name, "Running", {"running": {"startedAt": started}}, container, ready=True)
        log_path = root / "container.log"
        self.logs[name] = log_path
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [exe, *argv[1:]],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=root,
                start_new_session=True,
            )
            with self._lock:
                self._procs[name] = proc
            code = proc.wait()
        code = code if code >= 0 else 128 - code  # killed by signal N -> 128+N, as a container runtime
        message = (
            termination.read_bytes()[:TERMINATION_MESSAGE_MAX_BYTES].decode(errors="replace")
            if termination.exists()
            else ""
        )
        terminated = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "message": message,
            "startedAt": started,
            "finishedAt": _now(),
        }
        if not self._stop.is_set():
            self._patch_status(
                name,
                "Succeeded" if code == 0 else "Failed",
                {"terminated": terminated},
                container,
                ready=False,
            )
        with self._lock:
            self.handled[name] = code
            deleting = name in self.deleting
        if deleting and not self._stop.is_set():
            self._remove(name)

    def _materialize_volumes(self, pod: Any, container: Any, root: Path) -> dict[str, Path]:
        """mountPath -> local dir holding the volume's content."""
        volumes = {v.name: v for v in pod.spec.volumes or []}
        mounts: dict[str, Path] = {}
        for m in container.volume_mounts or []:
            vol = volumes.get(m.name)
            if vol is None:
                continue
            local = root / "volumes" / m.name
            local.mkdir(parents=True, exist_ok=True)
            data: dict[str, bytes] = {}
            if vol.config_map is not None:
                cm = self.core.read_namespaced_config_map(vol.config_map.name, self.namespace)
                data = {k: v.encode() for k, v in (cm.data or {}).items()}
                items = vol.config_map.items
            elif vol.secret is not None:
                secret = self.core.read_namespaced_secret(vol.secret.secret_name, self.namespace)
                data = {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}
                items = vol.secret.items
            else:  # emptyDir, and anything else: an empty local folder
                items = None
            if items:
                data = {i.path: data[i.key] for i in items if i.key in data}
            for key, value in data.items():
                (local / key).parent.mkdir(parents=True, exist_ok=True)
                (local / key).write_bytes(value)
            mounts[m.mount_path.rstrip("/")] = local
        return mounts

    def _env(self, pod: Any, container: Any, mounts: dict[str, Path]) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": os.environ.get("HOME", "/root"),
            "HF_HUB_OFFLINE": "1",
        }
        for src in container.env_from or []:
            if src.config_map_ref is not None:
                cm = self.core.read_namespaced_config_map(src.config_map_ref.name, self.namespace)
                env.update({(src.prefix or "") + k: v for k, v in (cm.data or {}).items()})
            if src.secret_ref is not None:
                secret = self.core.read_namespaced_secret(src.secret_ref.name, self.namespace)
                env.update(
                    {
                        (src.prefix or "") + k: base64.b64decode(v).decode()
                        for k, v in (secret.data or {}).items()
                    }
                )
        for e in container.env or []:
            value = self._env_value(pod, e)
            if value is not None:
                env[e.name] = value
        # The test's overrides win over the pod's own values (e.g. a free metrics port).
        env.update(self.extra_env)
        # Paths inside mounted volumes point at the local copies.
        for key, value in list(env.items()):
            for mount_path, local in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
                if value == mount_path or value.startswith(mount_path + "/"):
                    env[key] = str(local) + value[len(mount_path) :]
                    break
        return env

    def _env_value(self, pod: Any, e: Any) -> str | None:
        if e.value_from is None:
            return e.value or ""
        ref = e.value_from
        if ref.secret_key_ref is not None:
            secret = self.core.read_namespaced_secret(ref.secret_key_ref.name, self.namespace)
            raw = (secret.data or {}).get(ref.secret_key_ref.key)
            return base64.b64decode(raw).decode() if raw is not None else None
        if ref.config_map_key_ref is not None:
            cm = self.core.read_namespaced_config_map(ref.config_map_key_ref.name, self.namespace)
            return (cm.data or {}).get(ref.config_map_key_ref.key)
        if ref.field_ref is not None:
            return _field(pod, ref.field_ref.field_path)
        return None

    def _patch_status(
        self, name: str, phase: str, state: dict[str, Any], container: Any, ready: bool
    ) -> None:
        body = {
            "status": {
                "phase": phase,
                "conditions": [
                    {"type": "Ready", "status": "True" if ready else "False", "lastTransitionTime": _now()}
                ],
                "containerStatuses": [
                    {
                        "name": container.name,
                        "image": container.image or "fake",
                        "imageID": "",
                        "ready": ready,
                        "restartCount": 0,
                        "started": ready,
                        "state": state,
                    }
                ],
            }
        }
        self.core.patch_namespaced_pod_status(name, self.namespace, body)


def _field(pod: Any, path: str) -> str | None:
    meta = pod.metadata
    if path == "metadata.name":
        return str(meta.name)
    if path == "metadata.namespace":
        return str(meta.namespace)
    if path == "spec.nodeName":
        return str(pod.spec.node_name)
    if path == "status.podIP":
        return "127.0.0.1"
    for prefix, mapping in (("metadata.annotations", meta.annotations), ("metadata.labels", meta.labels)):
        if path.startswith(prefix + "['") and path.endswith("']"):
            return (mapping or {}).get(path[len(prefix) + 2 : -2])
    return None
