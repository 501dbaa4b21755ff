"""Kueue's real controller manager (built by `make tools`, group kueue) on a test cluster.

    kueue = KueueController(cluster, state_dir).start()
    q = kueue.create_queues("my-namespace")  # ResourceFlavor, ClusterQueue, LocalQueue, priorities

How it runs outside a cluster, and why:

- **Webhooks on loopback.** Kueue's mutating/validating webhooks (its own CRDs and batch/v1 Jobs)
  and the CRD conversion webhooks (v1beta1 <-> v1beta2) are served by the controller manager on
  127.0.0.1:PORT; their configurations are the release's own (`.tools/share/kueue/webhooks.yaml`),
  with the Service reference replaced by `url: https://127.0.0.1:PORT/<path>` (the API server has
  no route to a Service without kube-proxy). Only the webhooks of the frameworks we enable
  (`batch/job`) and of Kueue's own kinds are kept: a webhook of a disabled framework is not served,
  and with `failurePolicy: Fail` it would refuse every Pod/Deployment/... of the cluster.
- **Certificates.** Kueue's internal certificate management stays on (it also injects the CA into
  the webhook configurations and CRDs, and with it off the metrics server wants certificates under
  the fixed path /etc/kueue/metrics/certs). Its rotator keeps any valid certificate it finds in
  its Secret, so the fixture writes that Secret first: a CA and a serving certificate for both the
  Service name the rotator checks (`kueue-webhook-service.kueue-system.svc`) and IP 127.0.0.1,
  which the API server dials.
- **Configuration.** No leader election, metrics off, health probes and webhooks on free loopback
  ports, the visibility API server off (it would listen on 0.0.0.0:8082), only `batch/job`.
  Kueue reads the cluster through the admin kubeconfig.
"""

from __future__ import annotations

import atexit
import base64
import copy
import datetime
import ipaddress
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from finetune_api import constants as c

from harness.cluster import (
    GPU_PRODUCT,
    GPU_RESOURCE,
    TOOLS_BIN,
    ClusterError,
    TestCluster,
    _tail,
    _terminate,
    free_port,
    tool,
    wait_until,
)

#: What the kueue group of `make tools` copies from the module: crds/*.yaml, webhooks.yaml, VERSION.
KUEUE_SHARE = TOOLS_BIN.parent / "share" / "kueue"

GROUP = c.KUEUE_GROUP
VERSION = c.KUEUE_VERSION
NAMESPACE = "kueue-system"
WEBHOOK_SERVICE = "kueue-webhook-service"
WEBHOOK_SECRET = "kueue-webhook-server-cert"
#: The rotator derives the configuration names from the Service name ("kueue-" + upstream's name).
WEBHOOK_CONFIG_PREFIX = "kueue-"
#: CRDs that upstream's kustomization serves through the conversion webhook.
CONVERSION_CRDS = ("localqueues", "clusterqueues", "cohorts", "workloads", "multikueueclusters")
#: Webhook paths we keep: Kueue's own kinds and batch/v1 Jobs.
KEPT_WEBHOOK_PATHS = ("-kueue-x-k8s-io-", "-batch-v1-job")

FLAVOR = "h200"
LOCAL_QUEUE = "gpu-queue"
HIGH_PRIORITY = "high"
LOW_PRIORITY = "low"


@dataclass(frozen=True)
class Queues:
    namespace: str
    cluster_queue: str
    local_queue: str = LOCAL_QUEUE


def require_kueue() -> None:
    tool("kueue")
    missing = [p for p in (KUEUE_SHARE / "crds", KUEUE_SHARE / "webhooks.yaml") if not p.exists()]
    if missing:
        raise ClusterError(
            f"missing {', '.join(map(str, missing))}: the kueue group of `make tools` copies Kueue's CRDs "
            f"and webhooks there (rebuild it: rm .tools/stamps/kueue && make tools)"
        )


