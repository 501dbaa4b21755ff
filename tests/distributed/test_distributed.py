"""Distributed training on CPU: the launcher, DDP, FSDP2 and DeepSpeed ZeRO with 2 gloo processes.

Two processes share the machine's 2 cores; the tiny random Llama keeps each run to seconds of
compute (most of the time is importing torch and transformers in each process).
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from finetune_api import parse_spec
from finetune_api.constants import Env, ExitCode
from finetune_trainer import distributed, launcher
from finetune_trainer.errors import ConfigError

WORKER = Path(__file__).with_name("worker.py")
REPO = Path(__file__).resolve().parents[2]
STEPS = 4
FULL = {"type": "full"}
LORA = {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FINETUNE_", "RANK", "WORLD_SIZE", "LOCAL_"))}
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
                "PYTHONPATH": str(REPO / "tests")})
    return env


def run_worker(tmp: Path, name: str, spec: dict[str, Any], nproc: int) -> dict[str, Any]:
    spec_path, report = tmp / f"{name}.json", tmp / f"{name}-report.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, str(WORKER), str(spec_path), str(report)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(free_port()), *cmd[1:]]
    proc = subprocess.run(cmd, env=base_env(), capture_output=True, text=True, timeout=600)
    assert report.exists(), f"{name} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return dict(json.loads(report.read_text()))


def job(make_spec: Any, out: Path, method: dict[str, Any], batch: int, dist: dict[str, Any] | None = None) -> dict[str, Any]:
    # evaluation left at its defaults: the base model is evaluated before training (baseline: true).
    return make_spec(
        out, method=method, hyperparameters={"maxSteps": STEPS, "batchSize": batch},
        distributed=dist or {"strategy": "ddp"}, checkpointing={"everySteps": 1000},
    )


# --- launcher and configuration (fast) -------------------------------------------------------


def test_rendezvous_from_operator_env() -> None:
    env = {Env.NUM_NODES: "2", Env.JOB_COMPLETION_INDEX: "1", Env.NPROC_PER_NODE: "8",
           Env.MASTER_ADDR: "j-0.j", Env.MASTER_PORT: "29500", Env.RDZV_TIMEOUT: "300"}
    r = launcher.Rendezvous.from_env(env)
    assert (r.num_nodes, r.node_rank, r.nproc_per_node, r.world_size) == (2, 1, 8, 16)
    cmd = launcher.torchrun_command(r, ["--max-steps", "3"])
    joined = " ".join(cmd)
    for part in ("--nnodes 2", "--node-rank 1", "--nproc-per-node 8", "--master-addr j-0.j",
                 "--master-port 29500", "--rdzv-conf timeout=300", "--max-restarts 0"):
        assert part in joined
    assert cmd[-2:] == ["--max-steps", "3"]
    # A single process on one node trains in-process, no torchrun.
    assert launcher.maybe_launch([], {Env.NUM_NODES: "1", Env.NPROC_PER_NODE: "1"}) is None
    assert launcher.maybe_launch([], {**env, launcher.LAUNCHED_ENV: "1"}) is None


@pytest.mark.parametrize("env, field", [
    ({Env.NUM_NODES: "two"}, Env.NUM_NODES),
    ({Env.NUM_NODES: "2", Env.NODE_RANK: "2", Env.MASTER_ADDR: "a"}, Env.NODE_RANK),
    ({Env.NUM_NODES: "2", Env.NODE_RANK: "0"}, Env.MASTER_ADDR),
    ({Env.NPROC_PER_NODE: "0"}, Env.NPROC_PER_NODE),
])
def test_bad_rendezvous_env_is_a_config_error(env: dict[str, str], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        launcher.Rendezvous.from_env(env)


def test_exit_code_judged_by_what_ranks_recorded() -> None:
    # DeepSpeed's abort at exit (SIGABRT) after every rank finished: success.
    assert launcher.decide(-6, {0: 0, 1: 0}, 2) == 0
    # A permanent error on any rank is passed through so the Job fails at once.
    assert launcher.decide(1, {0: 0, 1: ExitCode.PERMANENT}, 2) == ExitCode.PERMANENT
    assert launcher.decide(1, {0: ExitCode.PREEMPTED}, 2) == ExitCode.PREEMPTED
    # A rank that died without recording (OOM-kill, signal) fails the pod: the Job restarts the group.
    assert launcher.decide(1, {0: 0}, 2) == 1
    assert launcher.decide(-9, {}, 2) == 1
    assert launcher.decide(0, {}, 1) == 1


def test_strategy_to_trainer_kwargs(make_spec: Any, tmp_path: Path) -> None:
    ddp = parse_spec(job(make_spec, tmp_path, FULL, 4, {"strategy": "ddp", "timeoutSeconds": 120}))
    assert distributed.training_args_kwargs(ddp)["ddp_timeout"] == 120
    assert distributed.backend(ddp) == "gloo"
    fsdp = parse_spec(job(make_spec, tmp_path, FULL, 4, {"strategy": "fsdp", "fsdp": {"reshardAfterForward": False}}))
    cfg = distributed.fsdp_config(fsdp)
    assert cfg["version"] == 2 and cfg["reshard_after_forward"] is False and cfg["cpu_ram_efficient_loading"] is True
    ds = parse_spec(job(make_spec, tmp_path, FULL, 4, {"strategy": "deepspeed", "deepspeed": {
        "zeroStage": 3, "offloadOptimizer": True, "offloadParams": True}}))
    kw = distributed.training_args_kwargs(ds)
    zero = kw["deepspeed"]["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "cpu"
    assert zero["offload_optimizer"]["device"] == "cpu" and kw["deepspeed"]["optimizer"]["type"] == "AdamW"
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert kw["use_cpu"] is False  # accelerate drops DeepSpeed under cpu=True
    ds2 = distributed.deepspeed_config(parse_spec(job(make_spec, tmp_path, FULL, 4, {"strategy": "deepspeed"})))
    assert ds2["zero_optimization"]["stage"] == 2 and "offload_param" not in ds2["zero_optimization"]


# --- two processes vs one (slow) -----------------------------------------------------------


@pytest.fixture(scope="module")
def baselines(make_spec: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[float]]:
    """Loss per step of one process with the global batch (8) that two processes of 4 share."""
    tmp = tmp_path_factory.mktemp("one-process")
    return {
        # One output each: the recipe resumes from checkpoints it finds under its output.
        name: run_worker(tmp, name, job(make_spec, tmp / f"out-{name}", method, 8), 1)["losses"]
        for name, method in (("full", FULL), ("lora", LORA))
    }


@pytest.fixture(scope="module")
def base_eval_loss(make_spec: Any, tmp_path_factory: pytest.TempPathFactory) -> float:
    """The base model's held-out loss from trainer.evaluate in one process, in batches of 4 rows.

    The Trainer's evaluation loss is the mean over batches of each batch's per-token mean. Two
    processes with batches of 4 evaluate the same batches (dealt alternately; accelerate pads the
    last round with repeated rows and drops their losses when it gathers), so they must give this
    number; one process with batches of 8 weights the tokens differently (differs by ~1e-4 here).
    """
    tmp = tmp_path_factory.mktemp("one-process-base")
    one = run_worker(tmp, "base", job(make_spec, tmp / "out", FULL, 4), 1)
    assert not one["deepspeed_enabled"] and not one["fsdp_enabled"]
    return float(one["metrics"]["base"]["evalLoss"])


def assert_same_trajectory(two: dict[str, Any], one: list[float]) -> None:
    assert two["world_size"] == 2  # not silently one process
    assert len(two["losses"]) == len(one) == STEPS
    assert two["losses"] == pytest.approx(one, abs=2e-3), (two["losses"], one)
    assert two["losses"][-1] < two["losses"][0]
    # One model: both ranks end with the same trained weights.
    sums = [held["trained_sum"] for held in two["ranks"]]
    assert sums[0] == pytest.approx(sums[1], rel=1e-9, abs=1e-9), sums


def assert_base_evaluated(two: dict[str, Any], base_eval_loss: float) -> None:
    """The default baseline ran through the recipe and gave the one-process number.

    With two processes the base is evaluated once train() has started (recipes.base.
    evaluate_before_training): before it, the Trainer fails under DeepSpeed and FSDP2, and under DDP
    leaves the model unwrapped (no gradient averaging, which assert_same_trajectory catches)."""
    base = two["metrics"]["base"]
    assert base["evalLoss"] == pytest.approx(base_eval_loss, abs=1e-5), (base, base_eval_loss)
    assert base["perplexity"] == pytest.approx(math.exp(base_eval_loss), rel=1e-4)
    assert two["metrics"]["tuned"]["evalLoss"] < base["evalLoss"]


def assert_saved_trained(two: dict[str, Any]) -> dict[str, Any]:
    """The artifact holds the trained weights, complete; with sharded parameters only rank 0 wrote."""
    saved = two["saved"]
    assert saved["tensors"] == saved["matched_trained"] > 0 and saved["empty"] == 0
    assert saved["max_abs_diff_trained"] < 1e-6
    assert "training_args.bin" not in saved["files"]
    if two["fsdp_enabled"] or any(held["params"] for held in two["ranks"]):  # FSDP2, ZeRO-3
        assert two["ranks"][1]["weight_files"] == []
    return dict(saved)


@pytest.mark.slow
@pytest.mark.parametrize("name, method, strategy", [
    ("ddp-full", FULL, {"strategy": "ddp"}),
    ("ddp-lora", LORA, {"strategy": "ddp"}),
    ("fsdp-full", FULL, {"strategy": "fsdp"}),
    ("fsdp-lora", LORA, {"strategy": "fsdp"}),
])
def test_two_processes_match_one(name: str, method: dict[str, Any], strategy: dict[str, Any], make_spec: Any,
                                 baselines: dict[str, list[float]], base_eval_loss: float, tmp_path: Path) -> None:
    spec = job(make_spec, tmp_path / "out", method, 4, strategy)
    if method is LORA:
        spec["output"]["save"] = ["adapter", "merged"]
    two = run_worker(tmp_path, name, spec, 2)
    assert_same_trajectory(two, baselines["lora" if method is LORA else "full"])
    assert_base_evaluated(two, base_eval_loss)
    if strategy["strategy"] == "fsdp":
        # The Trainer on CPU silently runs DDP unless FSDP is forced on: prove real sharding.
        assert two["fsdp_enabled"]
        assert two["sharded_params"] == two["params"] > 0
        assert two["local_numel"] * 2 <= two["total_numel"] + 2 * two["params"]
    else:
        assert two["sharded_params"] == 0
    # What the recipe saved is what was trained (FSDP2: gathered by the Trainer's save_model; the
    # model's own save_pretrained of DTensor shards fails on CPU with "invalid python storage").
    saved = assert_saved_trained(two)
    if method is FULL:
        assert saved["numel"] == two["total_numel"]
    else:
        merged = saved["merged"]  # base + adapter, built by rank 0 alone
        assert merged["tensors"] == merged["base_tensors"] > 0 and merged["same_shapes"] and merged["empty"] == 0
        assert len(merged["changed"]) * 2 == saved["tensors"]  # one base weight per LoRA (A, B) pair


@pytest.mark.slow
@pytest.mark.parametrize("stage, method", [
    pytest.param(2, FULL, id="2"),
    pytest.param(3, FULL, id="3"),
    pytest.param(3, LORA, id="3-lora"),
])
def test_deepspeed_zero_on_cpu(stage: int, method: dict[str, Any], make_spec: Any, baselines: dict[str, list[float]],
                               base_eval_loss: float, tmp_path: Path) -> None:
    # DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu) works at 0.19.8; its first use compiles
    # C++ ops with g++ (cached in ~/.cache/torch_extensions). Without
    # distributed.enable_cpu_deepspeed accelerate's state has no backend here: every rank counts
    # itself as process 0 of 1 and TRL's first gather fails.
    strategy = {"strategy": "deepspeed", "deepspeed": {"zeroStage": stage}}
    spec = job(make_spec, tmp_path / "out", method, 4, strategy)
    if method is LORA:
        spec["output"]["save"] = ["adapter", "merged"]
    two = run_worker(tmp_path, f"zero{stage}-{method['type']}", spec, 2)
    assert two["deepspeed_enabled"]
    assert two["accelerate_processes"] == 2
    assert_same_trajectory(two, baselines["lora" if method is LORA else "full"])
    # The default baseline: the Trainer cannot evaluate before train() under DeepSpeed (ZeRO-2: "ZeRO
    # inference only makes sense with ZeRO Stage 3"; ZeRO-3: train() then fails in backward).
    assert_base_evaluated(two, base_eval_loss)
    ranks = two["ranks"]
    assert len(ranks) == 2
    if stage == 3:
        # Really partitioned: on each rank DeepSpeed manages every parameter and holds half of it.
        for held in ranks:
            assert held["params"] == two["params"] > 0
            assert held["partition_numel"] * 2 <= held["full_numel"] + 2 * held["params"]
            assert held["partition_numel"] < held["full_numel"]
    else:
        assert all(held["params"] == 0 for held in ranks)
    # The artifact holds the trained weights, gathered (save_pretrained of ZeRO-3 slices: empty tensors).
    saved = assert_saved_trained(two)
    if method is FULL:
        assert saved["numel"] == (ranks[0]["full_numel"] if stage == 3 else two["total_numel"])
    else:
        merged = saved["merged"]  # base + adapter, built by rank 0 alone (no ZeRO-3 init there)
        assert merged["tensors"] == merged["base_tensors"] > 0 and merged["same_shapes"] and merged["empty"] == 0
        assert len(merged["changed"]) * 2 == saved["tensors"]  # one base weight per LoRA (A, B) pair


# --- two simulated nodes from the operator's Job builder (slow) ---------------------------


def pod_env(job_manifest: dict[str, Any], index: int) -> dict[str, str]:
    """The container env the kubelet would give pod `index` of the Indexed Job, resolved."""
    from finetune_operator.builders import COMPLETION_INDEX_ANNOTATION

    annotations = {COMPLETION_INDEX_ANNOTATION: str(index)}
    container = job_manifest["spec"]["template"]["spec"]["containers"][0]
    env: dict[str, str] = {}
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
            continue
        path = item["valueFrom"]["fieldRef"]["fieldPath"]
        key = re.fullmatch(r"metadata\.annotations\['(.+)'\]", path)
        assert key, f"unexpected fieldRef {path}"
        env[item["name"]] = annotations[key.group(1)]
    # The Job controller adds this one to every container of an Indexed Job.
    env[Env.JOB_COMPLETION_INDEX] = str(index)
    return env


@pytest.mark.slow
def test_two_nodes_rendezvous_from_builder_env(make_spec: Any, tmp_path: Path) -> None:
    from finetune_api.constants import MANIFEST_FILE, SCRATCH_DIR, SPEC_MOUNT_DIR
    from finetune_operator.builders import BuildOptions, Owner, build_config_map, build_job

    out = tmp_path / "artifact"
    wire = job(make_spec, out, LORA, 4)
    wire["resources"] = {"nodes": 2, "gpusPerNode": 1}  # rendered as 1 process per pod
    spec = parse_spec(wire)
    owner = Owner(name="two-nodes", namespace="default", uid="0000")
    manifest = build_job(owner, spec, BuildOptions(trainer_image="unused"))
    config_map = build_config_map(owner, spec)
    procs = []
    for index in (0, 1):
        env = pod_env(manifest, index)
        # The only rewrites: rank 0's address is the pod's DNS name under the headless Service,
        # which resolves only in a cluster -> loopback; and the pod's mounts (/etc/finetune,
        # /scratch) are folders of this test, one "container filesystem" per pod.
        env[Env.MASTER_ADDR] = "127.0.0.1"
        root = tmp_path / f"pod-{index}"
        for name, value in env.items():
            if value.startswith((SPEC_MOUNT_DIR, SCRATCH_DIR)):
                env[name] = str(root) + value
        spec_file = Path(env[Env.SPEC_PATH])
        spec_file.parent.mkdir(parents=True, exist_ok=True)
        spec_file.write_text(next(iter(config_map["data"].values())))
        env[Env.TERMINATION_LOG] = str(root / "termination-log")
        full_env = {**base_env(), **env}
        procs.append(subprocess.Popen([sys.executable, "-m", "finetune_cli.main", "train", "--max-steps", "1"],
                                      env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for index, (p, log) in enumerate(zip(procs, logs, strict=True)):
        assert p.returncode == 0, f"pod {index} exited {p.returncode}:\n{log[-6000:]}"
        assert f"on node {index} of 2 (world size 2" in log
        # Each pod's single process was global rank == its node index: one group of two.
        assert f"ranks recorded {{{index}: 0}}" in log
    assert (out / MANIFEST_FILE).exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 1
    message = json.loads((tmp_path / "pod-0" / "termination-log").read_text())
    assert message["outcome"] == "succeeded"
