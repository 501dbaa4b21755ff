"""The FineTuneJob API (finetune.dev/v1alpha1): the single source of truth.

The CRD's schema (crds/), the chart's copy, `finetune validate`, the operator and the trainer all
come from these models. Python names are snake_case; the wire is camelCase. Every model forbids
unknown fields, and types are strict, as the Kubernetes API server's schema validation is.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from .rules import Rule, TransitionRule, enforce, unchanged_optional

# --- Shared field types --------------------------------------------------------------------

_S3 = r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?"
_FILE = r"file:///.+|/.+|\./.+"
_PVC = r"pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/.*)?"
_HF = r"hf://[A-Za-z0-9][-\w.]*(/[-\w.]+)?|[A-Za-z0-9][-\w.]*/[-\w.]+"

#: Where a model or dataset comes from: a Hugging Face id (`org/name` or `hf://org/name`, read
#: through the local cache), `s3://bucket/key`, `file:///abs`, an absolute or `./relative` path,
#: or `pvc://claim/path` (mounted into the pod by the operator).
SOURCE_URI_PATTERN = rf"^({_S3}|{_FILE}|{_PVC}|{_HF})$"
#: Where results go: object storage, a local path, or a PVC.
OUTPUT_URI_PATTERN = rf"^({_S3}|{_FILE}|{_PVC})$"

SourceUri = Annotated[str, Field(pattern=SOURCE_URI_PATTERN, max_length=2048)]
OutputUri = Annotated[str, Field(pattern=OUTPUT_URI_PATTERN, max_length=2048)]
ShortStr = Annotated[str, Field(min_length=1, max_length=253)]
ModuleList = Annotated[list[Annotated[str, Field(min_length=1, max_length=253)]], Field(max_length=64)]
Quantity = Annotated[
    str,
    Field(
        pattern=r"^([0-9]+(\.[0-9]+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$",
        max_length=64,
        description="A Kubernetes quantity such as 4, 500m, 16Gi.",
    ),
]
DType = Literal["auto", "float32", "bfloat16", "float16"]

# Typed as pydantic's JsonDict expects (a plain dict literal infers a narrower, rejected type).
IMMUTABLE: dict[str, Any] = {"x-kubernetes-validations": [{"rule": "self == oldSelf", "message": "is immutable"}]}
#: The end of the description of the sections the trainer reads when a pod starts.
AT_POD_START = (
    " May change: the trainer reads it when a pod starts; the operator writes the edit to the job's spec "
    "ConfigMap when no trainer pod runs (before the first start, while suspended), so pods started afterwards "
    "use it."
)
#: The end of the description of every field a spec edit may not change.
FIXED = " Immutable: set when the job is created."


class ApiModel(BaseModel):
    """Base for every spec model: camelCase on the wire, unknown fields rejected, strict types."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        strict=True,
        validate_default=False,
        # JSON has no infinities or NaN, so the API server never holds one; a NaN would otherwise
        # fail a bound check with a misleading message ("should be less than or equal to 1").
        allow_inf_nan=False,
    )
    #: Cross-field rules of this object (see rules.py); rendered into the CRD as CEL.
    rules: ClassVar[tuple[Rule, ...]] = ()
    #: Rules about updates of this object, checked by the API server only (rules.TransitionRule).
    transition_rules: ClassVar[tuple[TransitionRule, ...]] = ()

    @model_validator(mode="after")
    def _enforce_rules(self) -> Any:
        enforce(type(self).rules, self)
        self.fill_defaults()
        return self

    def fill_defaults(self) -> None:
        """Defaults that depend on other fields; run after the rules have passed."""

    def wire(self) -> dict[str, Any]:
        """The object as it travels: camelCase, without unset optional fields."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# --- model ---------------------------------------------------------------------------------


class Quantization(ApiModel):
    """bitsandbytes quantization of the frozen base weights (QLoRA)."""

    bits: Literal[4, 8] = Field(4, description="4-bit (NF4/FP4) or 8-bit (LLM.int8) base weights.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type; ignored for 8-bit.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: DType = Field("auto", description="Dtype of the matmuls; auto = bfloat16 on GPU, float32 on CPU.")


class ModelSpec(ApiModel):
    """The base model to fine-tune."""

    uri: SourceUri = Field(description="Hugging Face id, s3://, file://, local path or pvc:// URI of the base model.")
    revision: ShortStr | None = Field(None, description="Branch, tag or commit of a Hugging Face model.")
    gguf_file: ShortStr | None = Field(None, description="Load this GGUF file inside `uri` (dequantized).")
    dtype: DType = Field("auto", description="Weights dtype; auto = bfloat16 on GPUs that support it, else float32.")
    trust_remote_code: bool = Field(False, description="Run modelling code shipped with the model. Off by default.")
    tokenizer: SourceUri | None = Field(None, description="Tokenizer from another location than the model.")
    chat_template: Annotated[str, Field(max_length=65536)] | None = Field(
        None, description="Jinja chat template that replaces the tokenizer's."
    )
    quantization: Quantization | None = Field(None, description="Load the base weights quantized (qlora).")


# --- dataset -------------------------------------------------------------------------------

DatasetFormat = Literal["text", "prompt_completion", "messages", "alpaca", "preference"]
LossMasking = Literal["completion_only", "assistant_only", "all"]
ChatRole = Literal["system", "user", "assistant", "tool"]


class FieldMapping(ApiModel):
    """Column names in the user's data, for each field the format reads (defaults in brackets)."""

    text: ShortStr | None = Field(None, description="[text] Raw text for format text.")
    prompt: ShortStr | None = Field(None, description="[prompt] Prompt for prompt_completion and preference.")
    completion: ShortStr | None = Field(None, description="[completion] Target for prompt_completion.")
    messages: ShortStr | None = Field(
        None, description="[messages, or conversations] List of {role, content} (or {from, value}) for messages."
    )
    instruction: ShortStr | None = Field(None, description="[instruction] Alpaca instruction.")
    input: ShortStr | None = Field(None, description="[input] Alpaca input (optional column).")
    output: ShortStr | None = Field(None, description="[output] Alpaca output.")
    chosen: ShortStr | None = Field(None, description="[chosen] Preferred answer (string or messages).")
    rejected: ShortStr | None = Field(None, description="[rejected] Dispreferred answer (string or messages).")
    label: ShortStr | None = Field(None, description="[label] Class label, for accuracy/F1 evaluation.")
    role: ShortStr | None = Field(
        None, description="[role, or from] Key of a message's speaker in messages and chat preference data."
    )
    content: ShortStr | None = Field(
        None, description="[content, or value] Key of a message's text in messages and chat preference data."
    )
    roles: Annotated[dict[str, ChatRole], Field(max_length=64)] | None = Field(
        None,
        description="The data's role names -> system, user, assistant or tool (human, gpt, bot, model, prompter "
        "... are recognised without it).",
    )

    def column(self, name: str) -> str:
        """The user's column for a canonical field name."""
        value = getattr(self, name)
        return value if value is not None else name


