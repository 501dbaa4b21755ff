"""spec.distributed -> what the transformers/TRL Trainer needs (DDP, FSDP2, DeepSpeed ZeRO).

`training_args_kwargs(spec)` is merged into the TrainingArguments by config.py. Everything here
is decided from the spec and the hardware; the user never writes an accelerate or DeepSpeed file.

Pinned-version facts this module relies on (accelerate 1.15, transformers 5.24, deepspeed 0.19):
- accelerate enables FSDP only for GPU-like device types; with `use_cpu=True` the Trainer silently
  trains as plain DDP (MULTI_CPU). `enable_cpu_fsdp()` turns the CPU case into real FSDP2, so a
  CPU test can prove sharding; on GPUs it does nothing.
- accelerate ignores DeepSpeed when `cpu=True`; on a CPU machine DeepSpeed runs with its own CPU
  accelerator (DS_ACCELERATOR=cpu, set by the launcher), so `use_cpu` must be False there, and
  `enable_cpu_deepspeed()` hands accelerate the gloo backend it does not find by itself.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from finetune_api.spec import FineTuneJobSpec

log = logging.getLogger(__name__)

#: Set (to "1") when the run must use FSDP on CPU processes (see enable_cpu_fsdp).
CPU_FSDP_ENV = "FINETUNE_CPU_FSDP"


def on_gpu(spec: FineTuneJobSpec) -> bool:
    import torch

    return spec.resources.gpus_per_node > 0 and torch.cuda.is_available()


def backend(spec: FineTuneJobSpec) -> str:
    """Collective backend: NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if on_gpu(spec) else "gloo"


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def fsdp_config(spec: FineTuneJobSpec) -> dict[str, Any]:
    """The Trainer's `fsdp_config` for FSDP2 (fully_shard), one unit per decoder layer."""
    params = spec.distributed.fsdp
    assert params is not None  # filled by the API model for strategy fsdp
    return {
        "version": 2,
        # Wraps each decoder layer (the model's _no_split_modules) as its own FSDP unit.
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "reshard_after_forward": params.reshard_after_forward,
        "cpu_ram_efficient_loading": params.cpu_ram_efficient_loading,
        # One HF-loadable file at save time: the artifact must not depend on the world size.
        "state_dict_type": "FULL_STATE_DICT",
        # FSDP's own checkpointing avoids the extra all-gather of the Trainer's flag.
        "activation_checkpointing": spec.hyperparameters.gradient_checkpointing,
    }


def deepspeed_config(spec: FineTuneJobSpec) -> dict[str, Any]:
    """DeepSpeed JSON generated from spec.distributed.deepspeed; "auto" = taken from the Trainer."""
    params = spec.distributed.deepspeed
    assert params is not None  # filled by the API model for strategy deepspeed
    gpu = on_gpu(spec)
    zero: dict[str, Any] = {
        "stage": params.zero_stage,
        "overlap_comm": gpu,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if params.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": gpu}
    if params.zero_stage == 3:
        zero.update({
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            # Gather full weights at save time so the artifact is a normal HF checkpoint.
            "stage3_gather_16bit_weights_on_model_save": True,
        })
        if params.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": gpu}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": "auto",
        # No train_batch_size: DeepSpeed derives it as micro x accumulation x world size. The
        # Trainer's "auto" fill used a world size of 1 on CPU and DeepSpeed then refused the config.
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
        "steps_per_print": 1_000_000_000,  # the Trainer logs; DeepSpeed's own prints are noise
        "wall_clock_breakdown": False,
    }
    if params.offload_optimizer:
        # An offloaded optimizer must be DeepSpeed's CPU Adam (a torch optimizer is refused).
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        }
    return config


def training_args_kwargs(spec: FineTuneJobSpec) -> dict[str, Any]:
    """TrainingArguments fields for spec.distributed (they override config.shared_training_args' own)."""
    d = spec.distributed
    kwargs: dict[str, Any] = {"ddp_timeout": d.timeout_seconds}
    if world_size() > 1:  # accelerate refuses a backend without a process group to use it
        kwargs["ddp_backend"] = backend(spec)
    if d.strategy == "ddp":
        # Every trainable parameter gets a gradient in our recipes; searching for unused ones
        # costs a graph traversal per step (and breaks with gradient checkpointing).
        kwargs["ddp_find_unused_parameters"] = False
    elif d.strategy == "fsdp":
        kwargs["fsdp"] = True
        kwargs["fsdp_config"] = fsdp_config(spec)
        enable_cpu_fsdp(spec)
        if spec.hyperparameters.gradient_checkpointing:
            kwargs["activation_checkpointing"] = False  # done by FSDP (fsdp_config above)
    elif d.strategy == "deepspeed":
        kwargs["deepspeed"] = deepspeed_config(spec)
        if not on_gpu(spec):
            kwargs["use_cpu"] = False  # accelerate drops DeepSpeed under cpu=True
            # transformers ignores ddp_backend under DeepSpeed; enable_cpu_deepspeed passes gloo.
            kwargs.pop("ddp_backend", None)
            enable_cpu_deepspeed(spec)
    return kwargs


