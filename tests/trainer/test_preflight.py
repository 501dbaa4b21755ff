"""`finetune preflight`: each check on the tiny model, through the command a user runs."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_api.constants import API_VERSION, KIND, Env, ExitCode, Reason
from finetune_cli.main import main as finetune
from harness.model_plugin import CHATML_TEMPLATE


def _manifest(tmp_path: Path, spec: dict[str, Any]) -> Path:
    path = tmp_path / "job.yaml"
    doc = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": "preflight"}, "spec": spec}
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def preflight(tmp_path: Path, spec: dict[str, Any], capsys: pytest.CaptureFixture[str],
              *args: str) -> tuple[int, str, dict[str, Any]]:
    code = finetune(["preflight", str(_manifest(tmp_path, spec)), "--json", *args])
    captured = capsys.readouterr()
    out = captured.out + captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    return code, out, summary


def test_good_data_reports_everything_and_passes(make_spec: Callable[..., dict[str, Any]], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    spec = make_spec(tmp_path / "out", resources={"gpusPerNode": 1})
    code, out, summary = preflight(tmp_path, spec, capsys, "--gpu-memory", "80Gi")
    assert code == ExitCode.SUCCESS, out
    assert "rows: 48\n" in out and "tokens per example: p50 " in out
    assert "cut at maxSeqLength: 0.0% (0 of 48)" in out
    assert "no loss-carrying token: 0.0% (0)" in out
    assert "in the labels: yes" in out
    # The prompt is outside the marks, the completion and its EOS inside.
    assert "What color is the apple?[[ The apple is red.<|endoftext|>]]" in out
    assert "memory plan:" in out and "GPU 80.0 GiB: fits; largest batch size that fits: " in out, out
    assert "preflight: ok" in out and "warning:" not in out
    assert summary["ok"] and summary["rows"] == 48 and summary["truncatedShare"] == 0
    assert summary["tokens"] > 48 and summary["memoryPerGpuBytes"] > 0 and summary["largestBatch"] > 8


def test_big_data_is_sampled_and_says_so(make_spec: Callable[..., dict[str, Any]], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    code, out, summary = preflight(tmp_path, make_spec(tmp_path / "out"), capsys, "--sample", "10")
    assert code == ExitCode.SUCCESS
    assert "rows: 10 (the first 10 only: a sample" in out and summary["sampled"] is True


def test_eos_less_chat_template_is_warned_and_a_fixed_one_passes(make_spec: Callable[..., dict[str, Any]],
                                                                 toy_data_dir: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # The tiny tokenizer's EOS is <|endoftext|>; its ChatML template ends turns with <|im_end|> only.
    dataset = {"train": str(toy_data_dir / "messages.jsonl"), "format": "messages", "maxSeqLength": 128}
    code, out, _ = preflight(tmp_path, make_spec(tmp_path / "out", dataset=dataset), capsys)
    assert code == ExitCode.SUCCESS  # wasteful, not impossible: a warning
    assert "in the labels: NO (48 do not)" in out
    assert "warning: 48 of 48 examples have a completion that does not end with an end-of-sequence token " \
           "(<|endoftext|>)" in out
    fixed = CHATML_TEMPLATE.replace("'<|im_end|>'", "'<|im_end|>' + (eos_token if message['role'] == 'assistant' else '')")
    spec = make_spec(tmp_path / "out", dataset=dataset)
    spec["model"]["chatTemplate"] = fixed
    code, out, _ = preflight(tmp_path, spec, capsys)
    assert code == ExitCode.SUCCESS and "in the labels: yes" in out and "warning:" not in out, out
    assert "[[The apple is red.<|im_end|><|endoftext|>\n    ]]" in out  # the example is indented


def test_truncating_max_seq_length_is_warned(make_spec: Callable[..., dict[str, Any]], toy_data_dir: Path,
                                             tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = {"train": str(toy_data_dir / "text.jsonl"), "format": "text", "maxSeqLength": 8}
    code, out, summary = preflight(tmp_path, make_spec(tmp_path / "out", dataset=dataset), capsys)
    assert code == ExitCode.SUCCESS
    assert summary["truncatedShare"] > 0.5
    assert "of examples are longer than maxSeqLength 8 and are cut (p90 is " in out


def test_no_completion_tokens_fails(make_spec: Callable[..., dict[str, Any]], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    # Long prompts: maxSeqLength ends every example before its completion begins.
    rows = [{"prompt": "Please tell me: " * 6 + f"what color is thing {i}?", "completion": " Blue."} for i in range(8)]
    f = _jsonl(tmp_path / "long.jsonl", rows)
    dataset = {"train": str(f), "format": "prompt_completion", "maxSeqLength": 16}
    code, out, summary = preflight(tmp_path, make_spec(tmp_path / "out", dataset=dataset), capsys)
    assert code == ExitCode.PERMANENT
    assert f"error: {f}: no example keeps a loss-carrying token within maxSeqLength 16" in out
    assert summary["ok"] is False and summary["noLossShare"] == 1.0
    # Chat data without an assistant turn has nothing to learn either: named with file and line.
    g = _jsonl(tmp_path / "noassistant.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    code, out, summary = preflight(tmp_path, make_spec(tmp_path / "out", dataset={"train": str(g), "format": "messages"}),
                                   capsys)
    assert code == ExitCode.PERMANENT
    assert f"error: {g}: line 1: column 'messages': no assistant message to learn" in out


def test_unreadable_data_fails_with_the_loader_message(make_spec: Callable[..., dict[str, Any]], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n', encoding="utf-8")
    code, out, summary = preflight(tmp_path, make_spec(tmp_path / "out", dataset={"train": str(f)}), capsys)
    assert code == ExitCode.PERMANENT
    assert f"error: {f}: line 2, column" in out and summary["message"].startswith(f"{f}: line 2")


@pytest.fixture(scope="module")
def llama8b_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """A folder with Llama 3.1 8B's published config.json shape (no weights) and the tiny tokenizer."""
    from transformers import LlamaConfig

    out = tmp_path_factory.mktemp("llama-8b-config")
    LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False).save_pretrained(out)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


