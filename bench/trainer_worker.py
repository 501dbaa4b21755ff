"""One training run in a fresh process, for the trainer benchmarks (run by bench.common.run_children).

    python -m bench.trainer_worker ours  CONFIG.json   # finetune_trainer.runner.run_job (the lora recipe)
    python -m bench.trainer_worker plain CONFIG.json   # a plain TRL SFTTrainer script, same settings

CONFIG: {"model", "train", "eval", "format", "max_length", "packing", "hp": {...}, "lora": {...},
"output", "profile"?}. Both sides time the training loop the same way (LoopTimer: from
on_train_begin to the last optimizer step's on_step_end, so the end-of-run checkpoint save is
not in it) and count tokens the same way (Trainer's num_input_tokens_seen, non-padding).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .common import process_t0, write_result

T0 = process_t0()
MARKS: dict[str, float] = {}
#: CPU seconds of this process (all its threads) at each mark: moves far less than wall time
#: with other tenants' load.
CPU_MARKS: dict[str, float] = {}


def mark(name: str) -> None:
    """Seconds since the parent started this process."""
    MARKS.setdefault(name, time.time() - T0)
    CPU_MARKS.setdefault(name, time.process_time())


class Turns:
    """Lock-step with a twin process: steps alternate A B A B, one process at a time.

    On a shared machine the speed changes from second to second (other tenants); two processes
    that alternate every optimizer step see the same machine, which runs alternating whole
    processes cannot give. A token passes through two FIFOs: a process runs while it holds it and
    hands it over at the start of its next step; the time it waits is not counted (see LoopTimer).
    Both start training together (`ready` files) and wait for each other at the end (`done`
    files), so neither one's loading, evaluation or saving runs during the other's steps.
    """

    def __init__(self, cfg: dict[str, Any]) -> None:
        # O_RDWR: opening never blocks, and writing never fails while the twin has not opened yet.
        self.mine = os.open(cfg["mine"], os.O_RDWR)
        self.other = os.open(cfg["other"], os.O_RDWR)
        self.me, self.twin = cfg["me"], cfg["twin"]
        self.dir = Path(cfg["dir"])
        self.first = bool(cfg["first"])
        self.holding = False

    def _wait_for(self, what: str) -> None:
        while not (self.dir / f"{what}-{self.twin}").exists():
            time.sleep(0.01)

    def start(self) -> None:
        (self.dir / f"ready-{self.me}").touch()
        self._wait_for("ready")
        self.holding = self.first
        self.take()

    def take(self) -> None:
        if not self.holding:
            os.read(self.mine, 1)
            self.holding = True

    def give(self) -> None:
        if (self.dir / f"done-{self.twin}").exists():
            return  # the twin has finished training: keep the token
        os.write(self.other, b"t")
        self.holding = False

    def finish(self) -> None:
        (self.dir / f"done-{self.me}").touch()  # before the hand-over: the twin then never waits for us
        if self.holding:
            os.write(self.other, b"t")
            self.holding = False
        self._wait_for("done")


def _loop_timer(cfg: dict[str, Any]) -> Any:
    """The run's LoopTimer; in lock-step with a twin when the config has `turns`."""
    from transformers import TrainerCallback

    turns = Turns(cfg["turns"]) if cfg.get("turns") else None

    class LoopTimer(TrainerCallback):  # type: ignore[misc]
        """Times the training loop: from on_train_begin to the last optimizer step's on_step_end.

        In lock-step (turns) only the time this process held the token counts: each window runs
        from taking it at one step's on_step_begin to handing it over at the next one's, so it
        covers the step, its logging and checkpoint, and loading the next batch."""

        def __init__(self) -> None:
            self.begin = self.last = self.cpu_begin = self.cpu_last = 0.0
            self.tokens = 0
            self.steps = 0
            self.step_s: list[float] = []  # wall time of each optimizer step (held time in lock-step)
            self.held = self.held_cpu = 0.0  # lock-step: closed windows so far
            self.taken = self.taken_cpu = 0.0  # lock-step: when the open window began
            self.step_began = 0.0
            self.windows: list[tuple[float, float]] = []  # lock-step: (taken, handed over), time.monotonic()
            self.taken_mono = 0.0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            mark("train_begin")
            if turns is not None:
                turns.start()
            self.taken, self.taken_cpu, self.taken_mono = time.perf_counter(), time.process_time(), time.monotonic()
            self.begin = self.last = self.step_began = self.taken
            self.cpu_begin = self.cpu_last = self.taken_cpu

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if turns is None or not self.step_s:
                return  # the first step runs in the window opened by on_train_begin
            # Close this window (the previous step and what followed it), hand over, wait.
            self.held += time.perf_counter() - self.taken
            self.held_cpu += time.process_time() - self.taken_cpu
            self.windows.append((self.taken_mono, time.monotonic()))
            turns.give()
            turns.take()
            self.taken, self.taken_cpu, self.taken_mono = time.perf_counter(), time.process_time(), time.monotonic()
            self.step_began = self.taken

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            mark("first_optimizer_step")
            now, cpu = time.perf_counter(), time.process_time()
            if turns is None:
                self.step_s.append(now - self.last)
                self.last, self.cpu_last = now, cpu
            else:
                self.step_s.append(now - self.step_began)
                # The loop so far: closed windows plus the open one up to this step's end.
                self.last = self.begin + self.held + (now - self.taken)
                self.cpu_last = self.cpu_begin + self.held_cpu + (cpu - self.taken_cpu)
            self.tokens = int(state.num_input_tokens_seen or 0)
            self.steps = int(state.global_step)

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if turns is not None:
                self.windows.append((self.taken_mono, time.monotonic()))
                turns.finish()

        def result(self, state: Any) -> dict[str, Any]:
            loop = self.last - self.begin
            losses = [h["loss"] for h in state.log_history if "loss" in h]
            # CPU seconds of the whole process (all threads) in the same window: on a shared
            # machine, tokens per CPU-second moves far less with other people's load than wall time.
            cpu = self.cpu_last - self.cpu_begin
            return {"loop_s": loop, "tokens": self.tokens, "steps": self.steps,
                    "tokens_per_s": self.tokens / loop if loop > 0 else 0.0, "loop_cpu_s": cpu,
                    "tokens_per_cpu_s": self.tokens / cpu if cpu > 0 else 0.0, "losses": losses,
                    "step_s": self.step_s, "windows": self.windows}

    return LoopTimer()


