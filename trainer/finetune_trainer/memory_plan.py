"""Memory plan: the peak GPU memory one training process will need, before any GPU is taken.

The estimate adds up what a training step holds at its peak on one device:

- weights: every parameter at the load dtype; with quantization (qlora) the linear layers of the
  blocks at 4 or 8 bits plus their quantization constants, the rest (embeddings, head, norms) at
  the compute dtype;
- trainable parameters, their gradients and the optimizer state: PEFT adapters are kept in fp32
  (PEFT upcasts them); full fine-tuning keeps them at the load dtype (the Trainer does no fp32
  master copy), except under DeepSpeed, whose optimizer keeps an fp32 master copy (12 bytes per
  parameter with Adam);
- activations saved for the backward pass of a micro-batch (batch x sequence length): per layer
  the tensors a decoder block stores (norm inputs, q/k/v, attention output, the MLP's
  gate/up/activation/product; attention itself is fused, SDPA/flash, so no sequence x sequence
  matrix), or with gradient checkpointing only each layer's input plus one layer recomputed;
  plus the logits and the loss's fp32 copies of them (for sft, TRL's tiled log-probabilities
  instead, which never hold all the logits);
- sharding over the data-parallel processes: ZeRO-2 splits gradients and optimizer state, ZeRO-3
  and FSDP also the weights (plus the gathered copy of the layers in flight), offload moves the
  optimizer state (and parameters) to CPU RAM;
- dpo and reward run chosen and rejected side by side (twice the sequences); full-parameter dpo
  holds a frozen reference copy of the weights. ppo's reward model and generation cache are not
  counted.

`Plan.peak_bytes` is what the allocator would report as its peak (torch.cuda.max_memory_allocated);
`Plan.required_bytes` adds the stated margin (MARGIN for fragmentation and what the estimate does
not model) and the CUDA context (CUDA_CONTEXT_BYTES): that is what is compared with the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from finetune_api.spec import LORA_FAMILY, FineTuneJobSpec

#: Share added on top of the estimated allocator peak (fragmentation, temporaries not modelled).
MARGIN = 0.10
#: The CUDA context and kernels of one process, outside the allocator's count.
CUDA_CONTEXT_BYTES = 1 << 30
#: TRL's chunked log-probability tiles: min(tokens, 4096) x 32768 at the compute dtype, one at a time.
LOSS_TILE = (4096, 32768)
#: 4-bit NF4/FP4: one fp32 absmax per 64 weights; double quantization stores it as 8 bits plus one
#: fp32 per 256 blocks (QLoRA paper, section 3).
QUANT_CONSTANT_BYTES = {True: 1 / 64 + 4 / (64 * 256), False: 4 / 64}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: Optimizer state bytes per trainable parameter, per byte of the parameter's own dtype (Adam: m, v).
OPTIMIZER_STATES = {"adamw_torch": 2.0, "adamw_torch_fused": 2.0, "sgd": 0.0, "adafactor": 0.0}
#: 8-bit Adam: two 1-byte states per parameter, whatever the parameter's dtype.
OPTIMIZER_8BIT = ("adamw_8bit", "paged_adamw_8bit")

def gib(n: float) -> str:
    """A size for people: GiB with one decimal, MiB below 1 GiB."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know of a decoder-only model (read from its config)."""

    params: int  # every parameter
    block_linear_params: int  # weights of the Linear layers inside the decoder blocks
    hidden: int
    intermediate: int
    layers: int
    kv_dim: int  # key/value width (num_key_value_heads x head_dim): smaller than hidden with GQA
    vocab: int
    #: (in_features, out_features, module name) of each Linear layer in one block
    block_linears: tuple[tuple[int, int, str], ...] = ()