def test_a_model_that_cannot_fit_fails_with_the_batch_that_would(make_spec: Callable[..., dict[str, Any]],
                                                                 llama8b_dir: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    spec = make_spec(tmp_path / "out", model={"uri": str(llama8b_dir)}, method={"type": "full"},
                     resources={"gpusPerNode": 1}, dataset={"maxSeqLength": 64})
    code, out, summary = preflight(tmp_path, spec, capsys, "--gpu-memory", "40Gi")
    # 8B parameters in bf16 with full fine-tuning: 2 + 2 + 4 bytes each, 60 GiB before activations.
    assert code == ExitCode.PERMANENT, out
    assert "error: will not fit: needs about " in out and "the GPU has 40.0 GiB; not even batchSize 1 fits" in out
    assert summary["largestBatch"] == 0 and summary["memoryPerGpuBytes"] > 60 * 2**30
    # The same data with LoRA fits, and the plan says how far the batch can grow.
    spec["method"] = {"type": "lora"}
    code, out, summary = preflight(tmp_path, spec, capsys, "--gpu-memory", "40Gi")
    assert code == ExitCode.SUCCESS, out
    assert summary["largestBatch"] >= spec["hyperparameters"]["batchSize"]
    # With a batch beyond that, it names the batch size that fits.
    spec["hyperparameters"]["batchSize"] = summary["largestBatch"] + 1
    code, out, _ = preflight(tmp_path, spec, capsys, "--gpu-memory", "40Gi")
    assert code == ExitCode.PERMANENT and f"batchSize {summary['largestBatch']} fits" in out


def _pod_preflight(tmp_path: Path, spec: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                   capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    """As in the operator's preflight pod: no FILE, the spec JSON it mounts, a termination log."""
    from finetune_api.resource import parse_spec

    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(parse_spec(spec).wire()), encoding="utf-8")
    log = tmp_path / "termination-log"
    log.unlink(missing_ok=True)
    monkeypatch.setenv(Env.SPEC_PATH, str(spec_path))
    monkeypatch.setenv(Env.TERMINATION_LOG, str(log))
    code = finetune(["preflight", "--json", *args])
    capsys.readouterr()
    return code, json.loads(log.read_text(encoding="utf-8"))


def test_in_the_operators_pod_the_verdict_goes_to_the_termination_message(
        make_spec: Callable[..., dict[str, Any]], llama8b_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from finetune_api.status import TerminationMessage

    spec = make_spec(tmp_path / "out", resources={"gpusPerNode": 1})
    code, doc = _pod_preflight(tmp_path, spec, monkeypatch, capsys, "--gpu-memory", "80Gi")
    msg = TerminationMessage.model_validate(doc)
    assert code == ExitCode.SUCCESS and msg.outcome == "succeeded" and msg.reason == Reason.DATA_VALID
    assert msg.data_check is not None and msg.data_check.rows == 48 and msg.data_check.tokens > 48
    assert msg.data_check.gpu_memory_bytes == 80 * 2**30 and (msg.data_check.memory_per_gpu_bytes or 0) > 0
    assert msg.message.startswith("preflight ok: 48 rows, ")
    # Data in the wrong shape: InvalidData, with the loader's line.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n', encoding="utf-8")
    code, doc = _pod_preflight(tmp_path, make_spec(tmp_path / "out", dataset={"train": str(bad)}), monkeypatch, capsys)
    msg = TerminationMessage.model_validate(doc)
    assert code == ExitCode.PERMANENT and msg.outcome == "failed" and msg.reason == Reason.INVALID_DATA
    assert msg.message.startswith(f"{bad}: line 2")
    # Good data, a plan that does not fit: WillNotFit, with the plan's numbers.
    spec = make_spec(tmp_path / "out", model={"uri": str(llama8b_dir)}, method={"type": "full"},
                     resources={"gpusPerNode": 1}, dataset={"maxSeqLength": 64})
    code, doc = _pod_preflight(tmp_path, spec, monkeypatch, capsys, "--gpu-memory", "40Gi")
    msg = TerminationMessage.model_validate(doc)
    assert code == ExitCode.PERMANENT and msg.reason == Reason.WILL_NOT_FIT
    assert msg.message.startswith("will not fit: needs about ") and msg.data_check is not None
    assert msg.data_check.largest_batch == 0 and msg.data_check.rows == 48
