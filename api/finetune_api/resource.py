"""The whole FineTuneJob object, and turning manifests into validated objects or clear errors."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .constants import API_VERSION, KIND, MAX_NAME_LENGTH, Phase
from .rules import RULE_ERROR_TYPE, Rule, TransitionRule, enforce
from .spec import FineTuneJobSpec
from .status import FineTuneJobStatus

NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
#: The API server's limit on all of an object's annotations together (keys and values).
MAX_ANNOTATIONS_BYTES = 256 * 1024

#: Root rules: the job's name becomes the Job's, the Service's and the pods' host names.
ROOT_RULES: tuple[Rule, ...] = (
    Rule(
        f"self.metadata.name.size() <= {MAX_NAME_LENGTH} && self.metadata.name.matches('{NAME_PATTERN}')",
        f"metadata.name must be at most {MAX_NAME_LENGTH} characters of a-z, 0-9 and '-', start with a letter "
        "and end with a letter or digit (it names the Job, Service and pod hostnames)",
        lambda o: len(o.metadata.name) <= MAX_NAME_LENGTH and re.match(NAME_PATTERN, o.metadata.name) is not None,
    ),
)

#: Outputs that outlive the trainer's pod: object storage, or a PersistentVolumeClaim.
CLUSTER_OUTPUT_SCHEMES = ("s3://", "pvc://")
#: Validation context key: the manifest runs on this machine (`finetune run`), not on the cluster.
LOCAL_RUN = "localRun"

#: Rules for a job that runs on the cluster; `finetune run` (LOCAL_RUN) skips them.
CLUSTER_RULES: tuple[Rule, ...] = (
    Rule(
        " || ".join(f"self.spec.output.uri.startsWith('{s}')" for s in CLUSTER_OUTPUT_SCHEMES),
        "spec.output.uri must be s3:// or pvc:// for a job on the cluster: a file:// or local path would be "
        "written inside the trainer's pod and deleted with it (local outputs are for finetune run)",
        lambda o: o.spec.output.uri.startswith(CLUSTER_OUTPUT_SCHEMES),
    ),
)

_TERMINAL = ", ".join(f"'{p}'" for p in Phase.TERMINAL)
#: Updates the API server refuses (see rules.TransitionRule).
ROOT_TRANSITION_RULES: tuple[TransitionRule, ...] = (
    TransitionRule(
        f"!has(oldSelf.status) || !has(oldSelf.status.phase) || !(oldSelf.status.phase in [{_TERMINAL}])"
        " || self.spec == oldSelf.spec",
        "spec cannot change once the job has finished (status.phase Succeeded or Failed): "
        "create a new FineTuneJob instead",
    ),
)


class ObjectMeta(BaseModel):
    """The parts of metadata that we read; the rest passes through untouched."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1)
    namespace: str | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    generation: int | None = None
    uid: str | None = None

    @field_validator("annotations")
    @classmethod
    def _annotations_fit(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        # The API server counts keys and values together, in bytes.
        size = sum(len(k.encode()) + len(v.encode()) for k, v in (value or {}).items())
        if size > MAX_ANNOTATIONS_BYTES:
            raise PydanticCustomError("annotations_too_long", f"Too long: may not be more than {MAX_ANNOTATIONS_BYTES} bytes")
        return value


class FineTuneJob(BaseModel):
    """A FineTuneJob manifest or object."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")
    rules: ClassVar[tuple[Rule, ...]] = (*ROOT_RULES, *CLUSTER_RULES)

    api_version: Literal["finetune.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["FineTuneJob"]
    metadata: ObjectMeta
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None

    @model_validator(mode="after")
    def _enforce_rules(self, info: ValidationInfo) -> FineTuneJob:
        local = bool(info.context and info.context.get(LOCAL_RUN))
        enforce(ROOT_RULES if local else self.rules, self)
        return self


assert API_VERSION == FineTuneJob.model_fields["api_version"].annotation.__args__[0]  # type: ignore[union-attr]
assert KIND == FineTuneJob.model_fields["kind"].annotation.__args__[0]  # type: ignore[union-attr]


# --- Errors in the API server's words -------------------------------------------------------

_JSON_TYPE = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    for py, name in _JSON_TYPE.items():
        if type(value) is py:
            return name
    return type(value).__name__


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _show(value: Any) -> str:
    if isinstance(value, (dict, BaseModel)):
        return '"object"'
    if isinstance(value, list):
        return '"array"'
    return json.dumps(value)


_TYPE_ERRORS = {
    "int_type": "integer",
    "int_parsing": "integer",
    "int_from_float": "integer",
    "float_type": "number",
    "float_parsing": "number",
    "bool_type": "boolean",
    "bool_parsing": "boolean",
    "string_type": "string",
    "model_type": "object",
    "model_attributes_type": "object",
    "dict_type": "object",
    "list_type": "array",
}


def describe_error(err: Any) -> str:
    """One pydantic error as one line, worded as the Kubernetes API server words it."""
    loc = tuple(err["loc"])
    path = _path(loc) or "<root>"
    kind = err["type"]
    value = err.get("input")
    ctx = err.get("ctx") or {}
    if kind == "missing":
        return f"{path}: Required value"
    if kind == "extra_forbidden":
        return f'{path}: unknown field "{path}"'
    if kind == "literal_error":
        expected = ctx.get("expected", "")
        options = re.findall(r"'([^']*)'", expected)
        options = options or re.split(r", | or ", expected)
        # The API server quotes every supported value, numbers included.
        shown = ", ".join(f'"{o}"' for o in options)
        return f"{path}: Unsupported value: {_show(value)}: supported values: {shown}"
    if kind in _TYPE_ERRORS:
        return f"{path}: Invalid value: {_show(value)}: {path} in body must be of type {_TYPE_ERRORS[kind]}: \"{_json_type(value)}\""
    bounds = {
        "greater_than": ("should be greater than", "gt"),
        "greater_than_equal": ("should be greater than or equal to", "ge"),
        "less_than": ("should be less than", "lt"),
        "less_than_equal": ("should be less than or equal to", "le"),
    }
    if kind in bounds:
        words, key = bounds[kind]
        return f"{path}: Invalid value: {_show(value)}: {path} in body {words} {ctx[key]}"
    if kind == "string_pattern_mismatch":
        return f"{path}: Invalid value: {_show(value)}: {path} in body should match '{ctx['pattern']}'"
    if kind == "string_too_short":
        return f"{path}: Invalid value: {_show(value)}: {path} in body should be at least {ctx['min_length']} chars long"
    if kind == "string_too_long":
        return f"{path}: Too long: may not be more than {ctx['max_length']} bytes"
    if kind == "too_short":
        return f"{path}: Invalid value: {ctx.get('actual_length')}: {path} in body should have at least {ctx['min_length']} items"
    if kind == "too_long":
        return f"{path}: Too many: {ctx.get('actual_length')}: must have at most {ctx['max_length']} items"
    if kind == "finite_number":
        shown = "NaN" if value != value else ("+Inf" if value > 0 else "-Inf")
        return f"{path}: Invalid value: unsupported value: {shown} (JSON, and so the API server, has no infinities or NaN)"
    if kind == RULE_ERROR_TYPE:
        return f'{path}: Invalid value: "object": {err["msg"]}'
    return f"{path}: {err['msg']}"


@dataclass
class ManifestError(Exception):
    """A manifest that cannot become a FineTuneJob; `lines` are what the user reads."""

    lines: list[str]

    def __str__(self) -> str:
        return "\n".join(self.lines)


def parse_job(doc: Any, *, local_run: bool = False) -> FineTuneJob:
    """Validate one decoded manifest (a dict) as a FineTuneJob, or raise ManifestError.

    local_run: for `finetune run` on this machine, where a local output path is fine (CLUSTER_RULES
    are skipped); otherwise the job is judged as the API server judges it.
    """
    if doc is None:
        raise ManifestError(["<root>: empty document: expected a FineTuneJob"])
    if not isinstance(doc, dict):
        raise ManifestError([f"<root>: expected a FineTuneJob object, got {_json_type(doc)}"])
    if doc.get("apiVersion") != API_VERSION or doc.get("kind") != KIND:
        raise ManifestError(
            [f"<root>: not a FineTuneJob: apiVersion {doc.get('apiVersion')!r}, kind {doc.get('kind')!r} "
             f"(want apiVersion {API_VERSION!r}, kind {KIND!r})"]
        )
    try:
        return FineTuneJob.model_validate(doc, context={LOCAL_RUN: local_run})
    except ValidationError as exc:
        raise ManifestError([describe_error(e) for e in exc.errors()]) from None


def parse_spec(spec: Any) -> FineTuneJobSpec:
    """Validate a bare spec (as the operator mounts it for the trainer), or raise ManifestError."""
    try:
        return FineTuneJobSpec.model_validate(spec)
    except ValidationError as exc:
        raise ManifestError([describe_error({**e, "loc": ("spec", *e["loc"])}) for e in exc.errors()]) from None
