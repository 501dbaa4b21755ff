"""Time to the first optimizer step with the shared model cache: cold (empty cache) vs warm.

A random-weight model built from a config (`--cache-model`; sizes in fixtures.MODELS) and the
data set are published to a local MinIO; each run is a fresh `run_job` process
(bench.trainer_worker) that reads them from s3:// as a pod does, and starts as `finetune train`
does (startup.begin: unused optional libraries kept out, the cached model read ahead while the
imports run). Groups, one per run:

- off:  the cache switched off (today's behaviour: a download into the run's scratch);
- cold: an empty cache folder (download, verify, fill);
- warm: a folder that holds the model and data, as the second job on the same base;
- warm_uncached: the same folder, with the entry's pages dropped from the page cache first
  (posix_fadvise DONTNEED), as on a node that has not read the entry lately: the model's bytes
  then come from the disk.

Order, counterbalanced: even groups run off, cold, warm (reading the folder cold filled); odd
groups fill a folder with `finetune cache warm` (not timed), run warm on it, then off, then cold
on a new empty folder (the filled one deleted first, as nothing else is on disk before cold in
the other order). Warm is then not always the run right after cold (load drift), and in both
orders it reads an entry that was just written, as on a node that has just run a job on the same
base: with an off run between the fill and warm (the previous order), a 5.2 GB model's entry
was partly pushed out of this 23 GB machine's page cache by off's own copy (FINDINGS section 5).
warm_uncached runs last in every group, on the folder cold filled: dropping 3.55 GB from the page
cache leaves this VM slow to fault pages in for a minute after (the first step of the next run
took 1.4-1.8 s of kernel time instead of 0.25 s for the same ~145k page faults; the warm runs
that followed it in the odd groups of an earlier order were 0.4-0.8 s slower: bench/FINDINGS.md
section 5), which is the page dropping, not the warm start. Before each warm run the share of
the entry's bytes in the page cache is recorded (util-linux `fincore`, when installed).

The process's clock starts when the parent starts it (pod start); each run reports the marks of
trainer_worker (imports, model loaded, data prepared, trainer built, baseline evaluation done,
first optimizer step) in wall and CPU seconds, the seconds spent fetching each source, and the
model load without its fetch. warm_start_ratio = warm / cold time to the first optimizer step,
per group (median, min, max). The held-out set is cut to 8 rows: evaluation runs after the
first step and only lengthens the bench.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from finetune_api.constants import Env

from . import fixtures
from .common import Child, run_children, summary
from .trainer_bench import LORA, _drop_outputs, _fresh, hyperparameters

#: The record's model (`--cache-model`'s default): 5.2 GB, the largest whose entry this 23 GB
#: machine keeps in its page cache next to MinIO's copy. What a cache removes is the download; what
#: is left (imports, the first step's compute) does not depend on it, so warm / cold falls as the
#: model grows: 0.75 at 100m, 0.33-0.34 at 1b, 0.27-0.28 at 1.3b here (FINDINGS section 5). Real bases are
#: larger still (8B parameters: 16 GB in bf16).
MODEL = "1.3b"
#: `--quick`'s model: a small download, for a smoke run of the harness.
QUICK_MODEL = "100m"
#: The models `--cache-model` offers (fixtures.MODELS names).
MODELS = ("100m", "300m", "1b", "1.3b")
SIDES = ("off", "cold", "warm", "warm_uncached")
#: Torch's CPU threads in every run (`--cache-threads`; default the core count, as a pod's trainer
#: uses every core it is given). On a busy shared machine pass 1: with 2 threads on this 2-core
#: machine the first step of the 1b model took 3 CPU-s at load 2.5 but 7-15 CPU-s at load 5-7
#: (OpenMP threads spin at each barrier while their partner waits for a core); one thread does the
#: same work without spinning (the test suites run trainers with OMP_NUM_THREADS=1 for that reason).
OMP_THREADS = os.cpu_count() or 1
#: Points of time before the first step that are not download (seconds since process start).
PARTS = (
    ("imports", "imports (torch, transformers, trl, ours)"),
    ("download_s", "download: model and data (fetch, through the cache when on)"),
    ("load_s", "model and tokenizer load (without the download)"),
    ("data_s", "data set prepared (without its download)"),
    ("build_s", "PEFT wrap and trainer built"),
    ("baseline_eval_s", "baseline evaluation of the base model (evaluation.baseline)"),
    ("train_begin_to_step_s", "train() entered to the first optimizer step done"),
    ("first_step_s", "process start to the first optimizer step"),
    ("first_step_cpu_s", "CPU seconds of the process to the first optimizer step"),
)


def _publish(minio_env: dict[str, str], bucket: str, name: str, model: Path, train: Path, held: Path) -> dict[str, str]:
    from finetune_trainer import storage

    saved = {k: os.environ.get(k) for k in minio_env}
    os.environ.update(minio_env)
    try:
        fs, _ = storage.resolve(f"s3://{bucket}")
        fs.mkdir(bucket)
        storage.publish(model, f"s3://{bucket}/models/{name}", kind="artifact")
        fs.put_file(str(train), f"{bucket}/data/train.jsonl")
        fs.put_file(str(held), f"{bucket}/data/eval.jsonl")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {"model": f"s3://{bucket}/models/{name}", "train": f"s3://{bucket}/data/train.jsonl",
            "eval": f"s3://{bucket}/data/eval.jsonl"}


def _one(cfg: dict[str, Any], run_dir: Path, env: dict[str, str]) -> Child:
    (run_dir / "config.json").write_text(json.dumps({**cfg, "output": str(run_dir / "out")}))
    child = run_children([(["-m", "bench.trainer_worker", "ours", str(run_dir / "config.json")],
                           run_dir / "run.log", env)])[0]
    _drop_outputs(run_dir)
    return child


def _drop_page_cache(root: Path) -> None:
    """Drop the clean pages of every file under `root` from the page cache (no root needed)."""
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)  # dirty pages (an entry just filled) are not dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _resident_share(root: Path) -> float | None:
    """Share of the bytes of the files under `root` held in the page cache (util-linux fincore);
    None when fincore is not installed or the folder is empty."""
    import subprocess

    files = [str(p) for p in root.rglob("*") if p.is_file()]
    size = sum(Path(f).stat().st_size for f in files)
    fincore = shutil.which("fincore")
    if not files or not size or fincore is None:
        return None
    out = subprocess.run([fincore, "--bytes", "--noheadings", "--raw", "--output", "RES", *files],
                         capture_output=True, text=True, check=True).stdout
    return sum(int(x) for x in out.split()) / size


def _fill_ahead(server_env: dict[str, str], cache_dir: Path, sources: list[str]) -> None:
    """Fill `cache_dir` as the chart's warm Job does (`finetune cache warm`), untimed."""
    import subprocess
    import sys

    finetune = Path(sys.executable).with_name("finetune")
    subprocess.run([str(finetune), "cache", "warm", *sources, "--dir", str(cache_dir)],
                   env={**os.environ, **server_env}, check=True, capture_output=True)


