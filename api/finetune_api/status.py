"""FineTuneJob status, and the small documents the trainer hands to the operator.

Only the operator writes status. The trainer reports through its metrics endpoint while it runs
and through the termination message when it ends; both shapes are defined here.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from .constants import MODEL_CACHE_OUTCOMES, Phase


class StatusMetric(StrEnum):
    """The names in status.metrics: the one set the operator (while the trainer runs, from its
    Prometheus endpoint), the trainer's entry point (the termination message) and the recipes
    (their `summary` section of metrics.json) use. A name not listed here is not reported."""

    # While running (operator) and at the end (trainer).
    LOSS = "loss"
    EVAL_LOSS = "evalLoss"
    LEARNING_RATE = "learningRate"
    TOKENS_PER_SECOND = "tokensPerSecond"
    # At the end: objective sft.
    PERPLEXITY = "perplexity"
    BASE_EVAL_LOSS = "baseEvalLoss"
    STEPS = "steps"
    # objective dpo.
    REWARD_MARGIN = "rewardMargin"
    PREFERENCE_ACCURACY = "preferenceAccuracy"
    BASE_REWARD_MARGIN = "baseRewardMargin"
    BASE_PREFERENCE_ACCURACY = "basePreferenceAccuracy"
    # objective reward (and rewardMargin).
    REWARD_ACCURACY = "rewardAccuracy"
    BASE_REWARD_ACCURACY = "baseRewardAccuracy"
    # objective ppo.
    HELD_OUT_REWARD = "heldOutReward"
    BASE_HELD_OUT_REWARD = "baseHeldOutReward"
    FINAL_KL = "finalKl"
    LAST_REWARDS = "lastRewards"
    # objective.continual.
    EARLIER_TASK_LOSS_BEFORE = "earlierTaskLossBefore"
    EARLIER_TASK_LOSS_AFTER = "earlierTaskLossAfter"
    FORGETTING = "forgetting"
    DISTANCE_FROM_START = "distanceFromStart"
    # evaluation.metrics on generated answers.
    BLEU = "bleu"
    ROUGE1 = "rouge1"
    ROUGE2 = "rouge2"
    ROUGE_L = "rougeL"
    WIN_RATE = "win_rate"
    ACCURACY = "accuracy"
    F1 = "f1"


#: status.metrics as the trainer and the operator build it.
StatusMetrics = dict[StatusMetric, float]


class StatusModel(BaseModel):
    """Status is read back from the API server, so types are lax (timestamps arrive as strings)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class Condition(StatusModel):
    """A Kubernetes-style condition."""

    type: str = Field(description="Created, Running, Succeeded, Failed, Suspended, Stalled, Admitted (queued jobs) "
                      "or DataChecked (the preflight).")
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(description="CamelCase reason, one of the named constants.")
    message: str = ""
    last_transition_time: datetime | None = None
    observed_generation: int | None = None


class Progress(StatusModel):
    """Where training is."""

    step: int = 0
    total_steps: int | None = None
    epoch: float | None = None
    percent: int = Field(0, ge=0, le=100)
    eta_seconds: int | None = None


class Checkpoint(StatusModel):
    """The newest complete checkpoint."""

    step: int
    uri: str
    time: datetime | None = None


class Artifact(StatusModel):
    """The finished artifact: exactly what its manifest.json describes."""

    uri: str = Field(description="Prefix of the artifact (holds manifest.json).")
    sha256: str = Field(description="sha256 of manifest.json, which lists every file's sha256.")
    size_bytes: int = Field(description="Total size of the artifact's files.")


class DataCheck(StatusModel):
    """The preflight's summary (spec.preflight): what the data and the memory plan looked like
    before the GPU Job was created. The preflight writes it in its termination message; the
    operator copies it into status.dataCheck."""

    rows: int = Field(0, description="Rows read (the first rows only when `sampled`).")
    sampled: bool = Field(False, description="True when the data has more rows than were read.")
    tokens: int = Field(0, description="Tokens of the rows read, as training tokenizes them.")
    truncated_share: float = Field(0.0, description="Share of examples longer than maxSeqLength (cut).")
    no_loss_share: float = Field(0.0, description="Share of examples without a loss-carrying token (dropped).")
    memory_per_gpu_bytes: int | None = Field(
        None, description="Estimated peak memory per GPU with the margin (absent for a CPU-only spec)."
    )
    gpu_memory_bytes: int | None = Field(
        None, description="The GPU memory the plan was checked against (the operator's setting for the node pool)."
    )
    largest_batch: int | None = Field(None, description="Largest batchSize that fits that GPU memory.")


class FineTuneJobStatus(StatusModel):
    """Observed state of a FineTuneJob."""

    phase: Literal["Pending", "Running", "Succeeded", "Failed", "Suspended"] | None = None
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None
    start_time: datetime | None = None
    completion_time: datetime | None = None
    progress: Progress | None = None
    metrics: dict[str, float] | None = Field(
        None,
        description="Latest metrics: loss, evalLoss, learningRate, tokensPerSecond while running; at the end the "
        "objective's headline numbers (evalLoss, perplexity, rewardMargin, heldOutReward...).",
    )
    last_checkpoint: Checkpoint | None = None
    artifact: Artifact | None = None
    restarts: int = 0
    last_restart_reason: str | None = None
    job_name: str | None = Field(None, description="The batch/v1 Job running the trainer.")
    model_cache: Literal["hit", "miss", "refetched"] | None = Field(
        None,
        description="Where the base model came from with the shared model cache on: hit (read from the cache), "
        "miss (downloaded into it), refetched (a damaged entry was discarded and downloaded again). "
        "Absent when the cache is off or the model is not remote.",
    )
    data_check: DataCheck | None = Field(
        None, description="The preflight's summary (rows, tokens, truncated share, memory per GPU), when it ran."
    )


assert set(Phase.ALL) == set(FineTuneJobStatus.model_fields["phase"].annotation.__args__[0].__args__)  # type: ignore[union-attr]
assert set(MODEL_CACHE_OUTCOMES) == set(FineTuneJobStatus.model_fields["model_cache"].annotation.__args__[0].__args__)  # type: ignore[union-attr]


class FileEntry(StatusModel):
    path: str
    sha256: str
    size_bytes: int


class Manifest(StatusModel):
    """manifest.json: written last under an artifact or checkpoint prefix; its presence marks completeness."""

    kind: Literal["artifact", "checkpoint"]
    files: list[FileEntry]
    step: int | None = None
    base_model: dict[str, Any] = Field(default_factory=dict)
    spec: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    created_at: datetime | None = None

    @property
    def size_bytes(self) -> int:
        return sum(f.size_bytes for f in self.files)


class TerminationMessage(StatusModel):
    """What the trainer writes to /dev/termination-log (at most 4 KiB) as it exits."""

    outcome: Literal["succeeded", "failed", "preempted"]
    reason: str = ""
    message: str = ""
    artifact: Artifact | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    last_checkpoint: Checkpoint | None = None
    #: How the base model was obtained through the shared cache (status.modelCache).
    model_cache: Literal["hit", "miss", "refetched"] | None = None
    #: The preflight's summary (status.dataCheck); only the preflight pod writes it.
    data_check: DataCheck | None = None