class DatasetSpec(ApiModel):
    """Training data and how to turn it into tokens."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "!has(self.validation) || !has(self.validationSplit)",
            "dataset.validation and dataset.validationSplit are mutually exclusive",
            lambda d: d.validation is None or d.validation_split is None,
        ),
        Rule(
            "!has(self.lossMasking) || self.lossMasking != 'assistant_only' || self.format == 'messages'",
            "dataset.lossMasking assistant_only needs dataset.format messages",
            lambda d: d.loss_masking != "assistant_only" or d.format == "messages",
        ),
        Rule(
            "!has(self.lossMasking) || self.lossMasking != 'completion_only'"
            " || self.format in ['prompt_completion', 'alpaca', 'messages']",
            "dataset.lossMasking completion_only needs dataset.format prompt_completion, alpaca or messages",
            lambda d: d.loss_masking != "completion_only"
            or d.format in ("prompt_completion", "alpaca", "messages"),
        ),
    )

    train: SourceUri = Field(
        description="Training data: a JSON, JSONL, Parquet, CSV or TSV file, a folder or glob (*.jsonl) of them, "
        "or a folder saved by datasets' save_to_disk."
    )
    validation: SourceUri | None = Field(None, description="Held-out data; else a split of train is held out.")
    validation_split: float | None = Field(
        None, gt=0, lt=1, description="Fraction of train held out when no validation URI is given (default 0.1)."
    )
    format: DatasetFormat = Field(description="How rows are laid out.")
    fields: FieldMapping = Field(default_factory=FieldMapping, description="The user's own column names.")
    loss_masking: LossMasking | None = Field(
        None,
        description="Which tokens carry loss. Default: completion_only for prompt_completion and alpaca, "
        "assistant_only for messages, all for text.",
    )
    packing: bool = Field(False, description="Pack several examples per sequence (no cross-attention between them).")
    max_seq_length: int = Field(1024, ge=8, le=1048576, description="Longer examples are truncated.")
    max_samples: int | None = Field(None, ge=1, description="Use at most this many training rows.")

    def fill_defaults(self) -> None:
        if self.validation is None and self.validation_split is None:
            self.validation_split = 0.1
        if self.loss_masking is None:
            self.loss_masking = {
                "prompt_completion": "completion_only",
                "alpaca": "completion_only",
                "messages": "assistant_only",
            }.get(self.format, "all")  # type: ignore[assignment]


# --- method --------------------------------------------------------------------------------

MethodType = Literal["full", "lora", "qlora", "dora", "adalora", "ia3", "prefix", "prompt", "ptuning"]
LORA_FAMILY = ("lora", "qlora", "dora", "adalora")
PROMPT_LEARNING = ("prefix", "prompt", "ptuning")
PEFT_METHODS = (*LORA_FAMILY, "ia3", *PROMPT_LEARNING)


class LoraParams(ApiModel):
    """LoRA (also QLoRA and DoRA): low-rank updates to the target modules."""

    r: int = Field(16, ge=1, le=4096, description="Rank of the update matrices.")
    alpha: int = Field(32, ge=1, description="Scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rsLora).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA path.")
    target_modules: ModuleList | None = Field(None, description="Module names to adapt; default: every linear layer.")
    modules_to_save: ModuleList | None = Field(None, description="Modules trained in full and saved (e.g. lm_head).")
    rs_lora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r).")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")


class AdaLoraParams(ApiModel):
    """AdaLoRA: LoRA whose rank budget is reallocated during training."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "self.targetR <= self.initR",
            "method.adalora.targetR must not exceed method.adalora.initR",
            lambda a: a.target_r <= a.init_r,
        ),
    )

    init_r: int = Field(12, ge=1, le=4096, description="Initial rank of every adapted matrix.")
    target_r: int = Field(8, ge=1, le=4096, description="Average rank after pruning.")
    tinit: int = Field(0, ge=0, description="Steps of warm-up before pruning starts.")
    tfinal: int = Field(0, ge=0, description="Steps at the end with the final ranks frozen.")
    delta_t: int = Field(1, ge=1, description="Steps between two budget reallocations.")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA path.")
    target_modules: ModuleList | None = Field(None, description="Module names to adapt; default: every linear layer.")
    orth_reg_weight: float = Field(0.5, ge=0, description="Orthogonality regulariser weight.")