def _parts(child: Child, uris: dict[str, str]) -> dict[str, float]:
    r = child.result
    marks, phases, fetch = r["marks"], r["phases"], r.get("fetch_s", {})
    cpu = r.get("cpu_marks", {})
    model_fetch = fetch.get(uris["model"], 0.0)
    data_fetch = sum(v for k, v in fetch.items() if k != uris["model"])
    return {
        "imports": marks["imports"],
        "download_s": model_fetch + data_fetch,
        "download_model_s": model_fetch,
        "load_s": phases["load_model"] - model_fetch,
        "data_s": phases.get("prepare_sft", 0.0) - data_fetch,
        "build_s": phases.get("build_trainer", 0.0),
        # The baseline evaluation before the first step: the first evaluation when it ends before
        # train() starts (full fine-tuning); with a PEFT method the base is scored after training.
        "baseline_eval_s": (marks["evaluate_done"] - marks["build_trainer_done"]
                            if marks.get("evaluate_done", float("inf")) < marks["train_begin"] else 0.0),
        "train_begin_to_step_s": marks["first_optimizer_step"] - marks["train_begin"],
        "first_step_s": marks["first_optimizer_step"],
        "first_step_cpu_s": cpu.get("first_optimizer_step", float("nan")),
        "imports_cpu_s": cpu.get("imports", float("nan")),
    }


