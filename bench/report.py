"""bench/results.json -> headline figures and bench/RESULTS.md."""

from __future__ import annotations

from typing import Any

from .common import REPO, fmt

#: Hand-written analysis (profiles, causes, fixes), appended to RESULTS.md as it stands.
FINDINGS = REPO / "bench" / "FINDINGS.md"

TARGETS = {
    "trainer_overhead_ratio": (">=", 1.0),
    "packing_speedup": (">=", 1.5),
    "operator_p99_create_s_1000": ("<=", 1.0),
    "operator_rss_mib_1000": ("<=", 250.0),
    "api_writes_per_job": ("<=", 15.0),
    "warm_start_ratio": ("<=", 0.3),
}


def _median(section: dict[str, Any] | None, *path: str) -> float | None:
    node: Any = section
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    if isinstance(node, dict):
        node = node.get("median")
    return float(node) if isinstance(node, (int, float)) else None


def headline(sections: dict[str, Any]) -> dict[str, Any]:
    op = sections.get("operator") or {}
    sizes = op.get("sizes") or {}
    big = sizes.get("1000") or {}
    largest = sizes[max(sizes, key=int)] if sizes else {}
    return {
        "trainer_overhead_ratio": _median(sections.get("overhead"), "tokens_per_s_ratio"),
        "packing_speedup": _median(sections.get("packing"), "speedup"),
        "operator_p99_create_s_1000": _median(big, "probe_latency_s", "p99"),
        "operator_rss_mib_1000": _median(big, "operator_peak_rss_mib"),
        "api_writes_per_job": _median(big or largest, "operator_writes_per_job"),
        "warm_start_ratio": _median(sections.get("cache"), "warm_start_ratio"),
    }


#: headline key -> (section, series) whose runs decide whether a ratio clears its target.
SPREAD = {"trainer_overhead_ratio": ("overhead", "tokens_per_s_ratio"), "packing_speedup": ("packing", "speedup"),
          "warm_start_ratio": ("cache", "warm_start_ratio")}


def _verdict(key: str, value: float | None, sections: dict[str, Any]) -> str:
    if value is None:
        return "not measured"
    op, target = TARGETS[key]

    def ok(v: float) -> bool:
        return v >= target if op == ">=" else v <= target

    if key in SPREAD:
        section, series = SPREAD[key]
        s = (sections.get(section) or {}).get(series) or {}
        if "min" in s and ok(s["min"]) != ok(s["max"]):
            return "inconclusive: the runs fall on both sides of the target"
    return "met" if ok(value) else "MISSED"


def _meta(section: dict[str, Any]) -> str:
    m = section.get("_meta", {})
    quick = ", quick mode" if m.get("quick") else ""
    return (f"_Run {m.get('date', '?')}, {m.get('runs', '?')} run(s) per side{quick}, {m.get('seconds', '?')} s, "
            f"load average (1 min) {m.get('load_average_1m', '?')} before/after._")


def markdown(doc: dict[str, Any]) -> str:
    mach = doc["machine"]
    v = mach["versions"]
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`python -m bench.run`); do not edit by hand. Every figure is the median",
        "over the runs, with (min-max); every run is a fresh process. The two sides of a trainer comparison",
        "run in lock-step (both at once, taking turns every optimizer step; the headline) and sequentially",
        "in counterbalanced pairs (A B, B A, ...). Machine-readable: `bench/results.json`.",
        "",
        f"- Machine: {mach['cpu']}, {mach['cores']} cores, {mach['memory_gib']} GiB, {mach['os']}",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- Written: {mach['date']}; load average at start {mach['load_average_at_start']} (other work shared "
        "this machine; see each section's load)",
        "",
        "## Headline",
        "",
        "| figure | value | target | |",
        "|---|---|---|---|",
    ]
    for key, (op, target) in TARGETS.items():
        value = doc.get(key)
        shown = "-" if value is None else f"{value:.3g}"
        lines.append(f"| `{key}` | {shown} | {op} {target:g} | {_verdict(key, value, doc['sections'])} |")
    s = doc["sections"]
    if "overhead" in s:
        lines += _overhead(s["overhead"])
    if "packing" in s:
        lines += _packing(s["packing"])
    if "startup" in s:
        lines += _startup(s["startup"])
    if "operator" in s:
        lines += _operator(s["operator"])
    if "cache" in s:
        lines += _cache(s["cache"])
    findings = FINDINGS.read_text().strip() if FINDINGS.exists() else ""
    if findings:
        lines += ["", findings]
    return "\n".join(lines) + "\n"