@dataclass(frozen=True)
class Setup:
    """A training setup as the estimate sees it; `from_spec` builds it from a FineTuneJob spec."""

    shape: ModelShape
    batch_size: int
    seq_len: int
    weight_bytes: float = 2.0  # bytes per weight at the load dtype
    act_bytes: float = 2.0  # bytes per activation element (the compute dtype)
    quant_bits: int | None = None  # 4 or 8: block linears quantized (qlora)
    double_quant: bool = True
    method: str = "lora"  # full, or a PEFT method
    lora_r: int = 16
    lora_targets: tuple[str, ...] | None = None  # None: every linear layer of the blocks
    lora_dropout: bool = True  # dropout on the LoRA path keeps a copy of each adapted input
    adapter_bytes: float = 4.0  # PEFT keeps adapters in fp32 (the QLoRA paper's own code: bf16)
    optimizer: str = "adamw_torch"
    gradient_checkpointing: bool = False
    world_size: int = 1
    strategy: str = "ddp"  # ddp, fsdp, deepspeed
    zero_stage: int = 0  # 2 or 3 with deepspeed; fsdp shards like 3
    offload_optimizer: bool = False
    offload_params: bool = False
    #: bytes per logit at the loss: None = the logits at the compute dtype plus the fp32 upcast
    #: and log-softmax that transformers' cross entropy keeps (act_bytes + 8); a chunked loss
    #: keeps only the logits (act_bytes), a fused linear + cross entropy loss almost nothing (0)
    logit_bytes: float | None = None
    #: the loss never materialises the logits: TRL's SFT computes log-probabilities from the last
    #: hidden states in tiles of LOSS_TILE tokens x vocabulary columns (trl.kernels.chunked_logprob)
    fused_loss: bool = False
    #: sequences per example: dpo and reward run chosen and rejected side by side
    sequences_per_example: int = 1
    #: a frozen copy of the weights (full-parameter dpo's reference model)
    reference_copy: bool = False


@dataclass(frozen=True)
class Plan:
    """The estimate, part by part (bytes on one device)."""

    setup: Setup
    weights: float
    trainable_params: int
    trainable: float  # the trainable parameters' own storage when not part of `weights`
    gradients: float
    optimizer: float
    activations: float
    logits: float
    gathered: float  # FSDP / ZeRO-3: unsharded layers in flight

    @property
    def peak_bytes(self) -> float:
        return (self.weights + self.trainable + self.gradients + self.optimizer + self.activations
                + self.logits + self.gathered)

    @property
    def required_bytes(self) -> float:
        return self.peak_bytes * (1 + MARGIN) + CUDA_CONTEXT_BYTES

    def fits(self, capacity: int) -> bool:
        return self.required_bytes <= capacity

    def largest_batch(self, capacity: int, limit: int = 65536) -> int:
        """The largest micro-batch size whose plan fits `capacity` (0 if not even 1 fits)."""
        lo, hi = 0, limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if estimate(replace(self.setup, batch_size=mid)).fits(capacity):
                lo = mid
            else:
                hi = mid - 1
        return lo

    def lines(self, device: str = "GPU") -> list[str]:
        s = self.setup
        own = f"adapters {gib(self.trainable)}, " if self.trainable else ""
        return [
            f"weights {gib(self.weights)}; {self.trainable_params:,} trainable parameters: {own}gradients "
            f"{gib(self.gradients)}, optimizer {gib(self.optimizer)}",
            f"activations {gib(self.activations)} and loss {gib(self.logits)} for batch {s.batch_size} x "
            f"{s.seq_len} tokens{' with gradient checkpointing' if s.gradient_checkpointing else ''}"
            + (f"; gathered layers {gib(self.gathered)}" if self.gathered else ""),
            f"peak {gib(self.peak_bytes)} per {device}; with the {MARGIN:.0%} margin"
            + (f" and the CUDA context {gib(self.required_bytes)}" if device == "GPU" else
               f" {gib(self.peak_bytes * (1 + MARGIN))}")
            + (f" (sharded over {s.world_size} GPUs, {s.strategy}"
               + (f" ZeRO-{s.zero_stage}" if s.strategy == "deepspeed" else "") + ")" if s.world_size > 1 else ""),
        ]