class IA3Params(ApiModel):
    """IA3: learned rescaling vectors on keys, values and feed-forward activations."""

    target_modules: ModuleList | None = Field(None, description="Modules to rescale; default: PEFT's per-architecture list.")
    feedforward_modules: ModuleList | None = Field(
        None, description="Subset of targetModules that are feed-forward layers (scaled on their input)."
    )


class PromptLearningParams(ApiModel):
    """Prefix tuning, prompt tuning and P-tuning v2: trained virtual tokens."""

    num_virtual_tokens: int = Field(20, ge=1, le=1024, description="Number of virtual tokens.")
    init_text: Annotated[str, Field(min_length=1, max_length=4096)] | None = Field(
        None, description="prompt: initialise the virtual tokens from this text."
    )
    encoder_hidden_size: int | None = Field(None, ge=1, description="ptuning: hidden size of the prompt encoder.")
    prefix_projection: bool = Field(False, description="prefix: reparameterise the prefix through an MLP.")


class MethodSpec(ApiModel):
    """How the weights are updated."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "!has(self.lora) || self.type in ['lora', 'qlora', 'dora']",
            "method.lora applies only to type lora, qlora or dora",
            lambda m: m.lora is None or m.type in ("lora", "qlora", "dora"),
        ),
        Rule(
            "!has(self.adalora) || self.type == 'adalora'",
            "method.adalora applies only to type adalora",
            lambda m: m.adalora is None or m.type == "adalora",
        ),
        Rule(
            "!has(self.ia3) || self.type == 'ia3'",
            "method.ia3 applies only to type ia3",
            lambda m: m.ia3 is None or m.type == "ia3",
        ),
        Rule(
            "!has(self.promptLearning) || self.type in ['prefix', 'prompt', 'ptuning']",
            "method.promptLearning applies only to type prefix, prompt or ptuning",
            lambda m: m.prompt_learning is None or m.type in PROMPT_LEARNING,
        ),
    )

    type: MethodType = Field(description="full, lora, qlora, dora, adalora, ia3, prefix, prompt or ptuning.")
    lora: LoraParams | None = Field(None, description="Parameters for lora, qlora and dora.")
    adalora: AdaLoraParams | None = Field(None, description="Parameters for adalora.")
    ia3: IA3Params | None = Field(None, description="Parameters for ia3.")
    prompt_learning: PromptLearningParams | None = Field(None, description="Parameters for prefix, prompt, ptuning.")

    def fill_defaults(self) -> None:
        if self.type in ("lora", "qlora", "dora") and self.lora is None:
            self.lora = LoraParams()
        elif self.type == "adalora" and self.adalora is None:
            self.adalora = AdaLoraParams()
        elif self.type == "ia3" and self.ia3 is None:
            self.ia3 = IA3Params()
        elif self.type in PROMPT_LEARNING and self.prompt_learning is None:
            self.prompt_learning = PromptLearningParams()

    @property
    def is_peft(self) -> bool:
        return self.type in PEFT_METHODS


# --- objective -----------------------------------------------------------------------------

ObjectiveType = Literal["sft", "dpo", "reward", "ppo"]
PREFERENCE_OBJECTIVES = ("dpo", "reward", "ppo")


class PreferenceParams(ApiModel):
    """DPO: how strongly to prefer chosen over rejected, relative to the reference model."""

    beta: float = Field(0.1, gt=0, description="Inverse temperature of the implicit reward; higher = closer to reference.")
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down"] = (
        Field("sigmoid", description="DPO loss variant, as TRL names it.")
    )
    label_smoothing: float = Field(0.0, ge=0, le=0.5, description="Assumed label noise (robust / cDPO).")


class PpoParams(ApiModel):
    """objective ppo: RLHF against a reward model trained with objective reward. It runs TRL's
    GRPOTrainer (TRL ships no PPOTrainer any more): PPO's clipped objective on group-normalised
    rewards of several sampled answers per prompt, no value network, a KL penalty toward the start."""

    reward_model: SourceUri = Field(description="URI of the reward model artifact (objective reward).")
    kl_coef: float = Field(0.05, ge=0, description="Weight of the KL penalty toward the starting policy.")
    response_length: int = Field(32, ge=1, le=4096, description="Tokens generated per prompt.")
    ppo_epochs: int = Field(4, ge=1, le=64, description="Optimisation passes over each batch of rollouts.")
    temperature: float = Field(0.7, gt=0, le=10, description="Sampling temperature of rollouts.")


class Replay(ApiModel):
    """Earlier data mixed into the new data, against forgetting."""

    data: SourceUri = Field(description="Earlier task's data (same format as the new dataset).")
    ratio: float = Field(0.2, gt=0, lt=1, description="Fraction of each epoch's rows drawn from the earlier data.")


class Regularization(ApiModel):
    """Penalty on moving away from the starting weights."""

    type: Literal["l2", "ewc"] = Field(description="l2 (plain distance) or ewc (Fisher-weighted distance).")
    weight: float = Field(0.1, ge=0, description="Weight of the penalty in the loss.")
    fisher_samples: int = Field(64, ge=1, le=100000, description="ewc: replay examples used to estimate the Fisher diagonal.")


class Continual(ApiModel):
    """Continue from an earlier artifact instead of the base model alone."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "!has(self.regularization) || self.regularization.type != 'ewc' || has(self.replay)",
            "objective.continual.regularization ewc needs objective.continual.replay (the Fisher is estimated on it)",
            lambda c: c.regularization is None or c.regularization.type != "ewc" or c.replay is not None,
        ),
    )

    from_artifact: SourceUri = Field(description="Earlier output of a FineTuneJob (adapter or full model) to start from.")
    replay: Replay | None = Field(None, description="Mix earlier data into the new data.")
    regularization: Regularization | None = Field(None, description="Pull the weights toward the starting point.")


