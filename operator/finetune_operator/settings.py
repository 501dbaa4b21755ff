"""Operator settings: command-line flags, with FINETUNE_OPERATOR_* environment variables as defaults."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from finetune_api.constants import (
    CREDENTIALS_MOUNT_DIR,
    DEFAULT_TRAINER_IMAGE,
    OPERATOR_HEALTH_PORT,
    OPERATOR_METRICS_PORT,
)
from finetune_api.quantity import parse_bytes

from .builders import CACHE_SCOPES, GpuMemory, ModelCache, PodDefaults, PreflightOptions, check_quantity
from .policy import DEFAULT_NODE_SELECTOR_KEYS, DEFAULT_TOLERATION_KEYS, Policy

ENV_PREFIX = "FINETUNE_OPERATOR_"


@dataclass(frozen=True)
class Settings:
    namespaces: tuple[str, ...] = ()
    all_namespaces: bool = False
    trainer_image: str = DEFAULT_TRAINER_IMAGE
    metrics_port: int = OPERATOR_METRICS_PORT
    health_port: int = OPERATOR_HEALTH_PORT
    # Seconds without step progress before Stalled; a job's runPolicy.stallTimeoutSeconds wins.
    stall_timeout: float = 1800.0
    # How often running jobs' trainer metrics are scraped (progress, stall watchdog); everything
    # else follows watch events.
    resync_interval: float = 10.0
    # Timeout of one scrape of a trainer's /metrics.
    scrape_timeout: float = 2.0
    # Several replicas, one active: a coordination.k8s.io Lease decides which.
    leader_elect: bool = False
    leader_election_namespace: str = "default"
    leader_election_name: str = "finetune-operator"
    lease_duration: float = 15.0
    # Annotation and label keys with these prefixes are copied from the FineTuneJob onto its pods.
    # Meant for tests and platform hooks (e.g. kwok stages, service-mesh opt-outs).
    propagate_prefixes: tuple[str, ...] = ()
    # Pod annotation whose value, when present, replaces http://<podIP>:<port>/metrics (tests).
    scrape_url_annotation: str | None = None
    # Bind address of the metrics and health servers.
    bind_address: str = "0.0.0.0"
    # The platform's policy (policy.py): what a FineTuneJob may ask for besides the defaults.
    allowed_images: tuple[str, ...] = ()
    allowed_priority_classes: tuple[str, ...] = ()
    allowed_toleration_keys: tuple[str, ...] = DEFAULT_TOLERATION_KEYS
    allowed_node_selector_keys: tuple[str, ...] = DEFAULT_NODE_SELECTOR_KEYS
    # Trainer pod defaults: requests per GPU, emptyDir sizes, credentials as files.
    pod_defaults: PodDefaults = field(default_factory=PodDefaults)
    # The preflight pod (spec.preflight) and the GPU memory of each node pool its plan is checked against.
    preflight: PreflightOptions = field(default_factory=PreflightOptions)

    def policy(self) -> Policy:
        return Policy(
            trainer_image=self.trainer_image,
            allowed_images=self.allowed_images,
            allowed_priority_classes=self.allowed_priority_classes,
            allowed_toleration_keys=self.allowed_toleration_keys,
            allowed_node_selector_keys=self.allowed_node_selector_keys,
        )


def _env(env: Mapping[str, str], name: str, default: str | None = None) -> str | None:
    return env.get(ENV_PREFIX + name, default)


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def _quantity(value: str) -> str:
    try:
        return check_quantity(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _list_flag(p: argparse._ActionsContainer, env: Mapping[str, str], name: str, default: tuple[str, ...],
               help: str) -> None:
    """A comma-separated list; an empty value means none (so a default list can be emptied)."""
    env_name = name.upper().replace("-", "_")
    value = _env(env, env_name)
    p.add_argument(f"--{name}", type=lambda v: tuple(_split(v)),
                   default=tuple(_split(value)) if value is not None else default,
                   help=f"{help} Comma-separated; empty for none (default: {','.join(default) or 'none'}).")


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="finetune operator",
        description="Run the FineTuneJob operator against the current kube context (in-cluster or kubeconfig). "
        f"Every flag can also be set as an environment variable {ENV_PREFIX}<FLAG> (e.g. {ENV_PREFIX}NAMESPACE).",
    )
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=_split(_env(env, "NAMESPACE")),
                       help="Namespace to watch (repeatable, or comma-separated in the environment).")
    scope.add_argument("-A", "--all-namespaces", action="store_true",
                       default=_env(env, "ALL_NAMESPACES", "") in ("1", "true", "yes"),
                       help="Watch every namespace (the default when no namespace is given).")
    p.add_argument("--trainer-image", default=_env(env, "TRAINER_IMAGE", DEFAULT_TRAINER_IMAGE),
                   help="Trainer image for jobs that do not set spec.image.")
    p.add_argument("--metrics-port", type=int, default=int(_env(env, "METRICS_PORT", str(OPERATOR_METRICS_PORT)) or 0),
                   help="Port of the Prometheus /metrics endpoint (0 disables it).")
    p.add_argument("--health-port", type=int, default=int(_env(env, "HEALTH_PORT", str(OPERATOR_HEALTH_PORT)) or 0),
                   help="Port of /healthz (liveness) and /readyz (0 disables them).")
    p.add_argument("--stall-timeout", type=float, default=float(_env(env, "STALL_TIMEOUT", "1800") or 1800),
                   help="Seconds without step progress before a job is Stalled (runPolicy.stallTimeoutSeconds wins).")
    p.add_argument("--resync-interval", type=float, default=float(_env(env, "RESYNC_INTERVAL", "10") or 10),
                   help="Seconds between scrapes of running jobs' metrics (progress, stall watchdog).")
    p.add_argument("--bind-address", default=_env(env, "BIND_ADDRESS", "0.0.0.0"),
                   help="Address the metrics and health servers listen on.")
    ha = p.add_mutually_exclusive_group()
    ha.add_argument("--standalone", action="store_true", default=False,
                    help="One replica, no leader election (the default).")
    ha.add_argument("--leader-elect", action="store_true",
                    default=_env(env, "LEADER_ELECT", "") in ("1", "true", "yes"),
                    help="Run several replicas: only the holder of a Lease works, the others wait.")
    p.add_argument("--leader-election-namespace",
                   default=_env(env, "LEADER_ELECTION_NAMESPACE", env.get("POD_NAMESPACE")),
                   help="Namespace of the Lease (default: $POD_NAMESPACE, else the first watched namespace).")
    p.add_argument("--leader-election-name", default=_env(env, "LEADER_ELECTION_NAME", "finetune-operator"),
                   help="Name of the Lease.")
    p.add_argument("--lease-duration", type=float, default=float(_env(env, "LEASE_DURATION", "15") or 15),
                   help="Seconds a leader's Lease lasts without renewal.")
    p.add_argument("--propagate-prefix", action="append", default=_split(_env(env, "PROPAGATE_PREFIXES")),
                   help="Copy FineTuneJob annotations and labels with this key prefix onto the trainer pods.")
    p.add_argument("--scrape-url-annotation", default=_env(env, "SCRAPE_URL_ANNOTATION"),
                   help="Pod annotation that overrides the trainer metrics URL (for tests with fake pods).")
    pol = p.add_argument_group("policy", "What a FineTuneJob may ask for; anything else fails it with InvalidSpec.")
    _list_flag(pol, env, "allowed-images", (),
               "Images spec.image may name besides --trainer-image: exact references, a repository without "
               "tag (any tag or digest of it), or a prefix ending in '/'.")
    _list_flag(pol, env, "allowed-priority-classes", (), "PriorityClasses spec.resources.priorityClassName may name.")
    _list_flag(pol, env, "allowed-toleration-keys", DEFAULT_TOLERATION_KEYS,
               "Taint keys spec.resources.tolerations may tolerate (never control-plane taints).")
    _list_flag(pol, env, "allowed-node-selector-keys", DEFAULT_NODE_SELECTOR_KEYS,
               "Node labels spec.resources.nodeSelector may use (never control-plane labels).")
    pods = p.add_argument_group("trainer pods", "Defaults of the pods the operator creates.")
    d = PodDefaults()
    for flag, default, what in (
        ("cpu-per-gpu", d.cpu_per_gpu, "CPU request per GPU when spec.resources.cpu is not set."),
        ("memory-per-gpu", d.memory_per_gpu, "Memory request per GPU when spec.resources.memory is not set."),
        ("cpu-without-gpu", d.cpu_without_gpu, "CPU request of a pod without GPUs when spec.resources.cpu is not set."),
        ("memory-without-gpu", d.memory_without_gpu,
         "Memory request of a pod without GPUs when spec.resources.memory is not set."),
        ("shm-size", d.shm_size, "sizeLimit of the in-memory /dev/shm."),
        ("scratch-size", d.scratch_size,
         "sizeLimit of /scratch and the pod's ephemeral-storage request, unless the spec sets it."),
    ):
        pods.add_argument(f"--trainer-{flag}", type=_quantity,
                          default=_env(env, "TRAINER_" + flag.upper().replace("-", "_"), default), help=what)
    pods.add_argument("--trainer-network-policy", action="store_true",
                      default=_env(env, "TRAINER_NETWORK_POLICY", "") in ("1", "true", "yes"),
                      help="Create a NetworkPolicy per job: its trainer pods accept connections only from each other "
                      "(the chart's namespace policy adds the operator and Prometheus on the metrics port).")
    pods.add_argument("--credentials-as-files", action="store_true",
                      default=_env(env, "CREDENTIALS_AS_FILES", "") in ("1", "true", "yes"),
                      help=f"Mount the output's credentials Secret as files under {CREDENTIALS_MOUNT_DIR} "
                      "instead of passing its keys as environment variables.")
    mc = p.add_argument_group("model cache", "A model and dataset cache shared by trainer pods (off unless a "
                              "claim or host path is given).")
    where = mc.add_mutually_exclusive_group()
    where.add_argument("--model-cache-claim", default=_env(env, "MODEL_CACHE_CLAIM") or None,
                       help="ReadWriteMany PersistentVolumeClaim of this name in each job's namespace.")
    where.add_argument("--model-cache-host-path", default=_env(env, "MODEL_CACHE_HOST_PATH") or None,
                       help="Node-local folder (writable by the trainer's uid) instead of a claim.")
    mc.add_argument("--model-cache-size", type=_bytes, default=_env(env, "MODEL_CACHE_SIZE") or None,
                    help="Budget of the cache (e.g. 500Gi); least recently used entries are evicted beyond it.")
    mc.add_argument("--model-cache-scope", choices=CACHE_SCOPES, default=_env(env, "MODEL_CACHE_SCOPE", "namespace"),
                    help="namespace: each namespace sees only its own entries (default); cluster: all share them.")
    pf = p.add_argument_group("preflight", "The CPU pod that checks a job's data and memory plan before its GPU Job "
                              "(spec.preflight).")
    d2 = PreflightOptions()
    for flag, default, what in (
        ("cpu", d2.cpu, "CPU request of the preflight pod."),
        ("memory", d2.memory, "Memory request of the preflight pod."),
        ("memory-limit", d2.memory_limit, "Memory limit of the preflight pod."),
        ("scratch-size", d2.scratch_size, "sizeLimit of its /scratch (downloaded data) and its ephemeral-storage request."),
    ):
        pf.add_argument(f"--preflight-{flag}", type=_quantity,
                        default=_env(env, "PREFLIGHT_" + flag.upper().replace("-", "_"), default), help=what)
    pf.add_argument("--preflight-timeout", type=int,
                    default=int(_env(env, "PREFLIGHT_TIMEOUT", str(d2.timeout_seconds)) or d2.timeout_seconds),
                    help="Seconds the preflight Job may take (also waiting to be scheduled) before the job fails "
                    "with PreflightFailed.")
    pf.add_argument("--preflight-gpu-memory", type=_gpu_memory, default=_gpu_memory(_env(env, "PREFLIGHT_GPU_MEMORY", "")),
                    help="GPU memory per node pool, checked against the memory plan: comma-separated "
                    "PRODUCT=SIZE, PRODUCT being the nvidia.com/gpu.product label value a job's nodeSelector names, "
                    "and default=SIZE for the others (e.g. NVIDIA-H200=141Gi,NVIDIA-A100-SXM4-40GB=40Gi,default=80Gi). "
                    "A nodeSelector on nvidia.com/gpu.memory (MiB) is used as given. Without a size the plan is "
                    "reported without a verdict.")
    return p


def _gpu_memory(value: str | None) -> GpuMemory:
    """PRODUCT=SIZE,...,default=SIZE -> GpuMemory; argparse's error for anything else."""
    by_product: list[tuple[str, str]] = []
    default = None
    for item in _split(value):
        product, sep, size = item.partition("=")
        if not sep or not product.strip():
            raise argparse.ArgumentTypeError(f"{item!r}: expected PRODUCT=SIZE or default=SIZE (e.g. NVIDIA-H200=141Gi)")
        size = _quantity(size.strip())
        if product.strip() == "default":
            default = size
        else:
            by_product.append((product.strip(), size))
    return GpuMemory(by_product=tuple(by_product), default=default)


