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

Container mode (`runtime="podman"`): the pod's container runs from its `image` under podman (never
pulled: `--pull=never`), as a kubelet with a container runtime would run it:

- `command` replaces the image's ENTRYPOINT (and drops its CMD), `args` replace its CMD; `$(VAR)`
  in them is expanded from the container's environment as Kubernetes does;
- the environment is the pod's (resolved as above, no path rewriting, nothing from the host) plus
  KUBERNETES_SERVICE_HOST/PORT of the loopback API server and the test's `extra_env`; it goes to
  podman in a 0600 env file, never on a command line;
- configMap, secret, projected (serviceAccountToken through the TokenRequest API, bound to the pod;
  configMap; secret; downwardAPI) and downwardAPI volumes are materialised on the host and bind
  mounted read-only; emptyDir is a host folder of mode 0777 (medium Memory: a tmpfs of its
  sizeLimit, new for each run of the container); hostPath is bound as is; subPath is honoured.
  Volumes belong to the pod: a restarted container finds its emptyDir as it left it. The API
  server's ServiceAccount admission adds the `kube-api-access-*` projected volume only when
  automountServiceAccountToken allows it, so a pod gets a token exactly when a real one would;
- resources.limits memory (`--memory`, no extra swap; OOMKilled when podman says so, which it does
  not on cgroup v1 hosts) and cpu (`--cpus`);