class ObjectiveSpec(ApiModel):
    """What the model is trained to do."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "self.type != 'ppo' || has(self.ppo)",
            "objective.type ppo needs objective.ppo.rewardModel",
            lambda o: o.type != "ppo" or o.ppo is not None,
        ),
        Rule(
            "!has(self.ppo) || self.type == 'ppo'",
            "objective.ppo applies only to type ppo",
            lambda o: o.ppo is None or o.type == "ppo",
        ),
        Rule(
            "!has(self.preference) || self.type == 'dpo'",
            "objective.preference applies only to type dpo",
            lambda o: o.preference is None or o.type == "dpo",
        ),
    )

    type: ObjectiveType = Field(
        "sft",
        description="sft, dpo, reward (train a reward model) or ppo (RLHF with that reward model; runs TRL's "
        "GRPOTrainer: PPO's clipped objective on group-normalised rewards, no value network).",
    )
    preference: PreferenceParams | None = Field(None, description="DPO parameters.")
    ppo: PpoParams | None = Field(None, description="PPO parameters (run with TRL's GRPOTrainer), with the reward model.")
    continual: Continual | None = Field(None, description="Continual fine-tuning from an earlier artifact.")

    def fill_defaults(self) -> None:
        if self.type == "dpo" and self.preference is None:
            self.preference = PreferenceParams()


# --- hyperparameters, resources, distribution ---------------------------------------------


class Hyperparameters(ApiModel):
    """Optimisation settings."""

    epochs: float = Field(1.0, gt=0, le=1000, description="Passes over the training data (ignored when maxSteps is set).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    batch_size: int = Field(4, ge=1, le=65536, description="Examples per device per micro-step.")
    gradient_accumulation: int = Field(1, ge=1, le=65536, description="Micro-steps per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak learning rate.")
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"] = (
        Field("cosine", description="Learning-rate schedule after warm-up.")
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="Decoupled weight decay.")
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "sgd", "adafactor"] = Field(
        "adamw_torch", description="Optimizer, as transformers names it."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory.")
    seed: int = Field(42, ge=0, le=2**31 - 1, description="Seed of weights init, data order and dropout.")


class Toleration(ApiModel):
    """A Kubernetes toleration for the trainer pods."""

    key: ShortStr | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: Annotated[str, Field(max_length=253)] | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(None, ge=0)


class Resources(ApiModel):
    """Where and on what the trainer runs."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "self.nodes == 1 || self.gpusPerNode >= 1",
            "resources.gpusPerNode must be at least 1 when resources.nodes > 1",
            lambda r: r.nodes == 1 or r.gpus_per_node >= 1,
        ),
    )

    nodes: int = Field(1, ge=1, le=1024, description="Pods (one per node), each with gpusPerNode GPUs.")
    gpus_per_node: int = Field(1, ge=0, le=64, description="nvidia.com/gpu per pod; 0 runs on CPU.")
    cpu: Quantity | None = Field(None, description="CPU request and limit per pod.")
    memory: Quantity | None = Field(None, description="Memory request and limit per pod.")
    node_selector: Annotated[dict[str, Annotated[str, Field(max_length=253)]], Field(max_length=64)] | None = Field(
        None, description="Node labels the pods must match."
    )
    tolerations: Annotated[list[Toleration], Field(max_length=64)] | None = Field(
        None, description="Extra tolerations (GPU taints are tolerated already)."
    )
    priority_class_name: ShortStr | None = Field(None, description="PriorityClass of the pods.")
    ephemeral_storage: Quantity | None = Field(
        None,
        description="Local disk per pod for /scratch (base model, artifact and checkpoints before upload): its size "
        "limit and the pod's ephemeral-storage request. Default: the operator's (chart trainerPods.scratchSize).",
    )


