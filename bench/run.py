"""`make bench` / `python -m bench.run [--only overhead,packing,startup,operator,cache] [--runs 5]`.

Runs the selected benchmarks, merges them into bench/results.json (sections not run this time
keep their last figures and date) and rewrites bench/RESULTS.md from it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from . import report
from .common import REPO, load_average, machine

SECTIONS = ("overhead", "packing", "startup", "operator", "cache")
ALIASES = {"trainer": ("overhead",), "all": SECTIONS}


def parse_only(value: str) -> list[str]:
    out: list[str] = []
    for part in (p.strip() for p in value.split(",") if p.strip()):
        names = ALIASES.get(part, (part,))
        for name in names:
            if name not in SECTIONS:
                raise argparse.ArgumentTypeError(f"unknown benchmark {part!r}: choose from {', '.join(SECTIONS)}")
            if name not in out:
                out.append(name)
    return out


def build_parser() -> argparse.ArgumentParser:
    from .cache_bench import MODEL as CACHE_MODEL
    from .cache_bench import MODELS as CACHE_MODELS
    from .cache_bench import QUICK_MODEL as CACHE_QUICK_MODEL

    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--only", type=parse_only, default=list(SECTIONS), metavar="A,B",
                   help=f"benchmarks to run ({', '.join(SECTIONS)}; 'trainer' = overhead)")
    p.add_argument("--runs", type=int, default=5, help="runs per side, alternating A B, B A, ... (default 5)")
    # ~7 s of training per run on 2 cores: shorter windows (60 steps, 1.5 s) left the ratio to noise.
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per overhead run (default 300)")
    p.add_argument("--packing-rows", type=int, default=384, help="chat rows of the packing data set (default 384)")
    p.add_argument("--sizes", default="1,100,1000", help="operator scale: FineTuneJob counts (default 1,100,1000)")
    p.add_argument("--probes", type=int, default=20, help="operator: jobs created one at a time at N live (default 20)")
    p.add_argument("--cache-model", default=None, choices=CACHE_MODELS,
                   help=f"cache: the model served from MinIO (sizes in bench/fixtures.py; default {CACHE_MODEL}, "
                        f"{CACHE_QUICK_MODEL} with --quick)")
    p.add_argument("--cache-threads", type=int, default=None,
                   help="cache: OMP_NUM_THREADS of every run (default the core count, as a pod's trainer; "
                        "1 is steadier on a busy shared machine)")
    p.add_argument("--quick", action="store_true",
                   help="smallest mode (CI): few steps and rows, tiny model only, no profiles, 1 operator job")
    p.add_argument("--out", type=Path, default=REPO / "bench", help="where results.json and RESULTS.md go")
    p.add_argument("--workdir", type=Path, default=REPO / "bench" / ".runs", help="logs of every run")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    from . import trainer_bench

    results: dict[str, Any] = {}
    args.workdir.mkdir(parents=True, exist_ok=True)
    for name in args.only:
        t = time.monotonic()
        load_before = load_average()[0]
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        if name == "overhead":
            section = trainer_bench.overhead(args.runs, 4 if args.quick else args.steps, args.workdir)
        elif name == "packing":
            section = trainer_bench.packing(args.runs, args.workdir, rows=48 if args.quick else args.packing_rows)
        elif name == "startup":
            models = ("tiny",) if args.quick else ("tiny", "100m")
            section = trainer_bench.startup(args.runs, args.workdir, models=models, profile=not args.quick)
        elif name == "cache":
            from . import cache_bench

            threads = {"threads": args.cache_threads} if args.cache_threads else {}
            model = args.cache_model or (cache_bench.QUICK_MODEL if args.quick else cache_bench.MODEL)
            section = cache_bench.cache(args.runs, args.workdir, model_name=model, **threads)
        else:
            from . import operator_bench

            sizes = [1] if args.quick else [int(x) for x in args.sizes.split(",") if x]
            section = operator_bench.scale(sizes, args.workdir, probes=2 if args.quick else args.probes)
        section["_meta"] = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "runs": args.runs,
                            "quick": args.quick, "seconds": round(time.monotonic() - t, 1),
                            "load_average_1m": [round(load_before, 2), round(load_average()[0], 2)]}
        results[name] = section
        print(f"bench: {name} done in {section['_meta']['seconds']} s", file=sys.stderr, flush=True)
    return results


def merge(out_dir: Path, new: dict[str, Any]) -> dict[str, Any]:
    path = out_dir / "results.json"
    old: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    sections = {**old.get("sections", {}), **new}
    doc = {"machine": machine(), "sections": sections}
    doc.update(report.headline(sections))
    return doc


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Output URIs in the specs must be absolute paths.
    args.out, args.workdir = args.out.resolve(), args.workdir.resolve()
    if args.runs < 1:
        print("bench: --runs must be at least 1", file=sys.stderr)
        return 2
    new = run(args)
    doc = merge(args.out, new)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    (args.out / "RESULTS.md").write_text(report.markdown(doc))
    print(json.dumps({k: v for k, v in doc.items() if k not in ("machine", "sections")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