- runAsUser/runAsGroup (container over pod), fsGroup and supplementalGroups (`--group-add`),
  runAsNonRoot (checked against the image's user, as the kubelet does), readOnlyRootFilesystem
  (`--read-only --read-only-tmpfs=false`: no silently writable /tmp), capabilities
  (`--cap-drop`/`--cap-add`), allowPrivilegeEscalation false (`no-new-privileges`);
- the termination message file is a host file (mode 0666) bound at terminationMessagePath;
  terminationMessagePolicy FallbackToLogsOnError uses the log's tail when it is empty on failure;
- `--network=host`, so the container reaches MinIO and the API server on 127.0.0.1; the pod's
  status.podIP is 127.0.0.1; an httpGet readinessProbe is polled on 127.0.0.1 and decides Ready
  (at least every second), an httpGet livenessProbe (on its own timing) kills the container after
  failureThreshold failures;
- restartPolicy Always/OnFailure restarts the container (restartCount, lastState) with a short
  back-off; Never runs it once;
- deletion: `podman kill --signal TERM`, `--signal KILL` once the grace period is over, then the
  exit code and message as above; each container has a unique name (namespace, pod, uid) and is
  removed when it has ended (`podman rm`), and `stop()` removes any still running.

    with FakeKubelet(api_client, namespace, workdir, runtime="podman", extra_env={...}) as kubelet:
        ...
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from finetune_api.constants import TERMINATION_LOG_PATH, TERMINATION_MESSAGE_MAX_BYTES, Env
from finetune_api.quantity import parse_bytes

from harness.cluster import STAGE_KWOK_SKIP
from harness.images import podman, podman_env

Runtime = Literal["process", "podman"]
RUNTIMES: tuple[Runtime, ...] = ("process", "podman")
#: Probes run at least this often (seconds), whatever periodSeconds says: tests should not wait
#: a 10 s period for a pod to become Ready.
MAX_PROBE_PERIOD_S = 1.0
#: What a FallbackToLogsOnError message holds at most (the kubelet's: 80 lines, 2048 bytes).
FALLBACK_LOG_LINES, FALLBACK_LOG_BYTES = 80, 2048


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
        runtime: Runtime = "process",
    ) -> None:
        from kubernetes import client

        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, not {runtime!r}")
        self.runtime = runtime
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
        # Container mode: pod name -> its container's name in podman, and what its status says.
        self.containers: dict[str, str] = {}
        self._status: dict[str, _PodStatus] = {}
        self._never_ran: set[str] = set()
        #: Container mode: pod name -> how often a failing livenessProbe had its container killed.
        self.liveness_kills: dict[str, int] = {}

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
            containers = list(self.containers.values())
        if containers:
            # The containers, not only the `podman run` clients attached to them.
            podman("rm", "--force", "--ignore", "--time", "0", *containers, check=False, timeout=120)
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        self._thread.join(timeout=10)

    def wait_for(self, pod_count: int, timeout: float = 600) -> dict[str, int | None]:
        """Wait until `pod_count` pods have finished; returns pod name -> exit code."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                done: dict[str, int | None] = {k: v for k, v in self.handled.items() if v is not None}
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
            pod: Any
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
            started = name in self.handled and name not in self._never_ran
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
        container = self.containers.get(name)
        if container is not None:
            # The runtime signals the container's PID 1, then kills all of it after the grace period.
            deadline = time.monotonic() + grace
            # (`podman run` may not have created the container yet: signal it once it runs.)
            while podman("kill", "--signal", "TERM", container, check=False, timeout=60).returncode != 0:
                if proc.poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                podman("kill", "--signal", "KILL", container, check=False, timeout=60)
            return
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
            if self.runtime == "podman":
                self._run_pod_in_container(pod)
            else:
                self._run_pod(pod)
        except Exception as exc:
            if self.runtime == "podman" and pod.metadata.name not in self._procs:
                # Its container never ran (no image, a volume it cannot have): deleting the pod
                # removes it at once, as a kubelet does.
                with self._lock:
                    self._never_ran.add(pod.metadata.name)
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
                data = self._config_map_data(vol.config_map.name)
                items = vol.config_map.items
            elif vol.secret is not None:
                data = self._secret_data(vol.secret.secret_name)
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
            **self._pod_env(pod, container),
        }
        # The test's overrides win over the pod's own values (e.g. a free metrics port).
        env.update(self.extra_env)
        # Paths inside mounted volumes point at the local copies.
        for key, value in list(env.items()):
            for mount_path, local in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
                if value == mount_path or value.startswith(mount_path + "/"):
                    env[key] = str(local) + value[len(mount_path) :]
                    break
        return env

    def _pod_env(self, pod: Any, container: Any) -> dict[str, str]:
        """The container's environment as its spec gives it: envFrom, then env (later wins)."""
        env: dict[str, str] = {}
        for src in container.env_from or []:
            if src.config_map_ref is not None:
                data = self._config_map_data(src.config_map_ref.name)
                env.update({(src.prefix or "") + k: v.decode() for k, v in data.items()})
            if src.secret_ref is not None:
                data = self._secret_data(src.secret_ref.name)
                env.update({(src.prefix or "") + k: v.decode() for k, v in data.items()})
        for e in container.env or []:
            value = self._env_value(pod, e)
            if value is not None:
                env[e.name] = value
        return env

    def _env_value(self, pod: Any, e: Any) -> str | None:
        if e.value_from is None:
            return e.value or ""
        ref = e.value_from
        if ref.secret_key_ref is not None:
            raw = self._secret_data(ref.secret_key_ref.name).get(ref.secret_key_ref.key)
            return raw.decode() if raw is not None else None
        if ref.config_map_key_ref is not None:
            raw = self._config_map_data(ref.config_map_key_ref.name).get(ref.config_map_key_ref.key)
            return raw.decode() if raw is not None else None
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

    # --- one pod, in a container (runtime="podman") -----------------------------------------

    def _run_pod_in_container(self, pod: Any) -> None:
        name = pod.metadata.name
        container = pod.spec.containers[0]
        if len(pod.spec.containers) > 1 or pod.spec.init_containers:
            raise ValueError(f"pod {name}: the container-mode kubelet runs pods of one container, no init containers")
        status = _PodStatus(container_name=container.name, image=container.image or "")
        with self._lock:
            self._status[name] = status
        image = container.image
        if not image or podman("image", "exists", image, check=False, timeout=60).returncode != 0:
            status.state = {"waiting": {"reason": "ErrImageNeverPull",
                                        "message": f"image {image!r} is not in podman's storage (nothing is pulled)"}}
            self._put_status(name, "Pending")
            raise FileNotFoundError(f"pod {name}: image {image!r} is not built (podman image exists failed)")
        root = self.workdir / name
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        root.chmod(0o755)
        log_path = root / "container.log"
        self.logs[name] = log_path
        # Volumes belong to the pod: an emptyDir keeps its content across restarts of the container.
        mounts = self._container_mounts(pod, container, root)
        restart = pod.spec.restart_policy or "Always"
        attempt = 0
        while True:
            code, terminated = self._run_container_once(pod, container, mounts, root, log_path, attempt)
            with self._lock:
                deleting = name in self.deleting
            again = restart == "Always" or (restart == "OnFailure" and code != 0)
            if not again or deleting or self._stop.is_set():
                break
            # restartPolicy: the container runs again (after a back-off), the pod stays Running.
            attempt += 1
            status.restart_count = attempt
            status.last_state = {"terminated": terminated}
            status.state = {"waiting": {"reason": "CrashLoopBackOff",
                                        "message": f"back-off restarting the container (exit code {code})"}}
            status.ready = False
            self._put_status(name, "Running")
            if self._stop.wait(min(2.0**attempt, 10.0)):
                break
            with self._lock:
                if name in self.deleting:
                    break
        status.state, status.ready = {"terminated": terminated}, False
        if not self._stop.is_set():
            self._put_status(name, "Succeeded" if code == 0 else "Failed")
        with self._lock:
            self.handled[name] = code
            deleting = name in self.deleting
        if deleting and not self._stop.is_set():
            self._remove(name)

    def _run_container_once(
        self, pod: Any, container: Any, pod_mounts: list[str], root: Path, log_path: Path, attempt: int
    ) -> tuple[int, dict[str, Any]]:
        """One run of the container, to its end; returns (exit code, the terminated state)."""
        name = pod.metadata.name
        status = self._status[name]
        run_dir = root / f"run-{attempt}"
        run_dir.mkdir()
        mounts = list(pod_mounts)
        env = {**self._pod_env(pod, container), **self._service_env(), **self.extra_env}
        termination_path = container.termination_message_path or TERMINATION_LOG_PATH
        termination = run_dir / "termination-log"
        termination.touch()
        termination.chmod(0o666)  # as the kubelet makes it: writable whatever the container's user
        mounts.append(f"type=bind,source={termination},destination={termination_path}")
        cname = _container_name(pod, attempt)
        argv = ["run", "--name", cname, "--pull=never", "--network=host", "--sig-proxy=false",
                "--log-driver=k8s-file", f"--log-opt=path={run_dir / 'podman.log'}"]
        argv += self._security_args(pod, container)
        argv += _limit_args(container)
        for m in mounts:
            argv += ["--mount", m]
        env_file, inherited = run_dir / "env", {}
        lines = []
        for key, value in env.items():
            if "\n" in value or "\r" in value:
                inherited[key] = value  # an env file holds one line per variable: pass it by name
                lines.append(key)
            else:
                lines.append(f"{key}={value}")
        env_file.write_text("".join(line + "\n" for line in lines))
        env_file.chmod(0o600)
        argv += ["--env-file", str(env_file)]
        if container.working_dir:
            argv += ["--workdir", container.working_dir]
        command = [_expand(a, env) for a in container.command or []]
        args = [_expand(a, env) for a in container.args or []]
        if command:
            # Kubernetes: command replaces the ENTRYPOINT and the image's CMD is not used.
            argv += ["--entrypoint", json.dumps(command)]
        argv += ["--", container.image, *args]

        started = _now()
        status.state = {"running": {"startedAt": started}}
        status.ready = container.readiness_probe is None
        self._put_status(name, "Running")
        with self._lock:
            self.containers[name] = cname
        with open(log_path, "ab") as log:
            # cwd: the runtime leaves files in its working directory (conmon an `oom` marker after a
            # memory kill), which belong with the run, not in the directory pytest runs from.
            proc = subprocess.Popen(["podman", *argv], env=podman_env(inherited), stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=run_dir)
            with self._lock:
                self._procs[name] = proc
            probers = [threading.Thread(target=self._probe, args=(pod, container, proc, kind), daemon=True)
                       for kind in ("readiness", "liveness") if getattr(container, f"{kind}_probe") is not None]
            for prober in probers:
                prober.start()
            run_code = proc.wait()
        env_file.unlink()  # it holds the pod's secrets; podman has read it
        for prober in probers:
            prober.join(timeout=10)
        state = podman("inspect", "--format", "{{json .State}}", cname, check=False, timeout=60)
        podman("rm", "--force", "--ignore", cname, check=False, timeout=120)
        info: dict[str, Any] = json.loads(state.stdout) if state.returncode == 0 and state.stdout.strip() else {}
        message = termination.read_bytes()[:TERMINATION_MESSAGE_MAX_BYTES].decode(errors="replace")
        if info and (info.get("Status") in ("created", "configured", "initialized")
                     or str(info.get("StartedAt", "")).startswith("0001-")):
            # It never started (no such executable, a mount the runtime refused, ...): the kubelet's
            # StartError, with the runtime's words (podman's stderr went to the log).
            code, reason = 128, "StartError"
            message = str(info.get("Error") or "") or _tail_bytes(log_path, 5, FALLBACK_LOG_BYTES)
        elif info:
            code = int(info.get("ExitCode", run_code))
            reason = "OOMKilled" if info.get("OOMKilled") else ("Completed" if code == 0 else "Error")
        else:
            # No container to inspect: podman itself failed (its output is in the log).
            code, reason = 128, "StartError"
            message = message or _tail_bytes(log_path, FALLBACK_LOG_LINES, FALLBACK_LOG_BYTES)
        if not message.strip() and code != 0 and container.termination_message_policy == "FallbackToLogsOnError":
            message = _tail_bytes(log_path, FALLBACK_LOG_LINES, FALLBACK_LOG_BYTES)
        terminated = {"exitCode": code, "reason": reason, "message": message, "startedAt": started,
                      "finishedAt": _now()}
        return code, terminated

    def _service_env(self) -> dict[str, str]:
        """What every container of a pod gets for the `kubernetes` Service: here the loopback API server."""
        url = urllib.parse.urlsplit(self.core.api_client.configuration.host)
        host, port = url.hostname or "127.0.0.1", str(url.port or 443)
        return {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port,
                "KUBERNETES_SERVICE_PORT_HTTPS": port, "KUBERNETES_PORT": f"tcp://{host}:{port}",
                f"KUBERNETES_PORT_{port}_TCP": f"tcp://{host}:{port}"}

    def _security_args(self, pod: Any, container: Any) -> list[str]:
        psc = pod.spec.security_context
        csc = container.security_context

        def pick(attr: str) -> Any:
            value = getattr(csc, attr, None) if csc is not None else None
            return value if value is not None else (getattr(psc, attr, None) if psc is not None else None)

        args: list[str] = []
        user, group = pick("run_as_user"), pick("run_as_group")
        if pick("run_as_non_root"):
            uid = user if user is not None else _image_uid(container.image)
            if uid is None:
                raise PermissionError(f"pod {pod.metadata.name}: runAsNonRoot, and image {container.image} has a "
                                      f"non-numeric user: cannot verify that it is not root (CreateContainerConfigError)")
            if int(uid) == 0:
                raise PermissionError(f"pod {pod.metadata.name}: runAsNonRoot, and the container would run as root "
                                      f"(CreateContainerConfigError)")
        if user is not None:
            args += ["--user", f"{user}:{group}" if group is not None else str(user)]
        elif group is not None:
            raise ValueError(f"pod {pod.metadata.name}: runAsGroup without runAsUser is not supported here")
        groups = [*(psc.supplemental_groups or [] if psc is not None else [])]
        if psc is not None and psc.fs_group is not None:
            groups.append(psc.fs_group)
        for g in dict.fromkeys(groups):
            args += ["--group-add", str(g)]
        if csc is not None and csc.privileged:
            args.append("--privileged")
        if csc is not None and csc.read_only_root_filesystem:
            # Without --read-only-tmpfs=false podman would mount writable tmpfs at /tmp, /var/tmp, /run.
            args += ["--read-only", "--read-only-tmpfs=false"]
        if csc is not None and csc.allow_privilege_escalation is False:
            args += ["--security-opt", "no-new-privileges"]
        caps = csc.capabilities if csc is not None else None
        for cap in (caps.drop or []) if caps is not None else []:
            args += ["--cap-drop", cap]
        for cap in (caps.add or []) if caps is not None else []:
            args += ["--cap-add", cap]
        seccomp = pick("seccomp_profile")
        if seccomp is not None and seccomp.type == "Unconfined":
            args += ["--security-opt", "seccomp=unconfined"]
        return args

    def _container_mounts(self, pod: Any, container: Any, root: Path) -> list[str]:
        """podman --mount values for the container's volumeMounts (volumes materialised under root)."""
        volumes = {v.name: v for v in pod.spec.volumes or []}
        fs_group = pod.spec.security_context.fs_group if pod.spec.security_context is not None else None
        prepared: dict[str, tuple[str, Path | None, dict[str, str]]] = {}  # name -> (kind, host path, options)
        mounts: list[str] = []
        for m in container.volume_mounts or []:
            vol = volumes.get(m.name)
            if vol is None:
                raise ValueError(f"pod {pod.metadata.name}: volumeMount {m.name!r} names no volume")
            if m.name not in prepared:
                prepared[m.name] = self._prepare_volume(pod, vol, root / "volumes" / m.name, fs_group)
            kind, host, options = prepared[m.name]
            read_only = bool(m.read_only) or kind == "readonly"
            if kind == "tmpfs":
                if m.sub_path:
                    raise ValueError(f"pod {pod.metadata.name}: subPath on a medium Memory emptyDir is not supported")
                opts = "".join(f",{k}={v}" for k, v in options.items())
                mounts.append(f"type=tmpfs,destination={m.mount_path}{opts}" + (",ro=true" if read_only else ""))
                continue
            assert host is not None
            source = host
            if m.sub_path:
                source = host / m.sub_path
                if kind != "readonly":
                    source.mkdir(parents=True, exist_ok=True)
                    if kind == "emptyDir":
                        source.chmod(0o777)
            mounts.append(f"type=bind,source={source},destination={m.mount_path}" + (",ro=true" if read_only else ""))
        return mounts

    def _prepare_volume(
        self, pod: Any, vol: Any, local: Path, fs_group: int | None
    ) -> tuple[str, Path | None, dict[str, str]]:
        """(kind, host path, tmpfs options): kind is "readonly" (materialised content), "emptyDir",
        "hostPath" or "tmpfs"."""
        if vol.empty_dir is not None:
            if vol.empty_dir.medium == "Memory":
                opts = {"tmpfs-mode": "1777"}
                if vol.empty_dir.size_limit:
                    opts["tmpfs-size"] = str(parse_bytes(str(vol.empty_dir.size_limit)))
                return "tmpfs", None, opts
            local.mkdir(parents=True)
            local.chmod(0o777)  # as the kubelet creates an emptyDir: any user of the pod may write
            return "emptyDir", local, {}
        if vol.host_path is not None:
            path = Path(vol.host_path.path)
            if vol.host_path.type == "DirectoryOrCreate":
                path.mkdir(parents=True, exist_ok=True)
            return "hostPath", path, {}
        files: dict[str, tuple[bytes, int]] = {}  # path in the volume -> (content, mode)
        if vol.config_map is not None:
            data = self._config_map_data(vol.config_map.name, vol.config_map.optional)
            files = _select(data, vol.config_map.items, vol.config_map.default_mode, vol.name)
        elif vol.secret is not None:
            data = self._secret_data(vol.secret.secret_name, vol.secret.optional)
            files = _select(data, vol.secret.items, vol.secret.default_mode, vol.name)
        elif vol.downward_api is not None:
            files = self._downward_files(pod, vol.downward_api.items, vol.downward_api.default_mode)
        elif vol.projected is not None:
            default = vol.projected.default_mode
            for src in vol.projected.sources or []:
                if src.service_account_token is not None:
                    t = src.service_account_token
                    files[t.path] = (self._token(pod, t.audience, t.expiration_seconds).encode(),
                                     default if default is not None else 0o644)
                elif src.config_map is not None:
                    data = self._config_map_data(src.config_map.name, src.config_map.optional)
                    files.update(_select(data, src.config_map.items, default, vol.name))
                elif src.secret is not None:
                    data = self._secret_data(src.secret.name, src.secret.optional)
                    files.update(_select(data, src.secret.items, default, vol.name))
                elif src.downward_api is not None:
                    files.update(self._downward_files(pod, src.downward_api.items, default))
                else:
                    raise ValueError(f"pod {pod.metadata.name}: projected volume {vol.name}: unsupported source {src}")
        else:
            raise ValueError(f"pod {pod.metadata.name}: volume {vol.name}: only configMap, secret, projected, "
                             f"downwardAPI, emptyDir and hostPath volumes are supported in container mode")
        local.mkdir(parents=True)
        local.chmod(0o755)
        for rel, (content, mode) in files.items():
            path = local / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            path.chmod(mode)
            if fs_group is not None:
                os.chown(path, -1, fs_group)  # the kubelet gives the pod's fsGroup the volume's files
        return "readonly", local, {}

    def _config_map_data(self, obj_name: str, optional: bool | None = None) -> dict[str, bytes]:
        """The ConfigMap's data as bytes; {} for a missing one marked optional, else the API's error."""
        cm = self._read_optional(self.core.read_namespaced_config_map, obj_name, optional)
        return {k: v.encode() for k, v in ((cm.data if cm else None) or {}).items()}

    def _secret_data(self, obj_name: str, optional: bool | None = None) -> dict[str, bytes]:
        """The Secret's data, decoded; {} for a missing one marked optional, else the API's error."""
        secret = self._read_optional(self.core.read_namespaced_secret, obj_name, optional)
        return {k: base64.b64decode(v) for k, v in ((secret.data if secret else None) or {}).items()}

    def _read_optional(self, read: Any, obj_name: str, optional: bool | None) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            return read(obj_name, self.namespace)
        except ApiException as exc:
            if exc.status == 404 and optional:
                return None
            raise

    def _downward_files(self, pod: Any, items: Any, default_mode: int | None) -> dict[str, tuple[bytes, int]]:
        files: dict[str, tuple[bytes, int]] = {}
        for item in items or []:
            if item.field_ref is None:
                raise ValueError(f"pod {pod.metadata.name}: downwardAPI item {item.path}: only fieldRef is supported")
            value = _field(pod, item.field_ref.field_path)
            if value is None:
                raise ValueError(f"pod {pod.metadata.name}: downwardAPI fieldPath {item.field_ref.field_path} "
                                 f"is not supported")
            mode = item.mode if item.mode is not None else default_mode
            files[item.path] = (value.encode(), mode if mode is not None else 0o644)
        return files

    def _token(self, pod: Any, audience: str | None, expiration: int | None) -> str:
        """A token of the pod's ServiceAccount from the TokenRequest API, bound to the pod (as the kubelet
        gets for a projected serviceAccountToken): it stops working when the pod is deleted."""
        from kubernetes import client

        body = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(
            audiences=[audience] if audience else [],
            expiration_seconds=expiration or 3600,
            bound_object_ref=client.V1BoundObjectReference(api_version="v1", kind="Pod", name=pod.metadata.name,
                                                           uid=pod.metadata.uid)))
        sa = pod.spec.service_account_name or "default"
        resp: Any = self.core.create_namespaced_service_account_token(sa, self.namespace, body)
        return str(resp.status.token)

    def _probe(self, pod: Any, container: Any, proc: subprocess.Popen[bytes], kind: str) -> None:
        """An httpGet probe against 127.0.0.1 (host network). readiness decides the pod's Ready
        condition (polled at least every MAX_PROBE_PERIOD_S, its initial delay capped alike);
        liveness, on its own timing, kills the container after failureThreshold failures (SIGTERM,
        SIGKILL after the grace period), which restartPolicy then restarts."""
        name = pod.metadata.name
        probe = getattr(container, f"{kind}_probe")
        if probe.http_get is None:
            self.errors.append(f"{name}: only httpGet {kind} probes are supported in container mode")
            return
        port: Any = probe.http_get.port
        if isinstance(port, str) and not port.isdigit():
            port = next((p.container_port for p in container.ports or [] if p.name == port), None)
            if port is None:
                self.errors.append(f"{name}: {kind}Probe names port {probe.http_get.port!r}, which is not declared")
                return
        url = f"http://127.0.0.1:{port}{probe.http_get.path or '/'}"
        period, delay = float(probe.period_seconds or 10), float(probe.initial_delay_seconds or 0)
        if kind == "readiness":
            period, delay = min(period, MAX_PROBE_PERIOD_S), min(delay, MAX_PROBE_PERIOD_S)
        timeout = float(probe.timeout_seconds or 1)
        threshold = int(probe.failure_threshold or 3)
        status = self._status[name]
        if self._stop.wait(delay):
            return
        failures = 0
        while proc.poll() is None and not self._stop.is_set():
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    ok = 200 <= resp.status < 400
            except (urllib.error.URLError, OSError):
                ok = False
            failures = 0 if ok else failures + 1
            if kind == "readiness":
                ready = ok or (status.ready and failures < threshold)
                if ready != status.ready and proc.poll() is None and "running" in status.state:
                    status.ready = ready
                    self._put_status(name, "Running")
            elif failures >= threshold:
                with self._lock:
                    self.liveness_kills[name] = self.liveness_kills.get(name, 0) + 1
                grace = probe.termination_grace_period_seconds
                if grace is None:
                    grace = pod.spec.termination_grace_period_seconds
                container_name = self.containers[name]
                podman("kill", "--signal", "TERM", container_name, check=False, timeout=60)
                try:
                    proc.wait(timeout=float(30 if grace is None else grace))
                except subprocess.TimeoutExpired:
                    podman("kill", "--signal", "KILL", container_name, check=False, timeout=60)
                return
            self._stop.wait(period)

    def _put_status(self, name: str, phase: str) -> None:
        st = self._status[name]
        cs: dict[str, Any] = {
            "name": st.container_name, "image": st.image, "imageID": "", "ready": st.ready,
            "restartCount": st.restart_count, "started": "running" in st.state, "state": st.state,
        }
        if st.last_state:
            cs["lastState"] = st.last_state
        conditions = [{"type": t, "status": "True" if st.ready else "False", "lastTransitionTime": _now()}
                      for t in ("Ready", "ContainersReady")]
        body = {"status": {"phase": phase, "hostIP": "127.0.0.1", "podIP": "127.0.0.1",
                           "podIPs": [{"ip": "127.0.0.1"}], "startTime": st.start_time,
                           "conditions": conditions, "containerStatuses": [cs]}}
        with st.lock:  # one patch at a time per pod (the prober and the pod's thread both report)
            self.core.patch_namespaced_pod_status(name, self.namespace, body)


