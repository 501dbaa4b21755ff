"""The "load it with" lines `finetune run` prints work, executed as printed, for every output form:
a path, file://, ./relative, pvc:// (the mounted path), s3:// (MinIO)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_api.constants import API_VERSION, KIND, ExitCode
from finetune_api.layout import local_path
from finetune_cli.main import main as finetune
from finetune_trainer.run_manifest import how_to_load
from harness.snippets import load_snippet, run_snippet

LORA = {"type": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}


def train(make_spec: Callable[..., dict[str, Any]], tmp_path: Path, output: str,
          capsys: pytest.CaptureFixture[str]) -> str:
    spec = make_spec(tmp_path / "unused", method=LORA, hyperparameters={"maxSteps": 2, "batchSize": 8, "seed": 7})
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": "snippet"}, "spec": spec}))
    code = finetune(["run", str(job), "--no-progress", "--metrics-port", "0", "--output", output])
    out, err = capsys.readouterr()
    assert code == ExitCode.SUCCESS, err[-3000:]
    return out


def test_file_uri_output(make_spec: Callable[..., dict[str, Any]], tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    """Today the snippet passes 'file:///…' to from_pretrained, which fails."""
    printed = train(make_spec, tmp_path, f"file://{tmp_path}/out", capsys)
    snippet = load_snippet(printed)
    assert "file://" not in snippet
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert run_snippet(snippet, "print(type(model).__name__)", cwd=elsewhere).strip() == "PeftModelForCausalLM"


@pytest.mark.parametrize(("uri", "path"), [
    ("./runs/x", None),
    ("pvc://claim/runs/x", local_path("pvc://claim/runs/x")),
])
def test_relative_and_pvc_outputs_load_from_their_paths(uri: str, path: str | None, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative output loads from anywhere (absolute path); pvc:// from where it is mounted."""
    monkeypatch.chdir(tmp_path)
    lines = how_to_load(uri, "lora", merged=True)
    expected = path or str(tmp_path / "runs" / "x")
    assert f"AutoPeftModelForCausalLM.from_pretrained({expected!r})" in "\n".join(lines)
    assert f"from_pretrained({expected!r} + '/merged')" in lines[-1]


@pytest.mark.cluster
def test_s3_output(make_spec: Callable[..., dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                   minio_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    import uuid

    from finetune_trainer import storage

    for key, value in minio_env.items():
        monkeypatch.setenv(key, value)
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    fs, _ = storage.resolve(f"s3://{bucket}")
    fs.mkdir(bucket)
    printed = train(make_spec, tmp_path, f"s3://{bucket}/runs/snippet", capsys)
    snippet = load_snippet(printed)
    where = tmp_path / "user"
    where.mkdir()
    out = run_snippet(snippet, "print(type(model).__name__, path)", env={**minio_env, **dict(os.environ)}, cwd=where)
    assert out.split()[0] == "PeftModelForCausalLM"
    assert Path(where / out.split()[1]).resolve() == (where / "snippet").resolve()


@pytest.mark.cluster
def test_adapter_of_a_base_model_from_s3(make_spec: Callable[..., dict[str, Any]], tiny_model_dir: Path,
                                         tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         minio_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The adapter names the scratch copy of its base (gone after the run): the snippet fetches the base."""
    import uuid

    from finetune_trainer import storage

    for key, value in minio_env.items():
        monkeypatch.setenv(key, value)
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    fs, _ = storage.resolve(f"s3://{bucket}")
    fs.mkdir(bucket)
    storage.publish(tiny_model_dir, f"s3://{bucket}/base", kind="artifact")
    spec = make_spec(tmp_path / "unused", model={"uri": f"s3://{bucket}/base"}, method=LORA,
                     hyperparameters={"maxSteps": 2, "batchSize": 8, "seed": 7})
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": "s3base"}, "spec": spec}))
    code = finetune(["run", str(job), "--no-progress", "--metrics-port", "0", "--output", str(tmp_path / "out")])
    printed, err = capsys.readouterr()
    assert code == ExitCode.SUCCESS, err[-3000:]
    where = tmp_path / "user"
    where.mkdir()
    out = run_snippet(load_snippet(printed), "print(type(model).__name__)", env=minio_env, cwd=where)
    assert out.strip() == "PeftModelForCausalLM"