def enable_cpu_deepspeed(spec: FineTuneJobSpec) -> bool:
    """Give accelerate the gloo backend for DeepSpeed on CPU processes; no-op on GPUs.

    accelerate 1.15 picks a backend from the device type only (PartialState._prepare_backend,
    accelerate/state.py:769-813: nccl when CUDA is there, gloo only with cpu=True), and
    transformers 5.24 passes none in its DeepSpeed branch (TrainingArguments._setup_devices,
    training_args.py:1886). DeepSpeed's init_distributed still creates the gloo group of the whole
    world, but PartialState then reads `backend is None` as "not distributed" (state.py:288):
    num_processes=1 and process_index=0 on every rank, so no rank gets its own share of the data
    and the first gather (TRL's compute_loss) fails. This wraps PartialState.__init__ once to pass
    the backend when DeepSpeed is asked for (ACCELERATE_USE_DEEPSPEED) without one.
    """
    if spec.distributed.strategy != "deepspeed" or on_gpu(spec) or world_size() < 2:
        return False
    from accelerate.state import PartialState

    cls = PartialState
    if getattr(cls.__init__, "_finetune_cpu_deepspeed", False):
        return True
    original = cls.__init__
    name = backend(spec)

    def init(self: Any, cpu: bool = False, **kwargs: Any) -> None:
        deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"  # set by transformers
        if deepspeed and not cpu and kwargs.get("backend") is None:
            kwargs["backend"] = name
        original(self, cpu, **kwargs)

    init._finetune_cpu_deepspeed = True  # type: ignore[attr-defined]
    cls.__init__ = init  # type: ignore[method-assign]
    log.info("DeepSpeed on CPU processes: accelerate's state gets the %s backend", name)
    return True


def enable_cpu_fsdp(spec: FineTuneJobSpec) -> bool:
    """Make accelerate really shard with FSDP2 on CPU processes (gloo); no-op on GPUs.

    accelerate 1.15 only turns on FSDP for GPU-like device types (AcceleratorState leaves
    MULTI_CPU alone and drops the plugin), so the Trainer would silently run DDP. This wraps
    AcceleratorState.__init__ once to apply the plugin it was given when the type is MULTI_CPU;
    accelerate's FSDP2 code path (fully_shard) itself works on CPU.
    """
    if spec.distributed.strategy != "fsdp" or on_gpu(spec) or world_size() < 2:
        return False
    from accelerate import state as acc_state
    from accelerate.utils import DistributedType

    cls = acc_state.AcceleratorState
    if getattr(cls.__init__, "_finetune_cpu_fsdp", False):
        return True
    original = cls.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin

    init._finetune_cpu_fsdp = True  # type: ignore[attr-defined]
    cls.__init__ = init  # type: ignore[method-assign]

    from accelerate import Accelerator

    get_state_dict = Accelerator.get_state_dict

    def owned_state_dict(self: Any, model: Any, unwrap: bool = True) -> Any:
        # accelerate's own FSDP2 branch is not taken here; gather the full state dict the same
        # way, and clone: on CPU "cpu_offload" copies nothing and the gathered tensors would
        # point into buffers FSDP frees on reshard ("invalid python storage" in safetensors).
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from torch.distributed.tensor import DTensor

        if not any(isinstance(p, DTensor) for p in model.parameters()):
            return get_state_dict(self, model, unwrap)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)
        return {k: v.detach().clone() for k, v in state.items()}

    Accelerator.get_state_dict = owned_state_dict  # type: ignore[method-assign]
    os.environ[CPU_FSDP_ENV] = "1"
    log.info("FSDP2 on CPU processes (gloo): accelerate's MULTI_CPU state switched to FSDP")
    return True


def sharded_parameters(model: Any) -> tuple[int, int]:
    """(parameters held as DTensor shards, all parameters) of a model: proof that FSDP2 is on."""
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    return sum(isinstance(p, DTensor) for p in params), len(params)
