"""Exit codes that match the cause: bad data and unusable outputs are permanent (42, one line naming
the file and line or the path); a model hub or object store that cannot be reached is retryable."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_api.constants import API_VERSION, KIND, MANIFEST_FILE, ExitCode
from finetune_cli.main import main as finetune

Spec = Callable[..., dict[str, Any]]


def manifest(tmp: Path, spec: dict[str, Any]) -> Path:
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": "codes"}, "spec": spec}))
    return path


def run_in_process(tmp: Path, spec: dict[str, Any], capsys: pytest.CaptureFixture[str],
                   *extra: str) -> tuple[int, list[str]]:
    code = finetune(["run", str(manifest(tmp, spec)), "--no-progress", "--metrics-port", "0", *extra])
    err = capsys.readouterr().err
    return code, [ln for ln in err.splitlines() if ln.startswith("finetune run:")]


def run_subprocess(tmp: Path, spec: dict[str, Any], *, prefix: tuple[str, ...] = (),
                   env: dict[str, str] | None = None) -> tuple[int, list[str], str]:
    cmd = [*prefix, sys.executable, "-m", "finetune_cli.main", "run", str(manifest(tmp, spec)), "--no-progress",
           "--metrics-port", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    return proc.returncode, [ln for ln in proc.stderr.splitlines() if ln.startswith("finetune run:")], proc.stderr


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- bad data: 42, file and line -------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"prompt,completion\nWhat?,blue\nWho?,caf\xe9\n", r"data\.csv: line 3, column 9: not UTF-8 text"),
        (b"prompt,completion\nWhat?,blue\nWho?,red,extra\n", r"data\.csv: line 3: .*3 cells, the header names 2"),
    ],
    ids=["not-utf8", "extra-field"],
)
def test_bad_csv_is_permanent_naming_file_and_line(make_spec: Spec, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   content: bytes, expected: str) -> None:
    import re

    data = tmp_path / "data.csv"
    data.write_bytes(content)
    code, lines = run_in_process(tmp_path, make_spec(tmp_path / "out", dataset={"train": str(data)}), capsys)
    assert code == ExitCode.PERMANENT, lines
    assert len(lines) == 1 and "permanent error" in lines[0], lines
    assert re.search(expected, lines[0]), lines


# --- outputs that cannot be written: 42, naming the path -------------------------------------


@pytest.mark.parametrize("kind", ["file", "dev-null"])
def test_output_that_is_not_a_folder_is_permanent(make_spec: Spec, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  kind: str) -> None:
    target = "/dev/null" if kind == "dev-null" else str(tmp_path / "a-file")
    if kind == "file":
        Path(target).write_text("not a folder")
    code, lines = run_in_process(tmp_path, make_spec(tmp_path / "out"), capsys, "--output", target)
    assert code == ExitCode.PERMANENT, lines
    assert len(lines) == 1 and "permanent error" in lines[0] and target in lines[0], lines
    assert "the output must be a folder" in lines[0], lines


def _read_only_mount_works(where: Path) -> bool:
    """A private mount namespace (no root needed: a user namespace) to mount a read-only tmpfs in."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o ro none {where} && ! touch {where}/x"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.parametrize("exists", [True, False], ids=["existing-folder", "new-folder"])
def test_output_on_a_read_only_filesystem_is_permanent(make_spec: Spec, tmp_path: Path, exists: bool) -> None:
    """Today: a new folder exits 1 (raw OSError), an existing one retries ~40 s and exits 1."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if not _read_only_mount_works(ro):
        pytest.skip("unshare -rm (user and mount namespaces) is not available here")
    # The folder must exist inside the read-only tmpfs: mount a tmpfs read-write, mkdir, remount ro.
    out = ro / "out"
    inner = (f"mount -t tmpfs none {ro} && {'mkdir ' + str(out) + ' && ' if exists else ''}"
             f"mount -o remount,ro {ro} && exec \"$@\"")
    spec = make_spec(out)
    code, lines, err = run_subprocess(tmp_path, spec, prefix=("unshare", "-rm", "sh", "-c", inner, "sh"))
    assert code == ExitCode.PERMANENT, err[-3000:]
    assert len(lines) == 1 and "permanent error" in lines[0] and str(out) in lines[0], lines
    assert "Read-only file system" in lines[0]


# --- unreachable hosts: retryable -------------------------------------------------------------


@pytest.mark.slow
def test_model_hub_that_cannot_be_reached_is_retryable(make_spec: Spec, tmp_path: Path) -> None:
    """Today: exit 42 ("cannot load"), so the Job fails at once on a network blip. The hub is a
    closed port on loopback (connection refused); huggingface_hub's own retries take ~45 s."""
    spec = make_spec(tmp_path / "out", model={"uri": "example-org/tiny-model"})
    env = {"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}",
           "HF_HOME": str(tmp_path / "hf-home")}
    code, lines, err = run_subprocess(tmp_path, spec, env=env)
    assert code == 1, err[-3000:]
    assert len(lines) == 1 and "permanent" not in lines[0] and "example-org/tiny-model" in lines[0], lines
    assert not (tmp_path / "out" / MANIFEST_FILE).exists()


def test_object_store_that_cannot_be_reached_is_retryable(make_spec: Spec, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune_api.constants import StorageEnv
    from finetune_trainer import storage

    monkeypatch.setattr(storage, "RETRY", storage.RetryPolicy(attempts=2, base_delay_s=0.01))
    monkeypatch.setenv(StorageEnv.ENDPOINT_URL, f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv(StorageEnv.ACCESS_KEY_ID, "unreachable")
    monkeypatch.setenv(StorageEnv.SECRET_ACCESS_KEY, "unreachable-secret")
    code, lines = run_in_process(tmp_path, make_spec("s3://models/out"), capsys)
    assert code == 1, lines
    assert len(lines) == 1 and "permanent" not in lines[0] and "s3://models/out" in lines[0], lines