@dataclass
class _PodStatus:
    """What the container-mode kubelet last reported for a pod (a status patch replaces the list)."""

    container_name: str
    image: str
    state: dict[str, Any] = field(default_factory=dict)
    last_state: dict[str, Any] | None = None
    ready: bool = False
    restart_count: int = 0
    start_time: str = field(default_factory=_now)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _limit_args(container: Any) -> list[str]:
    """resources.limits as the runtime enforces them: memory (no swap beyond it: past it the kernel's
    OOM killer ends the container) and CPU (a CFS quota)."""
    limits = (container.resources.limits if container.resources is not None else None) or {}
    args: list[str] = []
    if limits.get("memory"):
        memory = str(parse_bytes(str(limits["memory"])))
        args += ["--memory", memory, "--memory-swap", memory]
    if limits.get("cpu"):
        cpu = str(limits["cpu"])
        args += ["--cpus", str(int(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu))]
    return args


def _container_name(pod: Any, attempt: int) -> str:
    """Unique per pod object and run: namespace, pod name, uid (parallel tests never collide)."""
    base = re.sub(r"[^a-zA-Z0-9_.-]", "-", f"fk-{pod.metadata.namespace}-{pod.metadata.name}")[:100]
    return f"{base}-{str(pod.metadata.uid)[:8]}-{attempt}"


