"""What every benchmark shares: child processes measured from outside, medians, the machine."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
#: Built models, tokenizers and data sets live here between runs (ignored by git).
CACHE = REPO / "bench" / ".cache"
#: Environment of every child: offline, quiet, single-threaded tokenizers.
CHILD_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
    # The child reads this as "process start" for the start-up benchmark.
}
T0_ENV = "BENCH_T0"


@dataclass
class Child:
    """A finished child process: its JSON result, peak RSS (from wait4) and wall time."""

    result: dict[str, Any]
    peak_rss_mib: float
    wall_s: float
    returncode: int
    log: Path


def run_children(
    children: Sequence[tuple[Sequence[str], Path, dict[str, str] | None]], *, timeout: float = 1800
) -> list[Child]:
    """Runs each `python -m <argv>` in a fresh process, all at once, and waits for them; each
    writes its result as JSON to $BENCH_RESULT. When one fails the others are killed (they may be
    waiting for it), and the first failure is raised.

    Peak RSS comes from the kernel's rusage of exactly that child (os.wait4), so it covers
    everything the process did, imports included, and nothing of ours.
    """
    procs: list[tuple[subprocess.Popen[bytes], Path, float, Any]] = []
    for argv, log, env in children:
        log.parent.mkdir(parents=True, exist_ok=True)
        result_file = log.with_suffix(".json")
        result_file.unlink(missing_ok=True)
        full_env = {**os.environ, **CHILD_ENV, **(env or {}), "BENCH_RESULT": str(result_file)}
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), full_env.get("PYTHONPATH", "")) if p)
        out = open(log, "wb")  # closed below, once the child is reaped
        t0 = time.time()
        full_env[T0_ENV] = repr(t0)
        proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, env=full_env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT)
        procs.append((proc, log, t0, out))
    deadline = time.monotonic() + timeout
    done: dict[int, Child] = {}
    failed: list[str] = []
    while len(done) < len(procs):
        for i, (proc, log, t0, out) in enumerate(procs):
            if i in done:
                continue
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if not pid and (failed or time.monotonic() > deadline):
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
            if not pid:
                continue
            out.close()
            proc.returncode = os.waitstatus_to_exitcode(status)
            result_file = log.with_suffix(".json")
            result = json.loads(result_file.read_text()) if result_file.exists() else {}
            done[i] = Child(result, usage.ru_maxrss / 1024.0, time.time() - t0, proc.returncode, log)
            if (proc.returncode != 0 or not result) and not failed:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
                failed.append(f"{' '.join(proc.args[1:])} failed with {proc.returncode} (log {log}):\n{tail}")
        time.sleep(0.05)
    if failed:
        raise RuntimeError(failed[0])
    return [done[i] for i in range(len(procs))]


def write_result(data: dict[str, Any]) -> None:
    """Child side: hand the result to the parent."""
    Path(os.environ["BENCH_RESULT"]).write_text(json.dumps(data))


def process_t0() -> float:
    """Child side: when the parent started this process (time.time() just before exec)."""
    return float(os.environ.get(T0_ENV) or time.time())


def summary(values: Sequence[float]) -> dict[str, float]:
    """median, min, max (and n) of a series of runs."""
    vals = [float(v) for v in values]
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def fmt(s: dict[str, float], digits: int = 2) -> str:
    """'median (min-max)' for a table cell."""
    if s["n"] == 1:
        return f"{s['median']:.{digits}f}"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def machine() -> dict[str, Any]:
    """Where the numbers came from."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    versions: dict[str, str] = {"python": platform.python_version()}
    from importlib import metadata

    for pkg in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "kopf", "kubernetes"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "absent"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "os": f"{platform.system()} {platform.release()}",
        "versions": versions,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_average_at_start": [round(x, 2) for x in load_average()],
    }