def _timed(module: Any, attr: str, phases: dict[str, float]) -> None:
    """Wraps module.attr so each call adds its duration to phases[attr] (measurement only)."""
    fn = getattr(module, attr)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            phases[attr] = phases.get(attr, 0.0) + time.perf_counter() - t
            mark(f"{attr}_done")

    setattr(module, attr, wrapper)


def _timed_fetch(uris: Any) -> dict[str, float]:
    """Seconds spent fetching each remote source (uris.fetch: download, or the cache's lookup)."""
    seconds: dict[str, float] = {}
    fetch = uris.fetch

    def wrapper(uri: str, workdir: Path) -> Any:
        t = time.perf_counter()
        try:
            return fetch(uri, workdir)
        finally:
            seconds[uri] = seconds.get(uri, 0.0) + time.perf_counter() - t

    uris.fetch = wrapper
    return seconds


def spec_dict(cfg: dict[str, Any]) -> dict[str, Any]:
    hp = cfg["hp"]
    return {
        "model": {"uri": cfg["model"]},
        "dataset": {"train": cfg["train"], "validation": cfg["eval"], "format": cfg["format"],
                    "maxSeqLength": cfg["max_length"], "packing": cfg.get("packing", False)},
        "method": {"type": "lora", "lora": {"r": cfg["lora"]["r"], "alpha": cfg["lora"]["alpha"],
                                            "dropout": cfg["lora"]["dropout"]}},
        "hyperparameters": {**({"maxSteps": hp["max_steps"]} if hp["max_steps"] else {}),
                            "epochs": 1, "batchSize": hp["batch_size"],
                            "learningRate": hp["learning_rate"], "warmupRatio": hp["warmup_ratio"],
                            "scheduler": hp["scheduler"], "seed": hp["seed"], "weightDecay": hp["weight_decay"],
                            "maxGradNorm": hp["max_grad_norm"], "optimizer": hp["optimizer"]},
        "resources": {"gpusPerNode": 0},
        "output": {"uri": cfg["output"]},
    }


