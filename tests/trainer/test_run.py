"""`finetune run` and `finetune train` end to end: metrics endpoint, manifest, exit codes."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from finetune_api.constants import MANIFEST_FILE, METRICS_FILE, TRAINER_METRIC_PREFIX, Env, ExitCode
from finetune_api.status import TerminationMessage
from finetune_cli.main import main as finetune


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _manifest_doc(spec: dict[str, Any], name: str = "tiny") -> dict[str, Any]:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": spec}


class Scraper(threading.Thread):
    """Scrapes the trainer's /metrics over HTTP while the run goes on."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.steps: list[float] = []
        self.pages: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        pattern = re.compile(rf"^{TRAINER_METRIC_PREFIX}step (\S+)$", re.M)
        while not self.stop.is_set():
            try:
                page = httpx.get(self.url, timeout=2).text
            except httpx.HTTPError:
                time.sleep(0.05)
                continue
            m = pattern.search(page)
            if m:
                self.steps.append(float(m.group(1)))
                self.pages.append(page)
            time.sleep(0.05)


@pytest.fixture(scope="module")
def container_run(make_spec: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`finetune train` as a pod runs it: spec file, output URI and metrics port from the environment."""
    tmp = tmp_path_factory.mktemp("container")
    spec = make_spec(tmp / "ignored", hyperparameters={"maxSteps": 12})
    spec_file = tmp / "spec.json"
    spec_file.write_text(json.dumps(spec))
    port = _free_port()
    env = {
        Env.SPEC_PATH: str(spec_file),
        Env.OUTPUT_URI: str(tmp / "artifact"),
        Env.METRICS_PORT: str(port),
        Env.TERMINATION_LOG: str(tmp / "termination-log"),
    }
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    scraper = Scraper(port)
    scraper.start()
    try:
        code = finetune(["train"])
    finally:
        scraper.stop.set()
        scraper.join()
        mp.undo()
    return {"code": code, "out": tmp / "artifact", "scraper": scraper, "termination": tmp / "termination-log",
            "spec": spec, "env": env}


def test_metrics_endpoint_shows_increasing_steps(container_run: dict[str, Any]) -> None:
    assert container_run["code"] == 0
    steps = container_run["scraper"].steps
    assert len(set(steps)) >= 3, f"too few distinct steps scraped: {steps}"
    assert steps == sorted(steps) and steps[-1] > steps[0]
    page = container_run["scraper"].pages[-1]
    for name in ("total_steps 12.0", "loss ", "learning_rate ", "tokens_processed_total ", "tokens_per_second ", "epoch "):
        assert f"\n{TRAINER_METRIC_PREFIX}{name}" in page, name


def test_manifest_lists_every_file_and_is_written_last(container_run: dict[str, Any]) -> None:
    out: Path = container_run["out"]
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    listed = {f["path"]: f for f in manifest["files"]}
    # checkpoints/ is its own prefix, each step with its own manifest.
    on_disk = {p.relative_to(out).as_posix(): p for p in out.rglob("*")
               if p.is_file() and p.name != MANIFEST_FILE and not p.relative_to(out).as_posix().startswith("checkpoints/")}
    assert set(listed) == set(on_disk)
    for rel, path in on_disk.items():
        assert listed[rel]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest(), rel
        assert listed[rel]["sizeBytes"] == path.stat().st_size
    assert {"adapter_model.safetensors", "adapter_config.json", METRICS_FILE, "tokenizer.json"} <= set(listed)
    last = (out / MANIFEST_FILE).stat().st_mtime_ns
    assert all(p.stat().st_mtime_ns <= last for p in on_disk.values())
    assert manifest["spec"]["method"]["type"] == "lora"
    assert manifest["baseModel"]["architecture"] == "LlamaForCausalLM" and "configSha256" in manifest["baseModel"]
    assert {"torch", "transformers", "peft", "trl"} <= set(manifest["versions"])
    metrics = json.loads((out / METRICS_FILE).read_text())
    for section in ("base", "tuned"):
        assert set(metrics[section]) == {"evalLoss", "perplexity"}


def test_termination_message_reports_the_artifact(container_run: dict[str, Any]) -> None:
    raw = container_run["termination"].read_bytes()
    assert len(raw) <= 4096
    msg = TerminationMessage.model_validate_json(raw)
    assert msg.outcome == "succeeded" and msg.artifact is not None
    manifest_bytes = (container_run["out"] / MANIFEST_FILE).read_bytes()
    assert msg.artifact.sha256 == hashlib.sha256(manifest_bytes).hexdigest()
    assert msg.metrics["evalLoss"] < msg.metrics["baseEvalLoss"]
    # status.lastCheckpoint: the newest complete checkpoint (the Trainer saves one at the last step).
    ckpt = msg.last_checkpoint
    assert ckpt is not None and ckpt.step == 12
    assert ckpt.uri == str(container_run["out"] / "checkpoints" / "step-12")
    assert (Path(ckpt.uri) / MANIFEST_FILE).is_file()


def _train_again(container_run: dict[str, Any], tmp: Path, spec: dict[str, Any]) -> tuple[int, TerminationMessage]:
    spec_file = tmp / "spec.json"
    spec_file.write_text(json.dumps(spec))
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {**container_run["env"], Env.SPEC_PATH: str(spec_file),
                     Env.TERMINATION_LOG: str(tmp / "termination-log"), Env.METRICS_PORT: "0"}.items():
            mp.setenv(k, v)
        code = finetune(["train"])
    return code, TerminationMessage.model_validate_json((tmp / "termination-log").read_bytes())


def test_rerun_of_a_finished_job_reports_the_artifact_without_retraining(
    container_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out: Path = container_run["out"]
    files = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    first = TerminationMessage.model_validate_json(container_run["termination"].read_bytes())
    code, msg = _train_again(container_run, tmp_path, container_run["spec"])
    assert code == ExitCode.SUCCESS
    assert msg.outcome == "succeeded" and "not retrained" in msg.message
    assert msg.artifact == first.artifact and msg.metrics == first.metrics
    assert msg.last_checkpoint is not None and msg.last_checkpoint.step == 12
    # Nothing rewritten, nothing added (no new checkpoint from a resumed no-op training).
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()} == files
    # `finetune run` into the same output says so too.
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(_manifest_doc(container_run["spec"])))
    assert finetune(["run", str(manifest), "--output", str(out), "--no-progress", "--metrics-port", "0"]) == 0
    assert "not retrained" in capsys.readouterr().out


def test_rerun_with_another_spec_into_a_finished_output_is_refused(
    container_run: dict[str, Any], tmp_path: Path
) -> None:
    out: Path = container_run["out"]
    manifest_before = (out / MANIFEST_FILE).read_bytes()
    changed = {**container_run["spec"], "hyperparameters": {**container_run["spec"]["hyperparameters"], "maxSteps": 20}}
    code, msg = _train_again(container_run, tmp_path, changed)
    assert code == ExitCode.PERMANENT
    assert msg.outcome == "failed" and msg.reason == "InvalidSpec"
    assert f"{out} already holds a complete artifact" in msg.message and "hyperparameters" in msg.message
    assert (out / MANIFEST_FILE).read_bytes() == manifest_before


def test_finetune_run_trains_and_says_where_the_artifact_is(
    make_spec: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(_manifest_doc(make_spec(tmp_path / "out"))))
    code = finetune(["run", str(manifest), "--max-steps", "6", "--no-progress", "--metrics-port", "0",
                     "--output", str(tmp_path / "elsewhere")])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert re.search(r"eval loss\s+base [\d.]+ -> tuned [\d.]+", printed)
    assert str(tmp_path / "elsewhere") in printed and "PeftModel" in printed
    assert (tmp_path / "elsewhere" / MANIFEST_FILE).is_file()
    assert json.loads((tmp_path / "elsewhere" / METRICS_FILE).read_text())["train"]["steps"] == 6


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"prompt": "a", "completion": "b"}\n{"prompt": "a" "completion": "b"}\n', r"data\.jsonl: line 2, column \d+: invalid JSON"),
        ('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', r"data\.jsonl: line 2: missing column 'completion'"),
        ("", r"data\.jsonl: empty file"),
    ],
    ids=["bad-json-line", "missing-column", "empty-file"],
)
def test_corrupt_dataset_is_a_permanent_error(
    make_spec: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, expected: str
) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    spec = make_spec(tmp_path / "out", dataset={"train": str(data)})
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(_manifest_doc(spec)))
    code = finetune(["run", str(manifest), "--no-progress", "--metrics-port", "0"])
    err = capsys.readouterr().err
    assert code == ExitCode.PERMANENT
    assert re.search(expected, err), err
    assert not (tmp_path / "out" / MANIFEST_FILE).exists()


def test_bad_manifest_and_bad_spec_are_permanent(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(_manifest_doc({"model": {"uri": "/m"}})))
    assert finetune(["run", str(manifest)]) == ExitCode.PERMANENT
    assert "spec.dataset: Required value" in capsys.readouterr().err
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({"model": {"uri": "/m"}, "dataset": {"train": "/d.jsonl", "format": "text"},
                                     "method": {"type": "qlora"}, "output": {"uri": "/o"}}))
    monkeypatch.setenv(Env.SPEC_PATH, str(spec_file))
    monkeypatch.setenv(Env.TERMINATION_LOG, str(tmp_path / "term"))
    assert finetune(["train"]) == ExitCode.PERMANENT
    msg = json.loads((tmp_path / "term").read_text())
    assert msg["outcome"] == "failed" and msg["reason"] == "InvalidSpec"
    assert "qlora needs model.quantization" in msg["message"]
