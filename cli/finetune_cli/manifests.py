"""Reading FineTuneJob manifests from YAML files, with errors that point at the file."""

from __future__ import annotations

import json
import math
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


#: Deeper than any FineTuneJob (managedFields included) and shallow enough for PyYAML's recursive
#: composer (it overflows the Python stack near 500 levels; the API server judges such a
#: document by the field it sits in, so it is refused at that field here).
MAX_DEPTH = 64
#: The API server's limit on a request body (kube-apiserver MaxRequestBodyBytes, 3 MiB).
MAX_REQUEST_BYTES = 3 * 1024 * 1024


def _allowed_alias_ratio(decoded: int) -> float:
    """go-yaml's limit (kubectl parses manifests with it): aliases may be 99% of the decoded nodes
    up to 400,000 nodes, falling linearly to 10% at 4,000,000."""
    if decoded <= 400_000:
        return 0.99
    if decoded >= 4_000_000:
        return 0.10
    return 0.99 - 0.89 * (decoded - 400_000) / 3_600_000


def _path(frames: list[list[Any]]) -> str:
    out = ""
    for kind, key, _ in frames:
        if kind == "seq":
            out += f"[{key}]"
        elif key is not None:
            out += ("." if out else "") + str(key)
    return out or "<root>"


def _too_deep(frames: list[list[Any]]) -> str:
    """Named at the field where the nesting starts (the outermost list, or the 8th mapping level),
    with the type the API server would name there."""
    parts: list[str] = []
    kind = "object"
    for frame_kind, key, _ in frames:
        if frame_kind == "seq":
            kind = "array"
            break
        if len(parts) == 8:
            break
        parts.append(str(key))
    where = ".".join(parts) or "<root>"
    return f'{where}: Invalid value: "{kind}": nested more than {MAX_DEPTH} levels deep'


def check_structure(text: str) -> None:
    """Refuse what kubectl or the API server refuse before reading the fields: alias bombs
    (counted as go-yaml counts them), anchors that contain themselves, nesting deeper than
    MAX_DEPTH. One pass over the parser's events, without recursion."""
    decoded = aliased = 0
    sizes: dict[str, int] = {}  # anchor -> nodes its value expands to
    open_anchors: list[tuple[str | None, int]] = []  # anchors of the nodes being read
    frames: list[list[Any]] = []  # [kind, key or index, expecting a key] per open collection

    def node(count: int, expanded: int) -> None:
        nonlocal decoded, aliased
        decoded += count
        aliased += expanded
        if aliased > 100 and decoded > 1000 and aliased / decoded > _allowed_alias_ratio(decoded):
            raise ManifestError(["invalid YAML: document contains excessive aliasing"])
        # A node completes a mapping's key (then its value is expected) or a sequence item.
        if frames:
            top = frames[-1]
            if top[0] == "map":
                top[2] = not top[2]
            else:
                top[1] += 1

    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.DocumentStartEvent):
            decoded = aliased = 0
            sizes.clear()
        elif isinstance(event, yaml.AliasEvent):
            if any(a == event.anchor for a, _ in open_anchors):
                raise ManifestError([f"invalid YAML: {_path(frames)}: anchor {event.anchor!r} value contains itself"])
            size = sizes.get(event.anchor or "", 0)
            node(1 + size, size)
        elif isinstance(event, yaml.ScalarEvent):
            if frames and frames[-1][0] == "map" and frames[-1][2]:
                frames[-1][1] = event.value
            if event.anchor:
                sizes[event.anchor] = 1
            node(1, 0)
        elif isinstance(event, yaml.CollectionStartEvent):
            if len(frames) >= MAX_DEPTH:
                raise ManifestError([_too_deep(frames)])
            open_anchors.append((event.anchor, decoded))
            decoded += 1
            kind = "map" if isinstance(event, yaml.MappingStartEvent) else "seq"
            frames.append([kind, None if kind == "map" else 0, True])
        elif isinstance(event, yaml.CollectionEndEvent):
            frames.pop()
            anchor, start = open_anchors.pop()
            if anchor:
                sizes[anchor] = decoded - start
            node(0, 0)


def check_values(doc: Any, size_limit: int = MAX_REQUEST_BYTES) -> None:
    """What kubectl cannot turn into JSON (infinities, NaN, anywhere) and bodies the API server
    refuses for their size; the walk is iterative (the structure was checked for depth)."""
    stack: list[tuple[str, Any]] = [("", doc)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            shown = "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")
            raise ManifestError([f"{path or '<root>'}: Invalid value: unsupported value: {shown} "
                                 "(JSON, and so the API server, has no infinities or NaN)"])
        if isinstance(value, dict):
            stack.extend(((f"{path}.{k}" if path else str(k)), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(value))
    size = len(json.dumps(doc, default=str).encode())
    if size > size_limit:
        raise ManifestError([f"<root>: Request entity too large: limit is {size_limit} "
                             f"(the manifest is {size} bytes as JSON)"])


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
        check_structure(text)
        docs = [d for d in yaml.load_all(text, Loader=_Loader) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ManifestError([f"invalid YAML: {where}{problem}"]) from None
    if not docs:
        raise ManifestError(["empty file: expected a FineTuneJob manifest"])
    return docs


def check_file(path: Path, *, local_run: bool = False) -> list[Checked]:
    """Every document of a file, judged as the API server judges it (local_run: for `finetune run`)."""
    try:
        docs = load_documents(path)
    except ManifestError as exc:
        return [Checked(str(path), None, exc.lines)]
    out = []
    for i, doc in enumerate(docs):
        where = str(path) if len(docs) == 1 else f"{path}[{i}]"
        try:
            check_values(doc)
            out.append(Checked(where, parse_job(doc, local_run=local_run), []))
        except ManifestError as exc:
            out.append(Checked(where, None, exc.lines))
    return out


def load_job(path: Path, *, local_run: bool = False) -> FineTuneJob:
    """Exactly one valid FineTuneJob from a file, or ManifestError naming the file."""
    checked = check_file(path, local_run=local_run)
    if len(checked) != 1:
        raise ManifestError([f"{path}: expected one FineTuneJob, found {len(checked)} documents"])
    if checked[0].job is None:
        raise ManifestError([f"{checked[0].where}: {line}" for line in checked[0].errors])
    return checked[0].job
