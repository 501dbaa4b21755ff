"""Reading FineTuneJob manifests from YAML files, with errors that point at the file."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from finetune_api import FineTuneJob, ManifestError, parse_job


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-5` as a number, as kubectl's YAML 1.2 parser does (PyYAML's
    YAML 1.1 rules would make it a string and the manifest would fail here but pass kubectl)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


@dataclass
class Checked:
    """One document of one file: the job, or the lines that say what is wrong."""

    where: str
    job: FineTuneJob | None
    errors: list[str]


def load_documents(path: Path) -> list[Any]:
    """YAML documents of a file; raises ManifestError for unreadable, empty or malformed files."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(["no such file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError([f"cannot read: {exc}"]) from None
    if not text.strip():
        raise ManifestError(["empty file: expected a FineTuneJob manifest"])
    try:
        docs = [d for d in yaml.load_all(text, Loader=_Loader) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ManifestError([f"invalid YAML: {where}{problem}"]) from None
    if not docs:
        raise ManifestError(["empty file: expected a FineTuneJob manifest"])
    return docs


def check_file(path: Path) -> list[Checked]:
    try:
        docs = load_documents(path)
    except ManifestError as exc:
        return [Checked(str(path), None, exc.lines)]
    out = []
    for i, doc in enumerate(docs):
        where = str(path) if len(docs) == 1 else f"{path}[{i}]"
        try:
            out.append(Checked(where, parse_job(doc), []))
        except ManifestError as exc:
            out.append(Checked(where, None, exc.lines))
    return out


def load_job(path: Path) -> FineTuneJob:
    """Exactly one valid FineTuneJob from a file, or ManifestError naming the file."""
    checked = check_file(path)
    if len(checked) != 1:
        raise ManifestError([f"{path}: expected one FineTuneJob, found {len(checked)} documents"])
    if checked[0].job is None:
        raise ManifestError([f"{checked[0].where}: {line}" for line in checked[0].errors])
    return checked[0].job