def _select(data: dict[str, bytes], items: Any, default_mode: int | None, volume: str) -> dict[str, tuple[bytes, int]]:
    """The files of a configMap/secret source: every key, or only `items` (key -> path, mode)."""
    mode = default_mode if default_mode is not None else 0o644
    if not items:
        return {k: (v, mode) for k, v in data.items()}
    missing = [i.key for i in items if i.key not in data]
    if missing:
        raise KeyError(f"volume {volume}: keys {missing} are not in the source")
    return {i.path: (data[i.key], i.mode if i.mode is not None else mode) for i in items}


_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command and args: a defined variable is replaced, an undefined
    reference is left as it is, $$ is a literal $."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR.sub(sub, value)


def _image_uid(image: str) -> int | None:
    """The numeric user an image runs as (root when it names none); None for a user name."""
    out = podman("image", "inspect", "--format", "{{.Config.User}}", image, timeout=60).stdout.strip()
    user = out.split(":", 1)[0]
    if not user:
        return 0
    return int(user) if user.isdigit() else None


def _tail_bytes(path: Path, lines: int, limit: int) -> str:
    try:
        text = path.read_bytes().decode(errors="replace")
    except OSError:
        return ""
    tail = "\n".join(text.splitlines()[-lines:])
    return tail.encode()[-limit:].decode(errors="replace")


def _field(pod: Any, path: str) -> str | None:
    meta = pod.metadata
    if path == "metadata.name":
        return str(meta.name)
    if path == "metadata.namespace":
        return str(meta.namespace)
    if path == "metadata.uid":
        return str(meta.uid)
    if path == "spec.serviceAccountName":
        return str(pod.spec.service_account_name)
    if path == "status.hostIP":
        return "127.0.0.1"
    if path == "spec.nodeName":
        return str(pod.spec.node_name)
    if path == "status.podIP":
        return "127.0.0.1"
    for prefix, mapping in (("metadata.annotations", meta.annotations), ("metadata.labels", meta.labels)):
        if path.startswith(prefix + "['") and path.endswith("']"):
            return (mapping or {}).get(path[len(prefix) + 2 : -2])
    return None