def _trainable(setup: Setup) -> int:
    sh = setup.shape
    if setup.method == "full":
        return sh.params
    if setup.method in LORA_FAMILY:
        per_layer = sum(setup.lora_r * (i + o) + (o if setup.method == "dora" else 0)
                        for i, o, name in sh.block_linears
                        if setup.lora_targets is None or name in setup.lora_targets)
        return per_layer * sh.layers
    if setup.method == "ia3":
        return sh.layers * (2 * sh.kv_dim + sh.intermediate)
    return 2 * sh.layers * 20 * sh.hidden  # prefix/prompt/ptuning: a few virtual tokens, negligible


def _lora_inputs(setup: Setup) -> float:
    """Activation elements per token per layer that LoRA dropout saves (a copy of each input)."""
    if setup.method not in LORA_FAMILY or not setup.lora_dropout:
        return 0.0
    return float(sum(i for i, _, name in setup.shape.block_linears
                     if setup.lora_targets is None or name in setup.lora_targets))


def layer_activation_elements(setup: Setup) -> float:
    """Elements one decoder layer saves for backward, per token."""
    sh = setup.shape
    # norm input, q/k/v projection input, q k v, q k after rotary embedding, attention output
    attention = 2 * sh.hidden + (sh.hidden + 2 * sh.kv_dim) + (sh.hidden + sh.kv_dim) + sh.hidden
    mlp = 2 * sh.hidden + 4 * sh.intermediate  # norm in, mlp in; gate, up, act(gate), act*up
    return attention + mlp + _lora_inputs(setup)


def estimate(setup: Setup) -> Plan:
    sh = setup.shape
    n = max(1, setup.world_size)
    # Weights.
    if setup.quant_bits is not None:
        per_weight = setup.quant_bits / 8 + (QUANT_CONSTANT_BYTES[setup.double_quant] if setup.quant_bits == 4 else 4 / 4096)
        weights = sh.block_linear_params * per_weight + (sh.params - sh.block_linear_params) * setup.act_bytes
    else:
        weights = sh.params * setup.weight_bytes
    if setup.reference_copy:
        weights *= 2
    trainable_params = _trainable(setup)
    full = setup.method == "full"
    param_bytes = setup.weight_bytes if full else setup.adapter_bytes
    trainable = 0.0 if full else trainable_params * param_bytes
    gradients = trainable_params * param_bytes
    if setup.optimizer in OPTIMIZER_8BIT:
        optimizer = trainable_params * 2.0
    else:
        optimizer = trainable_params * param_bytes * OPTIMIZER_STATES.get(setup.optimizer, 2.0)
    if setup.strategy == "deepspeed" and full and setup.weight_bytes < 4 and setup.optimizer not in OPTIMIZER_8BIT:
        optimizer = trainable_params * 12.0  # fp32 master weights + Adam m, v
    # Sharding.
    gathered = 0.0
    shards_weights = setup.strategy == "fsdp" or (setup.strategy == "deepspeed" and setup.zero_stage >= 3)
    shards_states = shards_weights or (setup.strategy == "deepspeed" and setup.zero_stage >= 2)
    if shards_states:
        gradients /= n
        optimizer /= n
    if shards_weights and n > 1:
        layer = weights / max(1, sh.layers)
        weights /= n
        trainable /= n
        gathered = 2 * layer  # the layer computing and the next one prefetched
    if setup.offload_optimizer:
        optimizer = 0.0
    if setup.offload_params:
        weights, gathered = 0.0, 2 * gathered
    # Activations of one micro-batch.
    tokens = setup.batch_size * setup.sequences_per_example * setup.seq_len
    per_layer = layer_activation_elements(setup) * setup.act_bytes
    if setup.gradient_checkpointing:
        activations = tokens * (sh.layers * sh.hidden * setup.act_bytes + per_layer)
    else:
        activations = tokens * sh.layers * per_layer
    if setup.fused_loss:
        logits = min(tokens, LOSS_TILE[0]) * LOSS_TILE[1] * setup.act_bytes
    else:
        logits = tokens * sh.vocab * (setup.act_bytes + 8 if setup.logit_bytes is None else setup.logit_bytes)
    return Plan(setup, weights, trainable_params, trainable, gradients, optimizer, activations, logits, gathered)


