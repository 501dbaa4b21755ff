"""Running helm against the chart: render, lint, and pick objects out of the rendered stream."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "finetune-operator"
TOOLS_BIN = Path(os.environ.get("FINETUNE_TOOLS_BIN", str(REPO / ".tools" / "bin")))


def helm_binary() -> str | None:
    """`make tools` builds helm into .tools/bin; a helm on PATH is used when that one is absent."""
    built = TOOLS_BIN / "helm"
    if built.exists():
        return str(built)
    return shutil.which("helm")


def run_helm(args: Iterable[str], *, env: Mapping[str, str] | None = None, check: bool = True,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
    binary = helm_binary()
    if binary is None:
        raise FileNotFoundError("helm is not built: run `make tools`")
    # Keep helm's cache and config out of $HOME so tests do not depend on or touch a user's setup.
    scratch = REPO / ".tools" / "tmp" / "helm-home"
    base = {**os.environ, "HELM_CACHE_HOME": str(scratch / "cache"), "HELM_CONFIG_HOME": str(scratch / "config"),
            "HELM_DATA_HOME": str(scratch / "data")}
    proc = subprocess.run([binary, *args], capture_output=True, text=True, timeout=timeout,
                          env={**base, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def set_args(values: Mapping[str, Any] | None) -> list[str]:
    """Values as a --set-json per top-level key (exact types, no string coercion)."""
    return [a for k, v in (values or {}).items() for a in ("--set-json", f"{k}={json.dumps(v)}")]


def render(values: Mapping[str, Any] | None = None, *, release: str = "ft", namespace: str = "finetune-system",
           extra: Iterable[str] = (), include_crds: bool = False) -> list[dict[str, Any]]:
    args = ["template", release, str(CHART), "--namespace", namespace, *set_args(values), *extra]
    if include_crds:
        args.append("--include-crds")
    out = run_helm(args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def find(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = find(objs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[o['metadata']['name'] for o in found]}"
    return found[0]
