"""Every example validates, and breaking any of them is caught with a message naming the field."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_api import ManifestError, parse_job
from finetune_api.crd import spec_schema
from finetune_cli.main import main
from finetune_cli.manifests import load_documents

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))
#: Manifests for `finetune run` on this machine: their output is a local path, which a job on the
#: cluster may not have (`finetune validate --local` checks them).
LOCAL_EXAMPLES = {"quickstart"}
REQUIRED = {"full", "lora", "qlora", "dora", "adalora", "ia3", "prefix", "prompt", "ptuning",
            "dpo", "reward", "ppo", "continual"}


def test_an_example_per_method_and_objective() -> None:
    jobs = [parse_job(load_documents(p)[0], local_run=p.stem in LOCAL_EXAMPLES) for p in EXAMPLES]
    methods = {j.spec.method.type for j in jobs}
    objectives = {j.spec.objective.type for j in jobs}
    continual = any(j.spec.objective.continual for j in jobs)
    assert methods >= {"full", "lora", "qlora", "dora", "adalora", "ia3", "prefix", "prompt", "ptuning"}
    assert objectives >= {"sft", "dpo", "reward", "ppo"} and continual
    assert REQUIRED <= {p.stem for p in EXAMPLES}


def test_validate_accepts_every_example(capsys: pytest.CaptureFixture[str]) -> None:
    local = [p for p in EXAMPLES if p.stem in LOCAL_EXAMPLES]
    assert len(local) == len(LOCAL_EXAMPLES)
    assert main(["validate", *(str(p) for p in EXAMPLES if p not in local)]) == 0, capsys.readouterr().err
    assert main(["validate", "--local", *map(str, local)]) == 0, capsys.readouterr().err
    # And only those: they are refused as cluster jobs.
    capsys.readouterr()
    assert main(["validate", *map(str, local)]) == 1
    assert "spec.output.uri must be s3:// or pvc://" in capsys.readouterr().err


def _leaves(doc: Any, schema: dict[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any, dict[str, Any]]]:
    """(path, value, schema) of every scalar in the spec."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            sub = schema.get("properties", {}).get(key) or schema.get("additionalProperties") or {}
            yield from _leaves(value, sub, (*path, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from _leaves(value, schema.get("items", {}), (*path, str(i)))
    else:
        yield path, doc, schema


def _set(doc: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node: Any = doc
    for key in path[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]
    last = path[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def _dotted(path: tuple[str, ...]) -> str:
    out = "spec"
    for part in path:
        out += f"[{part}]" if part.isdigit() else f".{part}"
    return out


def _errors(doc: dict[str, Any]) -> list[str]:
    try:
        parse_job(doc)
    except ManifestError as exc:
        return exc.lines
    return []


def _mutations() -> Iterator[Any]:
    schema = spec_schema()
    for path in EXAMPLES:
        doc = load_documents(path)[0]
        for leaf, value, sub in _leaves(doc["spec"], schema):
            name = f"{path.stem}:{_dotted(leaf)}"
            if "enum" in sub and isinstance(value, str):
                yield pytest.param(path, leaf, value + "x", "Unsupported value", id=f"{name}:misspelt")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                # An enum of numbers (quantization bits) lists its values instead of a bound.
                words = "Unsupported value" if "enum" in sub else None
                yield pytest.param(path, leaf, "many", words or "must be of type", id=f"{name}:word")
                if value > 0:
                    yield pytest.param(path, leaf, -value, words or "should be greater than", id=f"{name}:negative")


@pytest.mark.parametrize(("example", "leaf", "value", "words"), list(_mutations()))
def test_mutated_example_fails_naming_the_field(example: Path, leaf: tuple[str, ...], value: Any, words: str) -> None:
    doc = copy.deepcopy(load_documents(example)[0])
    _set(doc["spec"], leaf, value)
    errors = _errors(doc)
    field = _dotted(leaf)
    assert any(line.startswith(f"{field}: ") and words in line for line in errors), errors


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_unknown_field_under_spec_is_named(example: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = load_documents(example)[0]
    doc["spec"]["learnRate"] = 0.1
    path = tmp_path / example.name
    path.write_text(yaml.safe_dump(doc))
    assert main(["validate", str(path)]) == 1
    assert 'spec.learnRate: unknown field "spec.learnRate"' in capsys.readouterr().err


def test_mutations_cover_every_kind() -> None:
    ids = [p.id for p in _mutations()]
    for kind in ("misspelt", "word", "negative"):
        assert sum(i.endswith(kind) for i in ids) >= 10, kind
