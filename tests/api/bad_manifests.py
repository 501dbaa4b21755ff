"""A table of bad FineTuneJob manifests and the message each must produce.

`message` is a substring of what `finetune validate` prints, worded as the Kubernetes API server
words it, so the same substring is expected from `kubectl apply` when `server` is true (the CRD's
schema and CEL rules can judge it). Used by tests/api and by tests/cluster.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import yaml

BASE: dict[str, Any] = {
    "apiVersion": "finetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "bad-example"},
    "spec": {
        "model": {"uri": "meta-llama/Llama-3.2-1B"},
        "dataset": {"train": "s3://datasets/train.jsonl", "format": "prompt_completion"},
        "method": {"type": "lora"},
        "output": {"uri": "s3://models/out", "credentialsSecret": {"name": "s3-credentials"}},
    },
}


@dataclass(frozen=True)
class Bad:
    name: str
    text: str
    message: str
    server: bool = True


def _with(path: str, value: Any = None, delete: bool = False) -> str:
    """BASE with one field set (dotted path under the document) or deleted, as YAML."""
    doc = copy.deepcopy(BASE)
    *parents, leaf = path.split(".")
    node = doc
    for key in parents:
        node = node.setdefault(key, {})
    if delete:
        del node[leaf]
    else:
        node[leaf] = value
    return yaml.safe_dump(doc, sort_keys=False)


def _spec(**sections: Any) -> str:
    doc = copy.deepcopy(BASE)
    doc["spec"].update(sections)
    return yaml.safe_dump(doc, sort_keys=False)


def _yaml_under(section: str, line: str) -> str:
    """BASE as YAML with one raw YAML line first under a top-level section (anchors, .inf, depth:
    what a dict cannot carry through yaml.safe_dump)."""
    return yaml.safe_dump(BASE, sort_keys=False).replace(f"{section}:\n", f"{section}:\n  {line}\n", 1)


#: "Billion laughs": 9 levels of 9 aliases each, a few hundred bytes that expand to 9^8 strings.
_ALIAS_BOMB = "\n  ".join(
    ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    + [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
)

BAD_MANIFESTS: list[Bad] = [
    Bad("wrong-type-batch-size", _with("spec.hyperparameters.batchSize", "four"),
        'spec.hyperparameters.batchSize in body must be of type integer: "string"'),
    Bad("wrong-type-bool", _with("spec.model.trustRemoteCode", "true"),
        'spec.model.trustRemoteCode in body must be of type boolean: "string"'),
    Bad("wrong-type-spec-list", _with("spec.hyperparameters", [1, 2]),
        'spec.hyperparameters in body must be of type object: "array"'),
    Bad("unknown-method", _with("spec.method.type", "lorax"),
        'spec.method.type: Unsupported value: "lorax": supported values: "full", "lora", "qlora"'),
    Bad("unknown-objective", _with("spec.objective.type", "rlhf"),
        'spec.objective.type: Unsupported value: "rlhf"'),
    Bad("unknown-format", _with("spec.dataset.format", "xml"),
        'spec.dataset.format: Unsupported value: "xml"'),
    Bad("quant-bits", _spec(method={"type": "qlora"}, model={"uri": "a/b", "quantization": {"bits": 5}}),
        'spec.model.quantization.bits: Unsupported value: 5: supported values: "4", "8"'),
    Bad("negative-learning-rate", _with("spec.hyperparameters.learningRate", -0.001),
        "spec.hyperparameters.learningRate in body should be greater than 0"),
    Bad("zero-batch-size", _with("spec.hyperparameters.batchSize", 0),
        "spec.hyperparameters.batchSize in body should be greater than or equal to 1"),
    Bad("zero-epochs", _with("spec.hyperparameters.epochs", 0),
        "spec.hyperparameters.epochs in body should be greater than 0"),
    Bad("negative-checkpoint-interval", _with("spec.checkpointing.everySteps", -5),
        "spec.checkpointing.everySteps in body should be greater than or equal to 1"),
    Bad("validation-split-too-big", _with("spec.dataset.validationSplit", 1.5),
        "spec.dataset.validationSplit in body should be less than 1"),
    Bad("missing-output", _with("spec.output", delete=True), "spec.output: Required value"),
    Bad("missing-dataset-format", _with("spec.dataset.format", delete=True), "spec.dataset.format: Required value"),
    Bad("missing-model", _with("spec.model", delete=True), "spec.model: Required value"),
    Bad("unknown-field-under-spec", _with("spec.learningRate", 0.1), 'unknown field "spec.learningRate"'),
    Bad("unknown-field-nested", _with("spec.method.lora", {"rank": 8}), 'unknown field "spec.method.lora.rank"'),
    Bad("malformed-model-uri", _with("spec.model.uri", "http://example.com/model"),
        "spec.model.uri in body should match"),
    Bad("malformed-output-uri", _with("spec.output.uri", "hf://org/name"), "spec.output.uri in body should match"),
    Bad("malformed-bucket", _with("spec.dataset.train", "s3://A_Bucket/x"), "spec.dataset.train in body should match"),
    Bad("malformed-quantity", _with("spec.resources.cpu", "lots"), "spec.resources.cpu in body should match"),
    Bad("malformed-secret-name", _with("spec.output.credentialsSecret.name", "My_Secret"),
        "spec.output.credentialsSecret.name in body should match"),
    Bad("qlora-without-quantization", _with("spec.method.type", "qlora"),
        "method.type qlora needs model.quantization (bits 4 or 8)"),
    Bad("quantization-without-qlora", _with("spec.model.quantization", {"bits": 4}),
        "model.quantization needs method.type qlora"),
    Bad("conflicting-strategies", _spec(distributed={"strategy": "fsdp", "fsdp": {}, "deepspeed": {"zeroStage": 3}}),
        "distributed.fsdp and distributed.deepspeed are mutually exclusive"),
    Bad("deepspeed-block-wrong-strategy", _spec(distributed={"deepspeed": {"zeroStage": 2}}),
        "distributed.deepspeed needs distributed.strategy deepspeed"),
    Bad("offload-params-stage-2",
        _spec(distributed={"strategy": "deepspeed", "deepspeed": {"zeroStage": 2, "offloadParams": True}}),
        "distributed.deepspeed.offloadParams needs zeroStage 3"),
    Bad("fsdp-with-qlora",
        _spec(method={"type": "qlora"}, model={"uri": "a/b", "quantization": {"bits": 4}}, distributed={"strategy": "fsdp"}),
        "distributed.strategy fsdp and deepspeed cannot shard quantized (qlora) weights; use ddp"),
    Bad("multi-node-without-gpus", _spec(resources={"nodes": 2, "gpusPerNode": 0}),
        "resources.gpusPerNode must be at least 1 when resources.nodes > 1"),
    Bad("ppo-without-reward-model", _spec(objective={"type": "ppo"}),
        "objective.type ppo needs objective.ppo.rewardModel"),
    Bad("packing-with-dpo",
        _spec(objective={"type": "dpo"}, dataset={"train": "s3://datasets/p.jsonl", "format": "preference", "packing": True}),
        "dataset.packing is only for objective.type sft"),
    Bad("dpo-on-text", _spec(objective={"type": "dpo"}), "objective.type dpo and reward need dataset.format preference"),
    Bad("preference-data-for-sft", _with("spec.dataset.format", "preference"),
        "dataset.format preference needs objective.type dpo, reward or ppo"),
    Bad("block-for-other-method", _with("spec.method.ia3", {"targetModules": ["k_proj"]}),
        "method.ia3 applies only to type ia3"),
    Bad("adalora-target-above-init", _spec(method={"type": "adalora", "adalora": {"initR": 4, "targetR": 8}}),
        "method.adalora.targetR must not exceed method.adalora.initR"),
    Bad("prefix-with-checkpointing", _spec(method={"type": "prefix"}, hyperparameters={"gradientCheckpointing": True}),
        "hyperparameters.gradientCheckpointing cannot be used with method.type prefix"),
    Bad("full-saving-adapter", _spec(method={"type": "full"}, output={"uri": "s3://models/x", "save": ["adapter"]}),
        "output.save adapter needs a PEFT method"),
    Bad("assistant-only-without-messages", _with("spec.dataset.lossMasking", "assistant_only"),
        "dataset.lossMasking assistant_only needs dataset.format messages"),
    Bad("ewc-without-replay",
        _spec(objective={"continual": {"fromArtifact": "s3://models/old", "regularization": {"type": "ewc"}}}),
        "objective.continual.regularization ewc needs objective.continual.replay"),
    Bad("toleration-operator", _spec(resources={"tolerations": [{"key": "a", "operator": "In"}]}),
        'spec.resources.tolerations[0].operator: Unsupported value: "In"'),
    Bad("name-too-long", _with("metadata.name", "a" * 60), "metadata.name must be at most 52 characters"),
    Bad("not-a-finetunejob", _with("kind", "Deployment"), "not a FineTuneJob", server=False),
    Bad("wrong-api-version", _with("apiVersion", "finetune.dev/v1"), "not a FineTuneJob", server=False),
    Bad("empty-file", "", "empty file", server=False),
    Bad("comments-only", "# nothing here\n", "empty file", server=False),
    Bad("invalid-yaml", "apiVersion: finetune.dev/v1alpha1\nkind: FineTuneJob\nspec: [unclosed\n",
        "invalid YAML: line 4", server=False),
    Bad("yaml-list", "- a\n- b\n", "expected a FineTuneJob object, got array", server=False),
    # What the API server (or kubectl, parsing for it) refuses before or beside the schema.
    Bad("nested-500-deep", _yaml_under("spec", "image: " + "[" * 500 + "]" * 500),
        'spec.image: Invalid value: "array"'),
    Bad("alias-bomb", _yaml_under("metadata", _ALIAS_BOMB), "document contains excessive aliasing"),
    Bad("annotations-over-256k", _with("metadata.annotations", {"note": "x" * 300_000}),
        "metadata.annotations: Too long: may not be more than 262144 bytes"),
    Bad("annotation-of-5mb", _with("metadata.annotations", {"note": "x" * 5_000_000}),
        "Request entity too large: limit is 3145728"),
    Bad("infinite-max-grad-norm", _yaml_under("spec", "hyperparameters: {maxGradNorm: .inf}"), "unsupported value: +Inf"),
    Bad("file-output-on-cluster", _with("spec.output.uri", "file:///tmp/out"),
        "spec.output.uri must be s3:// or pvc:// for a job on the cluster"),
    Bad("local-path-output-on-cluster", _with("spec.output.uri", "./runs/out"),
        "spec.output.uri must be s3:// or pvc:// for a job on the cluster"),
    Bad("nan-learning-rate", _yaml_under("spec", "hyperparameters: {learningRate: .nan}"), "unsupported value: NaN"),
]
