"""Generate the CustomResourceDefinition from the pydantic models.

pydantic writes JSON Schema 2020-12; Kubernetes wants a structural OpenAPI v3 subset: no $ref,
no anyOf for optionals, boolean exclusive bounds, no `additionalProperties: false`. Cross-field
rules become `x-kubernetes-validations` (CEL) on the object they belong to.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from . import constants as c
from .resource import ROOT_TRANSITION_RULES, FineTuneJob
from .rules import x_validations
from .spec import ApiModel, FineTuneJobSpec
from .status import FineTuneJobStatus

_DROP = {"title", "additionalProperties", "discriminator"}


def _model_classes(root: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """Every model reachable from root, by the name pydantic gives its $def."""
    seen: dict[str, type[BaseModel]] = {}

    def visit(cls: type[BaseModel]) -> None:
        if cls.__name__ in seen:
            return
        seen[cls.__name__] = cls
        for field in cls.model_fields.values():
            for arg in _walk_types(field.annotation):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    visit(arg)

    visit(root)
    return seen


def _walk_types(tp: Any) -> list[Any]:
    out = [tp]
    for arg in getattr(tp, "__args__", ()) or ():
        out.extend(_walk_types(arg))
    # Annotated[...] keeps its base in __origin__.
    origin = getattr(tp, "__origin__", None)
    if origin is not None and origin is not tp:
        out.extend(_walk_types(origin))
    return out


def _merge(target: dict[str, Any], siblings: dict[str, Any]) -> dict[str, Any]:
    """Siblings of a $ref override its keys, except rules, which add up."""
    out = {**target, **siblings}
    key = "x-kubernetes-validations"
    if key in target and key in siblings:
        out[key] = target[key] + siblings[key]
    return out


class _Converter:
    def __init__(self, root: type[BaseModel], keep_defaults: bool) -> None:
        self.schema = root.model_json_schema(by_alias=True, mode="validation")
        self.defs: dict[str, Any] = self.schema.pop("$defs", {})
        self.classes = _model_classes(root)
        self.keep_defaults = keep_defaults
        self.root = root

    def run(self) -> dict[str, Any]:
        return self.convert(self.schema, model=self.root)

    def convert(self, node: dict[str, Any], model: type[BaseModel] | None = None) -> dict[str, Any]:
        node = dict(node)
        if "$ref" in node:
            name = node.pop("$ref").rsplit("/", 1)[-1]
            target = self.convert(self.defs[name], model=self.classes.get(name))
            return _merge(target, self._siblings(node))
        for key in ("anyOf", "oneOf", "allOf"):
            if key in node:
                variants = [v for v in node.pop(key) if v.get("type") != "null"]
                if len(variants) != 1:
                    raise ValueError(f"unions are not structural: {variants}")
                return _merge(self.convert(variants[0]), self._siblings(node))
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in _DROP:
                if key == "additionalProperties" and isinstance(value, dict):
                    out[key] = self.convert(value)
                continue
            if key == "default":
                if self.keep_defaults and value is not None:
                    out[key] = value
            elif key == "properties":
                out[key] = {name: self.convert(prop) for name, prop in value.items()}
            elif key == "items":
                out[key] = self.convert(value)
            elif key == "exclusiveMinimum":
                out["minimum"], out["exclusiveMinimum"] = value, True
            elif key == "exclusiveMaximum":
                out["maximum"], out["exclusiveMaximum"] = value, True
            elif key == "const":
                out["enum"] = [value]
            else:
                out[key] = value
        if model is not None:
            self._add_model_parts(out, model)
        return out

    def _siblings(self, node: dict[str, Any]) -> dict[str, Any]:
        """Keys beside a $ref or a union (description, default, x-kubernetes-validations)."""
        out = self.convert({k: v for k, v in node.items() if k not in ("$ref", "anyOf", "oneOf", "allOf")})
        return out

    def _add_model_parts(self, out: dict[str, Any], model: type[BaseModel]) -> None:
        out["type"] = "object"
        if issubclass(model, ApiModel) and (model.rules or model.transition_rules):
            out["x-kubernetes-validations"] = x_validations((*model.rules, *model.transition_rules))
        if not self.keep_defaults:
            return
        # default_factory fields: the default object in full. (An empty object would let the API
        # server fill nested defaults, but it validates defaults against the CEL rules first, and
        # rules reading a required or defaulted field fail on `{}`: "no such key".)
        for name, field in model.model_fields.items():
            if field.default_factory is None:
                continue
            value = field.default_factory()  # type: ignore[call-arg]
            prop = out.get("properties", {}).get(field.alias or name)
            if prop is not None:
                prop["default"] = (
                    value.model_dump(by_alias=True, exclude_none=True, mode="json")
                    if isinstance(value, BaseModel) else value
                )


def spec_schema() -> dict[str, Any]:
    return _Converter(FineTuneJobSpec, keep_defaults=True).run()


def status_schema() -> dict[str, Any]:
    return _Converter(FineTuneJobStatus, keep_defaults=False).run()


PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Method", "type": "string", "jsonPath": ".spec.method.type"},
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.uri"},
    {"name": "Progress", "type": "integer", "jsonPath": ".status.progress.percent", "description": "Percent of steps done"},
    {"name": "Loss", "type": "number", "jsonPath": ".status.metrics.loss"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Objective", "type": "string", "jsonPath": ".spec.objective.type", "priority": 1},
    {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step", "priority": 1},
    {"name": "ETA", "type": "integer", "jsonPath": ".status.progress.etaSeconds", "priority": 1},
    {"name": "Artifact", "type": "string", "jsonPath": ".status.artifact.uri", "priority": 1},
]


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition, as a plain dict ready for YAML."""
    spec = spec_schema()
    spec["description"] = "Desired state of a FineTuneJob."
    status = status_schema()
    status["description"] = "Observed state, written by the operator only."
    root = {
        "type": "object",
        "description": "A FineTuneJob fine-tunes a large language model and writes the result to storage.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "x-kubernetes-validations": x_validations((*FineTuneJob.rules, *ROOT_TRANSITION_RULES)),
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": c.CRD_NAME,
            "labels": {"app.kubernetes.io/name": "finetune-operator", "app.kubernetes.io/part-of": "finetune-operator"},
        },
        "spec": {
            "group": c.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": c.KIND,
                "plural": c.PLURAL,
                "singular": c.SINGULAR,
                "shortNames": list(c.SHORT_NAMES),
                "listKind": f"{c.KIND}List",
                "categories": ["all", "finetune"],
            },
            "versions": [
                {
                    "name": c.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def render_crd_yaml() -> str:
    import yaml  # the CLI's dependency; the API package itself needs only pydantic

    header = "# Generated from finetune_api by `finetune crd`. Do not edit: change the pydantic model.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=120)
