"""Manifests the API server refuses before or beside its schema (nesting, alias bombs, sizes,
infinities and NaN): `finetune validate` refuses each too, in one line, exit 1, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from api.bad_manifests import BAD_MANIFESTS, BASE, Bad

LIMITS = [b for b in BAD_MANIFESTS if b.name in (
    "nested-500-deep", "alias-bomb", "annotations-over-256k", "annotation-of-5mb", "infinite-max-grad-norm",
    "nan-learning-rate")]


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "finetune_cli.main", "validate", str(path)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("bad", LIMITS, ids=lambda b: b.name)
def test_one_line_and_exit_1(bad: Bad, tmp_path: Path) -> None:
    path = tmp_path / f"{bad.name}.yaml"
    path.write_text(bad.text)
    result = validate(path)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and bad.message in result.stderr, result.stderr[-2000:]
    assert len(result.stderr) < 300, "the line must not echo the offending value"


def test_the_table_has_all_of_them() -> None:
    assert len(LIMITS) == 6


def test_ordinary_aliases_pass(tmp_path: Path) -> None:
    """Anchors used as people use them are not a bomb."""
    text = yaml.safe_dump(BASE, sort_keys=False).replace(
        "  dataset:\n    train: s3://datasets/train.jsonl\n",
        "  dataset:\n    train: &data s3://datasets/train.jsonl\n    validation: *data\n", 1)
    assert "*data" in text
    path = tmp_path / "aliases.yaml"
    path.write_text(text)
    result = validate(path)
    assert result.returncode == 0, result.stderr
    assert f"{path}: ok" in result.stdout
