"""The pod's rendezvous environment -> a torchrun launch of `finetune train`, one process per GPU.

The operator sets FINETUNE_NUM_NODES, FINETUNE_NODE_RANK (the Job completion index),
FINETUNE_NPROC_PER_NODE, FINETUNE_MASTER_ADDR/PORT (pod 0 through the headless Service) and
FINETUNE_RDZV_TIMEOUT_SECONDS. With a world size of 1 the entry point trains in-process; otherwise
`maybe_launch` re-executes it under torchrun (static rendezvous, no elastic restarts: the Job
restarts the whole group) and returns the pod's exit code.

Each rank runs `python -m finetune_trainer.entrypoint` (RANK_MODULE), whose `__main__` hands its
`main` to `run_rank`: this module never imports the entry point, which imports it. Every rank
records its own exit code in a file before leaving (`run_rank`), and leaves with
os._exit: DeepSpeed sometimes aborts at interpreter exit after a finished run ("terminate called
without an active exception"), so the pod's outcome is judged from what the ranks recorded, not
only from torchrun's exit status. A permanent error (42) or preemption (43) of any local rank is
passed through; any other failure is non-zero, so the Job restarts the group.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from finetune_api.constants import RENDEZVOUS_PORT, Env, ExitCode

from .errors import ConfigError

log = logging.getLogger(__name__)

#: Set in the processes torchrun starts: they train instead of launching again.
LAUNCHED_ENV = "FINETUNE_LAUNCHED"
#: The module torchrun runs in each rank: the entry point, run as __main__, calls run_rank(main).
RANK_MODULE = "finetune_trainer.entrypoint"
#: Folder where each rank records its exit code (rank-<RANK>.json).
RESULTS_ENV = "FINETUNE_RANK_RESULTS"
DEFAULT_RDZV_TIMEOUT = 1800


@dataclass(frozen=True)
class Rendezvous:
    num_nodes: int
    node_rank: int
    nproc_per_node: int
    master_addr: str
    master_port: int
    timeout_seconds: int

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.nproc_per_node

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Rendezvous:
        """Read the operator's environment; unset values mean a single process on this machine."""
        env = os.environ if env is None else env

        def integer(name: str, default: int, minimum: int) -> int:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            try:
                value = int(raw)
            except ValueError:
                raise ConfigError(f"environment {name}={raw!r}: not an integer") from None
            if value < minimum:
                raise ConfigError(f"environment {name}={value}: must be at least {minimum}")
            return value

        num_nodes = integer(Env.NUM_NODES, 1, 1)
        # The operator maps the completion index into NODE_RANK; JOB_COMPLETION_INDEX is the
        # Job controller's own copy of it.
        node_rank = integer(Env.NODE_RANK, integer(Env.JOB_COMPLETION_INDEX, 0, 0), 0)
        if node_rank >= num_nodes:
            raise ConfigError(f"environment {Env.NODE_RANK}={node_rank}: must be below {Env.NUM_NODES}={num_nodes}")
        master_addr = env.get(Env.MASTER_ADDR, "").strip() or "127.0.0.1"
        if num_nodes > 1 and not env.get(Env.MASTER_ADDR, "").strip():
            raise ConfigError(f"environment {Env.MASTER_ADDR} is not set: {num_nodes} nodes need rank 0's address")
        return cls(
            num_nodes=num_nodes,
            node_rank=node_rank,
            nproc_per_node=integer(Env.NPROC_PER_NODE, 1, 1),
            master_addr=master_addr,
            master_port=integer(Env.MASTER_PORT, RENDEZVOUS_PORT, 1),
            timeout_seconds=integer(Env.RDZV_TIMEOUT, DEFAULT_RDZV_TIMEOUT, 1),
        )