class DeepSpeedParams(ApiModel):
    """DeepSpeed ZeRO; its JSON config is generated from these fields."""

    zero_stage: Literal[2, 3] = Field(2, description="2 shards optimizer state and gradients; 3 also parameters.")
    offload_optimizer: bool = Field(False, description="Keep optimizer state in CPU RAM.")
    offload_params: bool = Field(False, description="Keep parameters in CPU RAM (stage 3 only).")


class FsdpParams(ApiModel):
    """PyTorch FSDP2 (fully_shard)."""

    cpu_ram_efficient_loading: bool = Field(True, description="Load weights on rank 0 only and broadcast.")
    reshard_after_forward: bool = Field(True, description="Free gathered parameters after forward (ZeRO-3 style).")


class Distributed(ApiModel):
    """How several processes share the work."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "!(has(self.fsdp) && has(self.deepspeed))",
            "distributed.fsdp and distributed.deepspeed are mutually exclusive",
            lambda d: d.fsdp is None or d.deepspeed is None,
        ),
        Rule(
            "!has(self.deepspeed) || self.strategy == 'deepspeed'",
            "distributed.deepspeed needs distributed.strategy deepspeed",
            lambda d: d.deepspeed is None or d.strategy == "deepspeed",
        ),
        Rule(
            "!has(self.fsdp) || self.strategy == 'fsdp'",
            "distributed.fsdp needs distributed.strategy fsdp",
            lambda d: d.fsdp is None or d.strategy == "fsdp",
        ),
        Rule(
            "!has(self.deepspeed) || !self.deepspeed.offloadParams || self.deepspeed.zeroStage == 3",
            "distributed.deepspeed.offloadParams needs zeroStage 3",
            lambda d: d.deepspeed is None or not d.deepspeed.offload_params or d.deepspeed.zero_stage == 3,
        ),
    )

    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field("ddp", description="ddp, fsdp or deepspeed.")
    fsdp: FsdpParams | None = Field(None, description="FSDP settings (strategy fsdp).")
    deepspeed: DeepSpeedParams | None = Field(None, description="DeepSpeed settings (strategy deepspeed).")
    timeout_seconds: int = Field(1800, ge=10, le=86400, description="Collective-operation and rendezvous timeout.")

    def fill_defaults(self) -> None:
        if self.strategy == "fsdp" and self.fsdp is None:
            self.fsdp = FsdpParams()
        if self.strategy == "deepspeed" and self.deepspeed is None:
            self.deepspeed = DeepSpeedParams()


# --- checkpoints, evaluation, output, run policy ------------------------------------------


class Checkpointing(ApiModel):
    """Checkpoints under <output>/checkpoints/step-N/, each with its manifest."""

    every_steps: int = Field(100, ge=1, description="Save every N optimizer steps (and on SIGTERM).")
    keep: int = Field(2, ge=1, le=1000, description="Keep the newest K complete checkpoints.")
    resume: Literal["auto", "never"] = Field("auto", description="auto: resume from the newest complete checkpoint.")


EvalMetric = Literal["loss", "perplexity", "accuracy", "f1", "bleu", "rouge", "win_rate"]


class Evaluation(ApiModel):
    """Held-out evaluation, before (base) and after (tuned)."""

    metrics: Annotated[list[EvalMetric], Field(min_length=1, max_length=16)] = Field(
        default_factory=lambda: list[EvalMetric](["loss", "perplexity"]),
        description="Metrics to compute on held-out data.",
    )
    every_steps: int | None = Field(None, ge=1, description="Also evaluate every N steps during training.")
    generation_samples: int = Field(0, ge=0, le=100000, description="Held-out prompts answered for bleu/rouge/win_rate.")
    max_new_tokens: int = Field(64, ge=1, le=8192, description="Length cap of generated answers.")
    baseline: bool = Field(True, description="Also evaluate the base model before training.")


class SecretRef(ApiModel):
    """A Secret in the job's namespace."""

    name: Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", max_length=253)]