def _overhead(o: dict[str, Any]) -> list[str]:
    c = o["config"]
    ours, plain = o["losses_ours"], o["losses_plain"]
    shown = sorted({0, 1, 2, len(ours) // 2, len(ours) - 2, len(ours) - 1} & set(range(len(ours))))
    lines = [
        "",
        "## 1. Trainer overhead: our `lora` recipe vs a plain TRL `SFTTrainer` script",
        "",
        _meta(o),
        "",
        f"Same tiny random Llama ({c['model']['hidden_size']} hidden, {c['model']['num_hidden_layers']} layers), "
        f"same data files, seed, LoRA r={c['lora']['r']}, {c['steps']} steps of batch {c['batch_size']}, fp32 "
        "on CPU. Tokens/s counts only the training loop, the same way on both sides (Trainer's non-padding "
        "input tokens from `on_train_begin` to the last optimizer step's `on_step_end`).",
        "",
        "**Lock-step** (the headline): in each pair both processes run at once and take turns every "
        "optimizer step (a token passed through two FIFOs; who goes first alternates between pairs), so "
        "both meet the same machine second by second; each side counts only its own turns (the step, its "
        "logging and checkpoint, loading the next batch). **Sequential**: whole processes one after the "
        "other (A B, B A, ...): each alone on the machine, but the machine's speed may change between them.",
        "",
        "| | ours | plain TRL | ratio ours/plain |",
        "|---|---|---|---|",
        *_paired_rows(o, ("ours", "plain"), "tokens_per_s_ratio", "lock-step", 3),
        f"| median optimizer-step time, plain/ours (lock-step) | | | {fmt(o['median_step_ratio'], 3)} |",
        *(_paired_rows(o["sequential"], ("ours", "plain"), "tokens_per_s_ratio", "sequential", 3)
          if "sequential" in o else []),
        f"| final eval loss | {o['eval_loss_ours']:.6f} | {o['eval_loss_plain']:.6f} | |",
        "",
        f"Training loss, step by step (max absolute difference over all {len(ours)} steps: "
        f"{o['loss_max_abs_diff']}; every run of both sides identical: {o['loss_runs_identical']}):",
        "",
        "| step | ours | plain |",
        "|---|---|---|",
        *[f"| {i + 1} | {ours[i]:.6f} | {plain[i]:.6f} |" for i in shown],
        "",
        "What our recipe adds outside the training loop (median seconds per run): "
        + ", ".join(f"{k} {fmt(val, 2)}" for k, val in o["ours_phases_s"].items())
        + ". `evaluate` is the eval before (baseline) and after training; `save` the adapter + tokenizer; "
        "`publish` the copy to the output URI with manifest.json last. Inside the loop ours also runs the "
        "metrics endpoint, the checkpoint callbacks and logs every step (the plain script logs every step too).",
    ]
    return lines


def _paired_rows(o: dict[str, Any], names: tuple[str, str], ratio: str, design: str, digits: int,
                 what: str = "tokens") -> list[str]:
    """Table rows of a `trainer_bench._paired` result: throughput, per CPU-second, memory, wall."""
    x, y = names
    rows = [f"| {what}/s, training loop ({design}) | {fmt(o[f'{x}_tokens_per_s'], 0)} | "
            f"{fmt(o[f'{y}_tokens_per_s'], 0)} | {fmt(o[ratio], digits)} |"]
    if "tokens_per_cpu_s_ratio" in o:
        rows.append(f"| {what} per CPU-second, same window ({design}) | {fmt(o['a_tokens_per_cpu_s'], 0)} | "
                    f"{fmt(o['b_tokens_per_cpu_s'], 0)} | {fmt(o['tokens_per_cpu_s_ratio'], digits)} |")
    if f"{x}_peak_rss_mib" in o:
        rows.append(f"| peak RSS, MiB, whole process ({design}) | {fmt(o[f'{x}_peak_rss_mib'], 0)} | "
                    f"{fmt(o[f'{y}_peak_rss_mib'], 0)} | {fmt(o['peak_rss_ratio'], 3)} |")
        rows.append(f"| wall time of the process, s ({design}) | {fmt(o[f'{x}_wall_s'], 1)} | "
                    f"{fmt(o[f'{y}_wall_s'], 1)} | |")
    return rows


def _packing(p: dict[str, Any]) -> list[str]:
    c, tl = p["config"], p["token_lengths"]
    return [
        "",
        "## 2. Packing (padding-free) vs padded batches",
        "",
        _meta(p),
        "",
        f"{c['rows']} chat rows (messages format, ChatML), token lengths {tl['min']}-{tl['max']} (spread "
        f"{tl['spread']}x, median {tl['median']}, mean {tl['mean']}); one epoch each, so both train on the "
        f"same {p['real_tokens']['dataset']} real tokens; our recipe with `dataset.packing` true (TRL bfd, "
        f"padding-free, batch {c['packed_batch']} x {c['max_length']}) vs false (batch {c['padded_batch']} "
        "padded to the longest row). Tiny random Llama, LoRA, fp32 on CPU. Lock-step (the headline) and "
        "sequential pairs as in section 1; once one side has finished its epoch the other runs alone.",
        "",
        "| | packed | padded | speedup |",
        "|---|---|---|---|",
        *_paired_rows(p, ("packed", "padded"), "speedup", "lock-step", 2, what="real tokens"),
        *(_paired_rows(p["sequential"], ("packed", "padded"), "speedup", "sequential", 2, what="real tokens")
          if "sequential" in p else []),
        f"| optimizer steps | {p['steps']['packed']} | {p['steps']['padded']} | |",
        f"| real tokens counted by the Trainer | {p['real_tokens']['packed']} | {p['real_tokens']['padded']} | |",
        f"| final eval loss (base {p['base_eval_loss']:.4f}) | {fmt(p['eval_loss_packed'], 4)} | "
        f"{fmt(p['eval_loss_padded'], 4)} | |",
    ]


def _startup(s: dict[str, Any]) -> list[str]:
    from .trainer_bench import STARTUP_MARKS

    names = [n for n in s if not n.startswith("_")]
    lines = [
        "",
        "## 3. Start-up: process start to the first optimizer step (our recipe, `run_job`, started as "
        "`finetune train` does: startup.begin)",
        "",
        _meta(s),
        "",
        "Seconds since the parent started the process, at each point (median, min-max):",
        "",
        "| point | " + " | ".join(f"{n} ({s[n]['parameters'] / 1e6:.1f} M params)" for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for key, label in STARTUP_MARKS:
        cells = [fmt(s[n]["marks_s"][key], 1) if key in s[n]["marks_s"] else "-" for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| peak RSS (MiB) | " + " | ".join(fmt(s[n]["peak_rss_mib"], 0) for n in names) + " |")
    for n in names:
        if s[n].get("profile_top"):
            lines += ["", f"pyinstrument profile of one {n} run (whole run, 1 step; full text in the run folder):",
                      "", "```", s[n]["profile_top"], "```"]
    return lines


def _cache(s: dict[str, Any]) -> list[str]:
    from .cache_bench import PARTS, SIDES

    sides = [side for side in SIDES if side in s]  # results of an earlier version may lack a side
    lines = [
        "",
        "## 5. Time to the first step with the shared model cache: off, cold (empty), warm (second job), "
        "warm with the entry out of the page cache",
        "",
        _meta(s),
        "",
        f"Model `{s['model']}` ({s['model_bytes'] / 1e6:.0f} MB) and data read from a local MinIO (s3://), each run a "
        "fresh `run_job` process started as `finetune train` starts. Seconds (median, min-max); the parts before "
        "the first step:",
        "",
        "| part | " + " | ".join(sides) + " |",
        "|---|" + "---|" * len(sides),
    ]
    for key, label in PARTS:
        lines.append(f"| {label} | " + " | ".join(fmt(s[side][key], 2) if key in s[side] else "-" for side in sides) + " |")
    lines.append("| model from the cache (status.modelCache) | "
                 + " | ".join(", ".join(s[side]["model_cache"]) for side in sides) + " |")
    lines.append("| model read ahead while importing (cache.prefetch) | "
                 + " | ".join(", ".join(s[side].get("read_ahead", ["-"])) for side in sides) + " |")
    lines.append("| share of the entry in the page cache before the run | "
                 + " | ".join(fmt(s[side]["page_cache_share_before"], 2) if "page_cache_share_before" in s[side]
                              else "-" for side in sides) + " |")
    lines.append("| peak RSS (MiB) | " + " | ".join(fmt(s[side]["peak_rss_mib"], 0) for side in sides) + " |")
    uncached = (f"; warm_uncached / cold: {fmt(s['warm_uncached_over_cold'], 3)}"
                if "warm_uncached_over_cold" in s else "")
    lines += ["", f"warm / cold (per group): **{fmt(s['warm_start_ratio'], 3)}**{uncached}; "
              f"warm / off: {fmt(s['warm_over_off'], 3)}"]
    if "load_average_1m_per_run" in s:
        lines += [f"Load average (1 min) at the start of each run: {fmt(s['load_average_1m_per_run'], 1)}."]
    if "omp_num_threads" in s:
        lines += [f"Torch CPU threads in every run: OMP_NUM_THREADS={s['omp_num_threads']}."]
    return lines


def _operator(o: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## 4. Operator at scale (local test cluster: real kube-apiserver, etcd, controllers, kwok nodes)",
        "",
        _meta(o),
        "",
        o.get("method", ""),
        "",
        "| FineTuneJobs | burst create->Job p50 / p99 (s) | all Running (s) | probe create->Job at N live p50 / p99 (s) "
        "| operator peak RSS (MiB) | operator writes / job | operator reads / job | all clients' writes / job |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, r in sorted(o.get("sizes", {}).items(), key=lambda kv: int(kv[0])):
        b, pr = r["burst_latency_s"], r.get("probe_latency_s") or {}
        probe = f"{pr['p50']:.3f} / {pr['p99']:.3f}" if pr else "-"
        def num(key: str, digits: int, r: dict[str, Any] = r) -> str:
            return f"{r[key]:.{digits}f}" if isinstance(r.get(key), (int, float)) else "-"

        timed_out = f" ({r['probes_timed_out']} timed out)" if r.get("probes_timed_out") else ""
        note = " (live phase only: the finish did not complete)" if r.get("lifecycle_incomplete") else ""
        lines.append(
            f"| {n}{note} | {b['p50']:.3f} / {b['p99']:.3f} | {num('all_running_s', 1)} | {probe}{timed_out} | "
            f"{num('operator_peak_rss_mib', 0)} | {num('operator_writes_per_job', 1)} | "
            f"{num('operator_reads_per_job', 1)} | {num('all_writes_per_job', 1)} |")
    for n, r in sorted(o.get("sizes", {}).items(), key=lambda kv: int(kv[0])):
        if r.get("operator_writes_by_verb"):
            lines += ["", f"Operator writes at {n} jobs by verb/resource: "
                      + ", ".join(f"{k} {val}" for k, val in sorted(r["operator_writes_by_verb"].items()))]
    return lines
