"""The CRD in crds/ (and the chart's copy) is exactly what the model generates, and is structural."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune_api import constants as c
from finetune_api.crd import build_crd, render_crd_yaml
from finetune_api.rules import unchanged_optional

ROOT = Path(__file__).parents[2]
CRD_PATH = ROOT / c.CRD_FILE
CHART_CRD = ROOT / "charts" / "finetune-operator" / "crds" / CRD_PATH.name


def test_crd_file_matches_the_model() -> None:
    assert CRD_PATH.read_text() == render_crd_yaml(), "crds/ drifted from the model: run `make crd`"


def test_chart_copy_matches_the_model() -> None:
    assert CHART_CRD.exists(), f"{CHART_CRD} is missing: run `make crd`"
    assert CHART_CRD.read_text() == render_crd_yaml(), "the chart's CRD drifted: run `make crd`"


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = []
    if isinstance(node, dict):
        out.append((path, node))
        for key, value in node.get("properties", {}).items():
            out.extend(_walk(value, f"{path}.{key}"))
        if isinstance(node.get("items"), dict):
            out.extend(_walk(node["items"], f"{path}[]"))
        if isinstance(node.get("additionalProperties"), dict):
            out.extend(_walk(node["additionalProperties"], f"{path}{{}}"))
    return out


def test_schema_is_structural() -> None:
    crd = build_crd()
    version = crd["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "type" in node, f"{path} has no type"
        for banned in ("$ref", "anyOf", "oneOf", "allOf", "$defs", "title", "const"):
            assert banned not in node, f"{path} has {banned}"
        if node["type"] == "object" and "properties" in node:
            assert "additionalProperties" not in node, f"{path} mixes properties and additionalProperties"


def test_names_columns_and_subresource() -> None:
    crd = build_crd()
    assert crd["metadata"]["name"] == "finetunejobs.finetune.dev"
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == ("FineTuneJob", "finetunejobs", ["ftj"])
    assert crd["spec"]["scope"] == "Namespaced"
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = [col["name"] for col in version["additionalPrinterColumns"] if col.get("priority", 0) == 0]
    assert columns == ["Phase", "Method", "Model", "Progress", "Loss", "Age"]


def test_every_rule_is_in_the_crd_with_its_message() -> None:
    from finetune_api.crd import _model_classes
    from finetune_api.resource import ROOT_RULES
    from finetune_api.spec import ApiModel, FineTuneJobSpec

    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    in_crd = [v for _, node in _walk(schema) for v in node.get("x-kubernetes-validations", [])]
    rules = list(ROOT_RULES)
    for cls in _model_classes(FineTuneJobSpec).values():
        if issubclass(cls, ApiModel):
            rules.extend(cls.rules)
    assert len(rules) >= 20
    for rule in rules:
        assert {"rule": rule.cel, "message": rule.message} in in_crd, rule.message


def test_spec_fields_except_policy_are_immutable() -> None:
    spec = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    immutable = {name for name, prop in spec["properties"].items()
                 if {"rule": "self == oldSelf", "message": "is immutable"} in prop.get("x-kubernetes-validations", [])}
    assert immutable == {"model", "dataset", "method", "objective", "hyperparameters", "resources",
                         "distributed", "output", "preflight"}
    assert "suspend" not in immutable
    # The optional ones, by a rule on the spec that also sees them added or removed.
    on_spec = [r["rule"] for r in spec["x-kubernetes-validations"] if "oldSelf" in r["rule"]]
    assert on_spec == [unchanged_optional("image"), unchanged_optional("queueName")]
    # What may change says how it takes effect, in `kubectl explain`.
    for name, prop in spec["properties"].items():
        fixed = name in immutable or name in ("image", "queueName")
        assert ("Immutable" in prop["description"]) is fixed, name
        assert fixed or "May change" in prop["description"], name


def test_a_finished_jobs_spec_cannot_change() -> None:
    root = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    [rule] = [r for r in root["x-kubernetes-validations"] if "oldSelf" in r["rule"]]
    assert "self.spec == oldSelf.spec" in rule["rule"] and "finished" in rule["message"]