def cache(runs: int, workdir: Path, model_name: str = MODEL, threads: int = OMP_THREADS) -> dict[str, Any]:
    from harness.cluster import MinioServer

    model = fixtures.model_dir(model_name)
    size = sum(p.stat().st_size for p in model.rglob("*") if p.is_file())
    train, held = fixtures.facts_data()
    held = fixtures.head_rows(held, 8)
    server = MinioServer(_fresh(workdir / "cache-minio"))
    server.start()
    try:
        server.wait_ready()
        uris = _publish(server.env, "bench", model_name, model, train, held)
        cfg = {**uris, "format": "prompt_completion", "max_length": 128, "hp": hyperparameters(1, 4), "lora": LORA,
               "pod_startup": True}
        rows: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
        children: dict[str, list[Child]] = {side: [] for side in SIDES}
        resident: dict[str, list[float]] = {"warm": [], "warm_uncached": []}
        load: list[float] = []
        for i in range(runs):
            cache_dir = _fresh(workdir / f"cache-{i}") / "cache"
            ahead = i % 2 == 1  # odd groups: warm reads a folder filled ahead, cold fills a new one
            order = ("warm", "off", "cold", "warm_uncached") if ahead else SIDES
            dirs = {"cold": cache_dir, "warm": cache_dir}
            if ahead:
                dirs["cold"] = _fresh(workdir / f"cache-{i}-cold") / "cache"
                _fill_ahead(server.env, cache_dir, [uris["model"], uris["train"], uris["eval"]])
            dirs["warm_uncached"] = dirs["cold"]  # last: on the folder cold filled, in both orders
            for side in order:
                env = {**server.env, "OMP_NUM_THREADS": str(threads)}
                if side != "off":
                    env[Env.CACHE_DIR] = str(dirs[side])
                if side == "warm_uncached":
                    _drop_page_cache(dirs[side] / "entries")
                if side in resident:
                    share = _resident_share(dirs[side] / "entries")
                    if share is not None:
                        resident[side].append(share)
                load.append(os.getloadavg()[0])
                child = _one(cfg, _fresh(workdir / f"cache-{side}-{i}"), env)
                children[side].append(child)
                rows[side].append(_parts(child, uris))
                if side == "off" and ahead:
                    # Before cold, as in the other order (where nothing else is on disk): the same free memory.
                    shutil.rmtree(cache_dir.parent, ignore_errors=True)
            for d in set(dirs.values()):
                shutil.rmtree(d.parent, ignore_errors=True)
        out: dict[str, Any] = {"model": model_name, "model_bytes": size, "omp_num_threads": threads,
                               "config": {k: v for k, v in cfg.items() if k != "hp"},
                               "load_average_1m_per_run": summary(load)}
        for side in SIDES:
            out[side] = {key: summary([r[key] for r in rows[side]]) for key in rows[side][0]}
            out[side]["peak_rss_mib"] = summary([c.peak_rss_mib for c in children[side]])
            out[side]["model_cache"] = sorted({c.result.get("model_cache") or "-" for c in children[side]})
            out[side]["read_ahead"] = sorted({"yes" if c.result.get("prefetched", {}).get(uris["model"]) else "no"
                                              for c in children[side]})
            if resident.get(side):
                out[side]["page_cache_share_before"] = summary(resident[side])
        out["warm_start_ratio"] = summary([w["first_step_s"] / c["first_step_s"]
                                           for w, c in zip(rows["warm"], rows["cold"], strict=True)])
        out["warm_uncached_over_cold"] = summary([w["first_step_s"] / c["first_step_s"]
                                                  for w, c in zip(rows["warm_uncached"], rows["cold"], strict=True)])
        out["warm_over_off"] = summary([w["first_step_s"] / o["first_step_s"]
                                        for w, o in zip(rows["warm"], rows["off"], strict=True)])
        return out
    finally:
        server.stop()