def ours(cfg: dict[str, Any]) -> dict[str, Any]:
    from finetune_api.resource import parse_spec

    spec = parse_spec(spec_dict(cfg))
    if cfg.get("pod_startup"):
        # What `finetune train` does once it has read the spec (entrypoint.main), before the
        # imports below: unused optional libraries kept out, the cached model read ahead.
        from finetune_trainer import startup

        startup.begin(spec)
    import finetune_trainer.evaluation.perplexity as perplexity
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401
    from finetune_trainer import cache, data, models, output, uris
    from finetune_trainer.recipes import sft
    from finetune_trainer.runner import Overrides, run_job

    mark("imports")
    phases: dict[str, float] = {}
    fetch_s = _timed_fetch(uris)
    _timed(models, "load_model", phases)
    _timed(data, "prepare_sft", phases)
    _timed(sft, "build_trainer", phases)
    _timed(perplexity, "evaluate", phases)
    _timed(sft, "save", phases)
    _timed(output, "publish", phases)
    timer = _loop_timer(cfg)
    t = time.perf_counter()
    # As in a pod: no progress bar, the metrics endpoint served (any free port), checkpoints on.
    result = run_job(spec, cfg["output"], Overrides(progress=False, metrics_port=0, callbacks=[timer],
                                                   workdir=Path(cfg["output"]).parent / "scratch"))
    total = time.perf_counter() - t
    out = timer.result(result.recipe.trainer.state)
    out["phases"] = phases
    out["run_job_s"] = total
    out["fetch_s"] = fetch_s
    out["model_cache"] = cache.outcome(cfg["model"])
    out["prefetched"] = dict(cache.STATS.prefetched)
    out["eval_loss"] = result.metrics.get("tuned", {}).get("evalLoss")
    out["base_eval_loss"] = result.metrics.get("base", {}).get("evalLoss")
    return out


def plain(cfg: dict[str, Any]) -> dict[str, Any]:
    """What a user would write with TRL alone (same model, data files, seed and settings)."""
    import torch
    from datasets import load_dataset
    from finetune_api.spec import Checkpointing
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    mark("imports")
    hp = cfg["hp"]
    tokenizer = AutoTokenizer.from_pretrained(cfg["model"])
    model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32)
    mark("load_model_done")
    ds = load_dataset("json", data_files={"train": cfg["train"], "eval": cfg["eval"]})
    mark("prepare_sft_done")
    args = SFTConfig(
        output_dir=str(Path(cfg["output"]) / "checkpoints"),
        max_steps=hp["max_steps"] or -1, num_train_epochs=1, per_device_train_batch_size=hp["batch_size"],
        per_device_eval_batch_size=hp["batch_size"], learning_rate=hp["learning_rate"],
        lr_scheduler_type=hp["scheduler"], warmup_steps=float(hp["warmup_ratio"]),
        weight_decay=hp["weight_decay"], optim=hp["optimizer"], max_grad_norm=hp["max_grad_norm"],
        seed=hp["seed"], data_seed=hp["seed"], bf16=False, fp16=False, use_cpu=True,
        # Checkpoints at our recipe's default cadence (checkpointing.everySteps): both sides do the
        # same work in the timed window, as a plain TRL script run for real would checkpoint too.
        gradient_checkpointing=False, logging_steps=1, report_to="none", save_strategy="steps",
        save_steps=Checkpointing().every_steps,
        eval_strategy="no", max_length=cfg["max_length"], packing=cfg.get("packing", False),
        include_num_input_tokens_seen="non_padding", dataloader_num_workers=0, disable_tqdm=True,
    )
    peft_config = LoraConfig(task_type="CAUSAL_LM", r=cfg["lora"]["r"], lora_alpha=cfg["lora"]["alpha"],
                             lora_dropout=cfg["lora"]["dropout"], target_modules="all-linear")
    timer = _loop_timer(cfg)
    set_seed(hp["seed"])  # before the adapter is initialised, as the recipe does
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds["train"], eval_dataset=ds["eval"],
                         processing_class=tokenizer, peft_config=peft_config, callbacks=[timer])
    mark("build_trainer_done")
    trainer.train()
    out = timer.result(trainer.state)
    out["eval_loss"] = trainer.evaluate()["eval_loss"]
    return out


def main(argv: list[str]) -> int:
    mode, config = argv[0], json.loads(Path(argv[1]).read_text())
    profiler = None
    if config.get("profile"):
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.005)
        profiler.start()
    out = {"ours": ours, "plain": plain}[mode](config)
    if profiler is not None:
        profiler.stop()
        Path(config["profile"]).write_text(profiler.output_text(unicode=True, color=False, show_all=False))
        # The whole session too, to open library frames later: pyinstrument --load FILE -r text --show-all
        profiler.last_session.save(str(Path(config["profile"]).with_suffix(".pyisession")))
    out["marks"] = MARKS
    out["cpu_marks"] = CPU_MARKS
    write_result(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
