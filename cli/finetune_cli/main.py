"""`finetune`: validate manifests, print the CRD, run a job locally, run the operator."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from .manifests import check_file

# Subcommands that live with the parts that need heavy dependencies; imported only when used,
# so that `finetune validate` works with the API package alone.
#   name -> (module, extra that provides it, help)
PLUGINS = {
    "run": ("finetune_trainer.run_manifest", "trainer", "Run a FineTuneJob manifest on this machine (CPU or local GPU)."),
    "preflight": ("finetune_trainer.preflight", "trainer",
                  "Check a manifest's data, chat template and memory plan before any GPU is taken."),
    "train": ("finetune_trainer.entrypoint", "trainer", "Container entry point: train from the spec the operator mounts."),
    "operator": ("finetune_operator.operator_cli", "operator", "Run the operator against the current kube context."),
    "cache": ("finetune_trainer.cache", "trainer", "The shared model cache: 'warm URI...' fills it ahead of jobs."),
}


def cmd_validate(args: argparse.Namespace) -> int:
    bad = 0
    for name in args.files:
        for checked in check_file(Path(name), local_run=args.local):
            if checked.job is not None:
                if not args.quiet:
                    print(f"{checked.where}: ok (FineTuneJob {checked.job.metadata.name}, "
                          f"method {checked.job.spec.method.type}, objective {checked.job.spec.objective.type})")
                continue
            bad += 1
            for line in checked.errors:
                print(f"{checked.where}: {line}", file=sys.stderr)
    return 1 if bad else 0


def cmd_crd(args: argparse.Namespace) -> int:
    from finetune_api.crd import render_crd_yaml

    sys.stdout.write(render_crd_yaml())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="Check FineTuneJob manifests; one line per error, exit 1 if any.")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("-q", "--quiet", action="store_true", help="Print only errors.")
    p.add_argument("--local", action="store_true",
                   help="Check for `finetune run` on this machine (a local output path is fine there; "
                        "on the cluster the output must be s3:// or pvc://).")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("crd", help="Print the CustomResourceDefinition generated from the API model.")
    p.set_defaults(func=cmd_crd)

    for name, (module, extra, help_text) in PLUGINS.items():
        p = sub.add_parser(name, help=help_text, add_help=False)
        p.set_defaults(plugin=(module, extra))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if hasattr(args, "plugin"):
        module_name, extra = args.plugin
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            print(f"finetune {args.command}: needs the [{extra}] extra "
                  f"(pip install 'finetune-operator[{extra}]'): {exc}", file=sys.stderr)
            return 2
        return int(module.main(rest))
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
