"""`finetune validate` rejects each bad manifest with a message naming the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from finetune_cli.main import main

from api.bad_manifests import BAD_MANIFESTS, BASE, Bad


def validate(*paths: Path) -> subprocess.CompletedProcess[str]:
    """The real console command, in a subprocess: exit code and streams as a user sees them."""
    return subprocess.run(
        [sys.executable, "-m", "finetune_cli.main", "validate", *map(str, paths)],
        capture_output=True, text=True, timeout=60,
    )


def validate_in_process(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Same entry point without a new interpreter, for the long table."""
    code = main(["validate", str(path)])
    out, err = capsys.readouterr()
    return code, out, err


def test_table_is_large_and_distinct() -> None:
    assert len(BAD_MANIFESTS) >= 25
    assert len({b.name for b in BAD_MANIFESTS}) == len(BAD_MANIFESTS)
    assert len({b.text for b in BAD_MANIFESTS}) == len(BAD_MANIFESTS)


def test_base_of_the_table_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(BASE))
    result = validate(path)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("bad", BAD_MANIFESTS, ids=lambda b: b.name)
def test_bad_manifest_is_rejected_with_its_message(
    bad: Bad, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / f"{bad.name}.yaml"
    path.write_text(bad.text)
    code, _, err = validate_in_process(path, capsys)
    assert code == 1
    lines = err.strip().splitlines()
    assert lines, "no error printed"
    # One line per error, each starting with the file, then the field path.
    assert all(line.startswith(f"{path}: ") for line in lines), lines
    assert any(bad.message in line for line in lines), f"{bad.message!r} not in {lines}"


def test_several_files_one_bad(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(yaml.safe_dump(BASE))
    bad.write_text(BAD_MANIFESTS[0].text)
    result = validate(good, bad)
    assert result.returncode == 1
    assert f"{good}: ok" in result.stdout
    assert str(bad) in result.stderr and str(good) not in result.stderr


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    result = validate(tmp_path / "nope.yaml")
    assert result.returncode == 1
    assert "no such file" in result.stderr