SaveKind = Literal["adapter", "merged"]


class OutputSpec(ApiModel):
    """Where the artifact goes, and what it contains."""

    uri: OutputUri = Field(
        description="s3:// or pvc:// prefix of the artifact and checkpoints; file:// and local paths only for "
        "finetune run on one machine (in a pod they would be deleted with it)."
    )
    credentials_secret: SecretRef | None = Field(
        None,
        description="Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and optional AWS_ENDPOINT_URL, "
        "AWS_REGION; passed to pods as environment only.",
    )
    save: Annotated[list[SaveKind], Field(min_length=1, max_length=2)] | None = Field(
        None,
        description="adapter and/or merged (base + adapter as full weights). Default: adapter for PEFT methods, "
        "merged (the full model) for full.",
    )


class RunPolicy(ApiModel):
    """Retries, deadlines and clean-up."""

    backoff_limit: int = Field(3, ge=0, le=100, description="Retryable pod failures before the job fails.")
    active_deadline_seconds: int | None = Field(None, ge=1, description="Fail the job after this long.")
    ttl_seconds_after_finished: int | None = Field(None, ge=0, description="Delete the job this long after it ends.")
    stall_timeout_seconds: int | None = Field(
        None, ge=60, description="Mark Stalled (and restart once) when the step has not moved for this long."
    )


