"""What `finetune train` does once the spec is read, before torch, transformers, peft and trl load.

Time to the first optimizer step is mostly imports when the model is already on the node; two
things here shorten it without touching what the run computes:

- **Optional libraries the run does not use stay out of the process.** peft imports bitsandbytes
  whenever it is installed (and bitsandbytes pulls in torch's inductor), accelerate imports
  deepspeed when it looks for a DeepSpeed engine, although a LoRA run without quantization on one
  process uses neither; torch imports triton (GPU kernels) even in a pod without GPUs. `keep_out`
  marks them absent for this process (``sys.modules[name] = None``): the libraries' own
  availability checks (``importlib.util.find_spec``) then say "not installed", exactly as in an
  image without them, and a direct import fails loudly (ModuleNotFoundError) instead of running
  half-configured. Which runs need which library is
  decided from the spec in `unused_libraries`.
- **The base model is read ahead from the shared cache** while the imports run (cache.prefetch).
- **The cyclic garbage collector waits until start-up is over.** Imports and the model build
  allocate hundreds of thousands of objects that live as long as the process, and every full
  collection walks all of them again: ~0.7 s of the ~3.7 s of imports here, then ~0.2 s more
  for the `gc.collect()` a trainer runs when `train()` starts (bench/FINDINGS.md). `begin` pauses
  the collector; `settle` (called once a trainer exists, by the recipes' shared callbacks)
  moves everything alive into the permanent generation (`gc.freeze`, the pattern CPython's docs
  give for long-lived start-up state) and switches the collector back on, so the training loop's
  collections no longer walk the start-up objects either. Garbage left by the imports (~10k
  objects, no measurable RSS) is not reclaimed.

Only at the start of a process: once torch is loaded (an in-process call from tests or a notebook,
where other runs may want bitsandbytes later), `begin` keeps nothing out and the process keeps
the libraries it has; `keep_out` itself refuses a library that is already imported.
"""

from __future__ import annotations

import gc
import logging
import sys
import threading

from finetune_api.spec import FineTuneJobSpec

from . import cache
from .memory_plan import OPTIMIZER_8BIT

log = logging.getLogger(__name__)


def unused_libraries(spec: FineTuneJobSpec) -> tuple[str, ...]:
    """Optional libraries installed in the trainer image that this spec's run never calls."""
    unused = []
    # bitsandbytes: quantized (QLoRA) weights and the 8-bit optimizers, nothing else.
    if spec.model.quantization is None and spec.hyperparameters.optimizer not in OPTIMIZER_8BIT:
        unused.append("bitsandbytes")
    if spec.distributed.strategy != "deepspeed":
        unused.append("deepspeed")
    # triton: GPU kernels only (torch's inductor compiles C++ on CPU); torch._dynamo imports it
    # whenever it is installed, as the CUDA image has it. A pod without GPUs trains on the CPU
    # (config.resolve_precision), so it never runs a triton kernel.
    if spec.resources.gpus_per_node == 0:
        unused.append("triton")
    return tuple(unused)


def keep_out(names: tuple[str, ...]) -> None:
    """Mark `names` absent for this process (an import of them raises ModuleNotFoundError)."""
    loaded = [n for n in names if sys.modules.get(n) is not None]
    if loaded:
        raise RuntimeError(f"startup.keep_out: {', '.join(loaded)} already imported; call it before the imports")
    for name in names:
        sys.modules[name] = None  # type: ignore[assignment]


#: Whether `begin` paused the collector (so `settle` never freezes a heap it did not pause).
_collector_paused = False


def settle() -> None:
    """Start-up is over (a trainer exists): freeze what is alive and switch the collector back on.
    Does nothing unless `begin` paused it, and nothing the second time."""
    global _collector_paused
    if not _collector_paused:
        return
    gc.freeze()
    gc.enable()
    _collector_paused = False
    log.debug("start-up over: %d objects frozen, garbage collector on", gc.get_freeze_count())


def begin(spec: FineTuneJobSpec) -> threading.Thread | None:
    """Before the heavy imports: keep unused libraries out, pause the garbage collector until
    `settle`, and start reading the base model ahead. Returns the read-ahead thread (None when
    the cache is off or the model is not cached remotely)."""
    global _collector_paused
    if "torch" in sys.modules:
        log.debug("torch already loaded (an in-process run): no library kept out, collector left on")
    else:
        unused = unused_libraries(spec)
        keep_out(unused)
        log.info("start-up: not loading %s (unused by this spec)", ", ".join(unused) or "-")
        if gc.isenabled():
            gc.disable()
            _collector_paused = True
    return cache.prefetch(spec.model.uri)