def torchrun_command(rdzv: Rendezvous, argv: list[str]) -> list[str]:
    """torchrun (static rendezvous at rank 0's address) running the entry point with `argv` in each rank."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", str(rdzv.num_nodes),
        "--node-rank", str(rdzv.node_rank),
        "--nproc-per-node", str(rdzv.nproc_per_node),
        "--master-addr", rdzv.master_addr,
        "--master-port", str(rdzv.master_port),
        "--rdzv-conf", f"timeout={rdzv.timeout_seconds}",
        # A failed rank fails the pod; the Job (backoffLimit) restarts the whole group.
        "--max-restarts", "0",
        "--monitor-interval", "1",
        "-m", RANK_MODULE,
        *argv,
    ]


def child_env(base: Mapping[str, str], results: Path) -> dict[str, str]:
    env = dict(base)
    env[LAUNCHED_ENV] = "1"
    env[RESULTS_ENV] = str(results)
    if not _has_cuda():
        # DeepSpeed would otherwise probe for GPUs; its CPU accelerator uses gloo.
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def decide(torchrun_code: int, recorded: Mapping[int, int], local_ranks: int) -> int:
    """The pod's exit code from torchrun's status and the codes the local ranks recorded."""
    failed = [code for code in recorded.values() if code != ExitCode.SUCCESS]
    for special in (ExitCode.PERMANENT, ExitCode.PREEMPTED):
        if special in failed:
            return special
    if failed:
        return failed[0]
    if len(recorded) >= local_ranks:
        if torchrun_code != 0:
            log.warning("all %d local ranks finished successfully; ignoring torchrun's exit status %d "
                        "(a library aborted at interpreter exit)", local_ranks, torchrun_code)
        return ExitCode.SUCCESS
    # A rank died without recording anything (signal, OOM-kill, abort during training).
    return torchrun_code if torchrun_code > 0 else 1


def read_results(folder: Path) -> dict[int, int]:
    out = {}
    for path in folder.glob("rank-*.json"):
        doc: dict[str, Any] = json.loads(path.read_text())
        out[int(doc["rank"])] = int(doc["code"])
    return out


def launch(rdzv: Rendezvous, argv: list[str], env: Mapping[str, str] | None = None) -> int:
    """Run torchrun for this node and wait; SIGTERM/SIGINT are forwarded (preemption)."""
    with tempfile.TemporaryDirectory(prefix="finetune-ranks-") as tmp:
        cmd = torchrun_command(rdzv, argv)
        log.info("launching %d process(es) on node %d of %d (world size %d, master %s:%d): %s",
                 rdzv.nproc_per_node, rdzv.node_rank, rdzv.num_nodes, rdzv.world_size,
                 rdzv.master_addr, rdzv.master_port, " ".join(cmd))
        proc = subprocess.Popen(cmd, env=child_env(os.environ if env is None else env, Path(tmp)))

        def forward(signum: int, _frame: Any) -> None:
            proc.send_signal(signum)

        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            code = proc.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        recorded = read_results(Path(tmp))
        result = decide(code, recorded, rdzv.nproc_per_node)
        log.info("torchrun exited %d; ranks recorded %s; pod exits %d", code, recorded, result)
        return result


def maybe_launch(argv: list[str], env: Mapping[str, str] | None = None) -> int | None:
    """The pod's exit code after a torchrun launch, or None when this process should train itself."""
    env = os.environ if env is None else env
    if env.get(LAUNCHED_ENV) == "1":
        return None
    rdzv = Rendezvous.from_env(env)
    if rdzv.world_size == 1:
        return None
    return launch(rdzv, argv, env)


def run_rank(train: Callable[[list[str]], int], argv: list[str]) -> NoReturn:
    """One rank under torchrun: `train(argv)`, record the exit code, leave without interpreter teardown."""
    if os.environ.get("LOCAL_RANK", "0") != "0":
        # One termination message per pod: local rank 0 writes it.
        os.environ[Env.TERMINATION_LOG] = os.devnull
    try:
        code = train(argv)
    except SystemExit as exc:  # the preemption handler exits 43 after its checkpoint
        code = exc.code if isinstance(exc.code, int) else 1
    results = os.environ.get(RESULTS_ENV)
    if results:
        rank = int(os.environ.get("RANK", "0"))
        Path(results, f"rank-{rank}.json").write_text(json.dumps({"rank": rank, "code": code}))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
