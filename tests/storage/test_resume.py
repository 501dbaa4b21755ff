"""Preemption and resume with a real HF Trainer in subprocesses.

SIGTERM at a random step -> checkpoint at the next step boundary, exit code PREEMPTED; the
restarted run resumes from it; a later SIGKILL at a random step loses at most one checkpoint
interval; the final weights and losses equal those of an uninterrupted run with the same seed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from finetune_api.constants import Env, ExitCode, Reason
from finetune_api.status import TerminationMessage
from finetune_trainer import storage

SCRIPT = Path(__file__).with_name("resume_script.py")
MAX_STEPS, SAVE_STEPS = 20, 4


@dataclass
class Run:
    returncode: int
    steps: list[int] = field(default_factory=list)
    resumed_from: str = ""
    signalled_at: int | None = None
    log: str = ""


def run(
    tmp: Path,
    checkpoints: str,
    name: str,
    env: dict[str, str],
    stop_at: int | None = None,
    sig: int = signal.SIGTERM,
) -> Run:
    """Run the script; send `sig` as soon as it reports step `stop_at`."""
    err = tmp / f"{name}.stderr"
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--checkpoints",
        checkpoints,
        "--workdir",
        str(tmp / name),
        "--result",
        str(tmp / f"{name}.json"),
        "--max-steps",
        str(MAX_STEPS),
        "--save-steps",
        str(SAVE_STEPS),
    ]
    result = Run(returncode=-999)
    with open(err, "wb") as stderr:
        env = {**env, Env.TERMINATION_LOG: str(tmp / f"{name}.termination")}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, env=env, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("RESUME "):
                result.resumed_from = line.split()[1]
            if line.startswith("STEP "):
                step = int(line.split()[1])
                result.steps.append(step)
                if stop_at is not None and result.signalled_at is None and step >= stop_at:
                    proc.send_signal(sig)
                    result.signalled_at = step
        result.returncode = proc.wait(timeout=600)
    result.log = err.read_text()[-3000:]
    return result


@pytest.fixture
def run_env() -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def assert_same_result(tmp: Path, a: str, b: str) -> None:
    wa, wb = torch.load(tmp / f"{a}.pt"), torch.load(tmp / f"{b}.pt")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=f"weights differ in {k}")
    la = json.loads((tmp / f"{a}.json").read_text())["losses"]
    lb = json.loads((tmp / f"{b}.json").read_text())["losses"]
    assert lb, "the resumed run logged no loss"
    for step, loss in lb.items():
        assert loss == pytest.approx(la[step], rel=1e-5), f"loss at step {step}"
    assert lb[str(MAX_STEPS)] == pytest.approx(la[str(MAX_STEPS)], rel=1e-5)


def preempt_and_resume(tmp: Path, checkpoints: str, env: dict[str, str]) -> None:
    rng = random.Random()
    baseline = run(tmp, f"file://{tmp}/baseline-ckpt", "baseline", env)
    assert baseline.returncode == 0, baseline.log
    assert baseline.steps == list(range(1, MAX_STEPS + 1))

    # 1. SIGTERM at a random step: checkpoint at the next step boundary, exit PREEMPTED.
    k1 = rng.randint(2, 9)
    first = run(tmp, checkpoints, "first", env, stop_at=k1, sig=signal.SIGTERM)
    assert first.returncode == ExitCode.PREEMPTED, (
        f"SIGTERM at step {k1}: exit {first.returncode}\n{first.log}"
    )
    saved = storage.list_complete_checkpoints(checkpoints)
    s1 = saved[-1][0]
    assert s1 == first.steps[-1], f"the checkpoint ({s1}) must hold every finished step ({first.steps[-1]})"
    assert s1 >= k1 and s1 < MAX_STEPS
    storage.verify(saved[-1][1])
    message = TerminationMessage.model_validate_json((tmp / "first.termination").read_bytes())
    assert (message.outcome, message.reason) == ("preempted", Reason.PREEMPTED)
    assert message.last_checkpoint is not None
    assert (message.last_checkpoint.step, message.last_checkpoint.uri) == saved[-1]

    # 2. Restart: resumes exactly there (no work lost); SIGKILL later, with no chance to save.
    k2 = rng.randint(s1 + 2, MAX_STEPS - 2)
    second = run(tmp, checkpoints, "second", env, stop_at=k2, sig=signal.SIGKILL)
    assert second.resumed_from == str(s1), second.log
    assert second.steps[0] == s1 + 1, f"resumed at {second.steps[0]}, checkpoint was {s1}"
    assert second.returncode == -signal.SIGKILL, second.log
    killed_at = second.steps[-1]

    # 3. Restart: resumes from the newest complete checkpoint, at most one interval back.
    latest = storage.list_complete_checkpoints(checkpoints)[-1][0]
    third = run(tmp, checkpoints, "third", env)
    assert third.returncode == 0, third.log
    assert third.resumed_from == str(latest)
    assert third.steps[0] == latest + 1
    assert 0 <= killed_at - latest <= SAVE_STEPS, f"lost {killed_at - latest} steps (killed at {killed_at})"
    assert third.steps[-1] == MAX_STEPS
    assert len(storage.list_complete_checkpoints(checkpoints)) <= 2  # keep=2

    assert_same_result(tmp, "baseline", "third")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_preempted_run_resumes_to_the_same_result_local(tmp_path: Path, run_env: dict[str, str]) -> None:
    preempt_and_resume(tmp_path, f"file://{tmp_path}/checkpoints", run_env)