def _certificates(dns_name: str, days: int = 365) -> dict[str, bytes]:
    """A CA (as cert-controller's rotator validates one: its own name as DNS SAN, a PKCS#1 RSA key)
    and a serving certificate for dns_name and 127.0.0.1, in the Secret's keys."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    end = now + datetime.timedelta(days=days)

    def pem_key(key: rsa.RSAPrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                 serialization.NoEncryption())

    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kueue-ca"),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kueue")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True, key_cert_sign=True,
                                     content_commitment=False, data_encipherment=False, key_agreement=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("kueue-ca")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name)]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName(dns_name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return {
        "ca.crt": ca.public_bytes(serialization.Encoding.PEM),
        "ca.key": pem_key(ca_key),
        "tls.crt": cert.public_bytes(serialization.Encoding.PEM),
        "tls.key": pem_key(key),
    }


class KueueController:
    """Kueue's controller manager as a process against `cluster`, its state under state_dir."""

    def __init__(self, cluster: TestCluster, state_dir: Path) -> None:
        self.cluster = cluster
        self.state_dir = Path(state_dir).resolve()
        self.webhook_port = 0
        self.health_port = 0
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.state_dir / "kueue.log"

    @property
    def config_path(self) -> Path:
        return self.state_dir / "config.yaml"

    def webhook_url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.webhook_port}{path}"

    # -- set-up --------------------------------------------------------------------------------
    def start(self, timeout: float = 120) -> KueueController:
        require_kueue()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.webhook_port, self.health_port = free_port(), free_port()
        certs = _certificates(f"{WEBHOOK_SERVICE}.{NAMESPACE}.svc")
        ca_bundle = base64.b64encode(certs["ca.crt"]).decode()
        self.cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
        self.cluster.apply({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": WEBHOOK_SECRET, "namespace": NAMESPACE},
            "data": {k: base64.b64encode(v).decode() for k, v in certs.items()},
        })
        # The rotator injects the CA into these and would wait forever for any that is missing,
        # so they exist before Kueue starts.
        self._install_crds(ca_bundle)
        self.cluster.apply(self._webhook_configurations(ca_bundle))
        # The rotator waits until its Secret shows up in certDir, where a kubelet would mount it.
        certs_dir = self.state_dir / "certs"
        certs_dir.mkdir(parents=True, exist_ok=True)
        for name in ("tls.crt", "tls.key", "ca.crt"):
            (certs_dir / name).write_bytes(certs[name])
        self._write_config()
        env = {**os.environ, "KUBECONFIG": str(self.cluster.kubeconfig)}
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [str(tool("kueue")), f"--config={self.config_path}", "--zap-log-level=2"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,
            )
        self.pid = self._proc.pid
        atexit.register(self.stop)
        try:
            wait_until(self.ready, timeout, f"Kueue's /readyz on 127.0.0.1:{self.health_port}", interval=0.3)
        except TimeoutError as exc:
            raise ClusterError(f"{exc}\n{_tail(self.log_path, 40)}") from None
        return self

    def _install_crds(self, ca_bundle: str) -> None:
        docs = []
        for path in sorted((KUEUE_SHARE / "crds").glob("*.yaml")):
            crd = yaml.safe_load(path.read_text())
            if crd["spec"]["names"]["plural"] in CONVERSION_CRDS:
                crd["spec"]["conversion"] = {
                    "strategy": "Webhook",
                    "webhook": {"conversionReviewVersions": ["v1"],
                                "clientConfig": {"url": self.webhook_url("/convert"), "caBundle": ca_bundle}},
                }
            docs.append(crd)
        # Server-side: the Workload CRD is larger than the last-applied annotation may be.
        self.cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
                             input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}), timeout=120)
        for crd in docs:
            self.cluster.wait_condition(f"crd/{crd['metadata']['name']}", "Established", timeout=60)

    def _webhook_configurations(self, ca_bundle: str) -> list[dict[str, Any]]:
        out = []
        for doc in yaml.safe_load_all((KUEUE_SHARE / "webhooks.yaml").read_text()):
            if not doc:
                continue
            doc = copy.deepcopy(doc)
            doc["metadata"]["name"] = WEBHOOK_CONFIG_PREFIX + doc["metadata"]["name"]
            kept = []
            for hook in doc["webhooks"]:
                path = hook["clientConfig"]["service"]["path"]
                if not any(p in path for p in KEPT_WEBHOOK_PATHS):
                    continue
                hook["clientConfig"] = {"url": self.webhook_url(path), "caBundle": ca_bundle}
                kept.append(hook)
            doc["webhooks"] = kept
            out.append(doc)
        return out

    def _write_config(self) -> None:
        config = {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2",
            "kind": "Configuration",
            "namespace": NAMESPACE,
            "health": {"healthProbeBindAddress": f"127.0.0.1:{self.health_port}"},
            "metrics": {"bindAddress": "0"},
            "webhook": {"host": "127.0.0.1", "port": self.webhook_port, "certDir": str(self.state_dir / "certs")},
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": True, "webhookServiceName": WEBHOOK_SERVICE,
                                       "webhookSecretName": WEBHOOK_SECRET},
            "integrations": {"frameworks": ["batch/job"]},
            "featureGates": {"VisibilityOnDemand": False},
            "clientConnection": {"qps": 50, "burst": 100},
        }
        self.config_path.write_text(yaml.safe_dump(config))

    def ready(self) -> bool:
        if self._proc is not None and self._proc.poll() is not None:
            raise ClusterError(f"kueue exited with {self._proc.returncode}:\n{_tail(self.log_path, 40)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/readyz", timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        if self.pid:
            _terminate([self.pid], str(self.state_dir))
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.pid = None
        atexit.unregister(self.stop)

    # -- queues --------------------------------------------------------------------------------
    def create_queues(self, namespace: str, gpus: int = 8) -> Queues:
        """ResourceFlavor `h200` (the fake H200 nodes), a ClusterQueue `gpus-<namespace>` for that
        namespace only with `gpus` nvidia.com/gpu (CPU, memory and disk without a real limit: GPUs
        are what is short) that preempts lower priorities, LocalQueue `gpu-queue` in namespace,
        WorkloadPriorityClasses `high` (1000) and `low` (100)."""
        cq = f"gpus-{namespace}"
        big = {"cpu": "10000", "memory": "100Ti", "ephemeral-storage": "1000Ti"}
        objs: list[dict[str, Any]] = [
            {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ResourceFlavor", "metadata": {"name": FLAVOR},
             "spec": {"nodeLabels": {"nvidia.com/gpu.product": GPU_PRODUCT}}},
            {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ClusterQueue", "metadata": {"name": cq},
             "spec": {
                 "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                 "preemption": {"withinClusterQueue": "LowerPriority"},
                 "resourceGroups": [{
                     "coveredResources": [*big, GPU_RESOURCE],
                     "flavors": [{"name": FLAVOR, "resources": [
                         *({"name": k, "nominalQuota": v} for k, v in big.items()),
                         {"name": GPU_RESOURCE, "nominalQuota": str(gpus)},
                     ]}],
                 }],
             }},
            {"apiVersion": f"{GROUP}/{VERSION}", "kind": "WorkloadPriorityClass",
             "metadata": {"name": HIGH_PRIORITY}, "value": 1000, "description": "preempts low"},
            {"apiVersion": f"{GROUP}/{VERSION}", "kind": "WorkloadPriorityClass",
             "metadata": {"name": LOW_PRIORITY}, "value": 100, "description": "preemptible"},
        ]
        # The webhooks answer a moment after /readyz: retry the first writes briefly.
        deadline = time.monotonic() + 60
        while True:
            proc = self.cluster.kubectl("apply", "-f", "-", input=json.dumps(
                {"apiVersion": "v1", "kind": "List", "items": objs}), check=False)
            if proc.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise ClusterError(f"creating Kueue's queues failed: {proc.stderr}\n{_tail(self.log_path, 30)}")
            time.sleep(1)
        self.cluster.apply({"apiVersion": f"{GROUP}/{VERSION}", "kind": "LocalQueue",
                            "metadata": {"name": LOCAL_QUEUE}, "spec": {"clusterQueue": cq}},
                           namespace=namespace)

        def active() -> bool:
            obj = self.cluster.get_json(f"clusterqueues.{GROUP}", cq)
            return any(x["type"] == "Active" and x["status"] == "True"
                       for x in (obj.get("status") or {}).get("conditions") or [])

        wait_until(active, 60, f"ClusterQueue {cq} to be Active")
        return Queues(namespace=namespace, cluster_queue=cq)

    def workloads(self, namespace: str) -> list[dict[str, Any]]:
        return list(self.cluster.get_json(f"workloads.{VERSION}.{GROUP}", "-n", namespace)["items"])


@dataclass(frozen=True)
class KueueCluster:
    """A test cluster with Kueue running on it (tests/kueue's fixture)."""

    cluster: TestCluster
    kueue: KueueController