def _bytes(value: str) -> int:
    try:
        return parse_bytes(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_settings(argv: list[str], env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    args = build_parser(env).parse_args(argv)
    namespaces = tuple(dict.fromkeys(args.namespace))
    return Settings(
        namespaces=() if args.all_namespaces else namespaces,
        all_namespaces=bool(args.all_namespaces or not namespaces),
        trainer_image=args.trainer_image,
        metrics_port=args.metrics_port,
        health_port=args.health_port,
        stall_timeout=args.stall_timeout,
        resync_interval=args.resync_interval,
        leader_elect=bool(args.leader_elect and not args.standalone),
        leader_election_namespace=args.leader_election_namespace or (namespaces[0] if namespaces else "default"),
        leader_election_name=args.leader_election_name,
        lease_duration=args.lease_duration,
        propagate_prefixes=tuple(args.propagate_prefix),
        scrape_url_annotation=args.scrape_url_annotation,
        bind_address=args.bind_address,
        allowed_images=args.allowed_images,
        allowed_priority_classes=args.allowed_priority_classes,
        allowed_toleration_keys=args.allowed_toleration_keys,
        allowed_node_selector_keys=args.allowed_node_selector_keys,
        pod_defaults=PodDefaults(
            cpu_per_gpu=args.trainer_cpu_per_gpu,
            memory_per_gpu=args.trainer_memory_per_gpu,
            cpu_without_gpu=args.trainer_cpu_without_gpu,
            memory_without_gpu=args.trainer_memory_without_gpu,
            shm_size=args.trainer_shm_size,
            scratch_size=args.trainer_scratch_size,
            credentials_as_files=bool(args.credentials_as_files),
            network_policy=bool(args.trainer_network_policy),
            model_cache=_model_cache(args),
        ),
        preflight=PreflightOptions(
            cpu=args.preflight_cpu,
            memory=args.preflight_memory,
            memory_limit=args.preflight_memory_limit,
            scratch_size=args.preflight_scratch_size,
            timeout_seconds=args.preflight_timeout,
            gpu_memory=args.preflight_gpu_memory,
        ),
    )


def _model_cache(args: argparse.Namespace) -> ModelCache | None:
    if not (args.model_cache_claim or args.model_cache_host_path):
        return None
    size = args.model_cache_size
    return ModelCache(claim_name=args.model_cache_claim, host_path=args.model_cache_host_path,
                      max_bytes=_bytes(size) if isinstance(size, str) else size, scope=args.model_cache_scope)


_current: list[Settings] = [Settings()]


def current() -> Settings:
    """The settings the running operator was started with."""
    return _current[0]


def install(settings: Settings) -> None:
    _current[0] = settings