class Preflight(ApiModel):
    """The data and memory check the operator runs before it creates the GPU Job."""

    enabled: bool = Field(
        True,
        description="Run `finetune preflight` on the spec in a CPU-only pod (trainer image, the job's credentials) "
        "before the GPU Job is created: the data is read with the trainer's loader and the memory plan is checked "
        "against the node pool's GPU memory. The GPU Job is created only when it passes; otherwise the job fails "
        "with reason InvalidData or WillNotFit and no GPU is taken. Suspended and queued (queueName) jobs run it "
        "before they queue.",
    )
    sample: int = Field(2000, ge=1, le=1000000, description="Rows read at most (big data is checked on its first rows).")


# --- the spec ------------------------------------------------------------------------------


class FineTuneJobSpec(ApiModel):
    """Desired state of a FineTuneJob."""

    # The optional immutable fields (`self == oldSelf` on the field would let one be added or removed).
    transition_rules: ClassVar[tuple[TransitionRule, ...]] = (
        TransitionRule(unchanged_optional("image"),
                       "image is immutable: the Job's pods keep the image they were made with; "
                       "create a new FineTuneJob instead"),
        TransitionRule(unchanged_optional("queueName"),
                       "queueName is immutable: Kueue admits the Job in the queue it was created in; "
                       "create a new FineTuneJob instead"),
    )
    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "self.method.type != 'qlora' || has(self.model.quantization)",
            "method.type qlora needs model.quantization (bits 4 or 8)",
            lambda s: s.method.type != "qlora" or s.model.quantization is not None,
        ),
        Rule(
            "!has(self.model.quantization) || self.method.type == 'qlora'",
            "model.quantization needs method.type qlora (quantized weights cannot be trained directly)",
            lambda s: s.model.quantization is None or s.method.type == "qlora",
        ),
        Rule(
            "!has(self.objective) || !(self.objective.type in ['dpo', 'reward']) || self.dataset.format == 'preference'",
            "objective.type dpo and reward need dataset.format preference",
            lambda s: s.objective.type not in ("dpo", "reward") or s.dataset.format == "preference",
        ),
        Rule(
            "!has(self.objective) || self.objective.type == 'sft' || !has(self.dataset.packing) || !self.dataset.packing",
            "dataset.packing is only for objective.type sft",
            lambda s: s.objective.type == "sft" or not s.dataset.packing,
        ),
        Rule(
            "!has(self.objective) || self.objective.type in ['dpo', 'reward', 'ppo'] || self.dataset.format != 'preference'",
            "dataset.format preference needs objective.type dpo, reward or ppo",
            lambda s: s.objective.type in PREFERENCE_OBJECTIVES or s.dataset.format != "preference",
        ),
        Rule(
            "!has(self.distributed) || !(self.distributed.strategy in ['fsdp', 'deepspeed'])"
            " || !has(self.model.quantization)",
            "distributed.strategy fsdp and deepspeed cannot shard quantized (qlora) weights; use ddp",
            lambda s: s.distributed.strategy == "ddp" or s.model.quantization is None,
        ),
        Rule(
            "!has(self.hyperparameters) || !has(self.hyperparameters.gradientCheckpointing)"
            " || !self.hyperparameters.gradientCheckpointing || self.method.type != 'prefix'",
            "hyperparameters.gradientCheckpointing cannot be used with method.type prefix",
            lambda s: not s.hyperparameters.gradient_checkpointing or s.method.type != "prefix",
        ),
        Rule(
            "!has(self.output.save) || !('adapter' in self.output.save) || self.method.type != 'full'",
            "output.save adapter needs a PEFT method; full fine-tuning saves the whole model (merged)",
            lambda s: s.output.save is None or "adapter" not in s.output.save or s.method.type != "full",
        ),
        Rule(
            "!has(self.output.save) || !('merged' in self.output.save)"
            " || !(self.method.type in ['prefix', 'prompt', 'ptuning'])",
            "output.save merged is not possible for prefix, prompt and ptuning (virtual tokens cannot be merged)",
            lambda s: s.output.save is None or "merged" not in s.output.save or s.method.type not in PROMPT_LEARNING,
        ),
        Rule(
            "!has(self.objective) || self.objective.type != 'reward' || !(self.method.type in ['prefix', 'prompt', 'ptuning'])",
            "objective.type reward cannot use prefix, prompt or ptuning",
            lambda s: s.objective.type != "reward" or s.method.type not in PROMPT_LEARNING,
        ),
    )

    model: ModelSpec = Field(description="The base model." + FIXED, json_schema_extra=IMMUTABLE)
    dataset: DatasetSpec = Field(description="The training data." + FIXED, json_schema_extra=IMMUTABLE)
    method: MethodSpec = Field(description="Full fine-tuning or a PEFT method." + FIXED, json_schema_extra=IMMUTABLE)
    objective: ObjectiveSpec = Field(
        default_factory=ObjectiveSpec, description="sft, dpo, reward or ppo; continual." + FIXED,
        json_schema_extra=IMMUTABLE,
    )
    hyperparameters: Hyperparameters = Field(
        default_factory=Hyperparameters, description="Optimisation settings." + FIXED, json_schema_extra=IMMUTABLE
    )
    resources: Resources = Field(
        default_factory=Resources, description="Nodes, GPUs and placement." + FIXED, json_schema_extra=IMMUTABLE
    )
    distributed: Distributed = Field(
        default_factory=Distributed, description="DDP, FSDP or DeepSpeed." + FIXED, json_schema_extra=IMMUTABLE
    )
    checkpointing: Checkpointing = Field(
        default_factory=Checkpointing, description="Checkpoint cadence and resume." + AT_POD_START)
    evaluation: Evaluation = Field(default_factory=Evaluation, description="Held-out evaluation." + AT_POD_START)
    output: OutputSpec = Field(description="Where the artifact goes." + FIXED, json_schema_extra=IMMUTABLE)
    image: Annotated[str, Field(min_length=1, max_length=512)] | None = Field(
        None, description="Trainer image for this job instead of the operator's default." + FIXED
    )
    suspend: bool = Field(
        False, description="Suspend (or, set back to false, resume) the workload. May change: applied to the Job at once."
    )
    queue_name: Annotated[str, Field(max_length=63, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")] | None = Field(
        None, description="Kueue LocalQueue: sets the kueue.x-k8s.io/queue-name label." + FIXED
    )
    preflight: Preflight = Field(
        default_factory=Preflight, description="The data check before the GPU Job." + FIXED,
        json_schema_extra=IMMUTABLE,
    )
    run_policy: RunPolicy = Field(
        default_factory=RunPolicy,
        description="Retries, deadlines, clean-up. May change: backoffLimit, activeDeadlineSeconds and "
        "ttlSecondsAfterFinished are applied to the running Job at once, stallTimeoutSeconds by the operator's "
        "stall watchdog.",
    )

    def fill_defaults(self) -> None:
        if self.output.save is None:
            self.output.save = ["adapter"] if self.method.is_peft else ["merged"]