# --- from a model config and a spec -----------------------------------------------------------


def shape_of(config: Any) -> ModelShape:
    """The shape of a transformers config's causal LM, counted on the meta device (no weights)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    layers_module = next((m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0), None)
    linears: list[tuple[int, int, str]] = []
    block_linear = 0
    if layers_module is not None:
        for name, mod in layers_module[0].named_modules():
            if isinstance(mod, torch.nn.Linear):
                linears.append((mod.in_features, mod.out_features, name.rsplit(".", 1)[-1]))
        block_linear = sum(i * o for i, o, _ in linears) * len(layers_module)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(getattr(text, "hidden_size", 0) or getattr(text, "n_embd", 0))
    heads = int(getattr(text, "num_attention_heads", 0) or getattr(text, "n_head", 1))
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or hidden // max(1, heads))
    intermediate = int(getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden)
    n_layers = int(getattr(text, "num_hidden_layers", 0) or getattr(text, "n_layer", 0) or len(layers_module or []))
    return ModelShape(
        params=params, block_linear_params=block_linear, hidden=hidden, intermediate=intermediate,
        layers=n_layers, kv_dim=kv_heads * head_dim, vocab=int(text.vocab_size), block_linears=tuple(linears),
    )


def setup_from_spec(spec: FineTuneJobSpec, shape: ModelShape, seq_len: int | None = None, *,
                    on_gpu: bool = True) -> Setup:
    """The Setup a spec trains with on GPUs (bf16 unless the spec says otherwise), or on CPU (fp32)."""
    dtype = spec.model.dtype
    if not on_gpu:
        dtype = "float32"
    elif dtype == "auto":
        dtype = "bfloat16"
    weight_bytes = float(DTYPE_BYTES[dtype])
    m = spec.method
    lora = m.lora if m.type in ("lora", "qlora", "dora") else None
    targets: tuple[str, ...] | None = None
    if lora is not None and lora.target_modules:
        targets = tuple(lora.target_modules)
    elif m.type == "adalora" and m.adalora is not None and m.adalora.target_modules:
        targets = tuple(m.adalora.target_modules)
    r = lora.r if lora is not None else (m.adalora.init_r if m.adalora is not None else 8)
    dropout = (lora.dropout if lora is not None else (m.adalora.dropout if m.adalora is not None else 0.0)) > 0
    q = spec.model.quantization
    d = spec.distributed
    ds = d.deepspeed
    return Setup(
        shape=shape,
        batch_size=spec.hyperparameters.batch_size,
        seq_len=seq_len or spec.dataset.max_seq_length,
        weight_bytes=weight_bytes,
        act_bytes=weight_bytes,
        quant_bits=q.bits if q is not None else None,
        double_quant=q.double_quant if q is not None else True,
        method="lora" if m.type == "qlora" else m.type,
        lora_r=r,
        lora_targets=targets,
        lora_dropout=dropout,
        optimizer=spec.hyperparameters.optimizer,
        gradient_checkpointing=spec.hyperparameters.gradient_checkpointing,
        world_size=spec.resources.nodes * max(1, spec.resources.gpus_per_node),
        strategy=d.strategy,
        zero_stage=ds.zero_stage if ds is not None else 0,
        offload_optimizer=bool(ds and ds.offload_optimizer),
        offload_params=bool(ds and ds.offload_params),
        sequences_per_example=2 if spec.objective.type in ("dpo", "reward") else 1,
        reference_copy=spec.objective.type == "dpo" and m.type == "full",
        fused_loss=spec.objective.type == "sft",
    )


